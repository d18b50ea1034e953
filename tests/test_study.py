"""`fasp-bench study`: the models of several runs and stores in one table, each row paired with the baselines."""

import math
import re
from pathlib import Path

from fasp_bench.cli import main
from fasp_bench.report import model_table
from fasp_bench.store import ResultsStore

PPL_MATCH = {"seqlen": 8, "dtype": "float32", "device": "cpu"}


def _run(store: ResultsStore, nll_by_method: dict[str, list[float]], sparsity: float = 0.2) -> None:
    """One run record naming dense and the given methods, each with its perplexity record."""
    models = [{"label": "dense", "fingerprint": "dense", "sparsity_realised": 0.0, "model_sparsity_realised": 0.0}]
    for method, nll in nll_by_method.items():
        fp = f"{method}@{sparsity}"
        store.add(fp, "perplexity", {"dataset": "wikitext2", **PPL_MATCH},
                  {"ppl": math.exp(sum(nll) / len(nll)), "window_nll": nll})
        if method != "dense":
            models.append({"label": f"{method}-{sparsity:g}", "method": method, "sparsity": sparsity, "fingerprint": fp,
                           "params": 90, "sparsity_realised": sparsity, "model_sparsity_realised": 0.1,
                           "prune_seconds": 1.0})
        else:
            models[0]["fingerprint"] = fp
    store.add("-", "run", {"methods": list(nll_by_method)},
              {"models": models, "ppl_match": PPL_MATCH, "zeroshot_match": {}, "serve_match": {"prompts": -1}})


def _row(text: str, configuration: str, tag: str = "") -> list[str]:
    line = next(line for line in text.splitlines()
                if re.search(rf"\| {re.escape(configuration)} +\|", line) and (not tag or line.startswith(f"| {tag} ")))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_study_merges_runs_and_pairs_each_row_with_each_baseline(tmp_path, capsys):
    base = [3.0 + 0.4 * math.sin(i) for i in range(30)]
    store = ResultsStore(tmp_path / "a" / "results.jsonl")
    # two runs in one store: the baselines in the first, the variants in the second (an ablation grows this way)
    _run(store, {"dense": [x - 1 for x in base], "fasp": base, "flap": [x + 0.1 for x in base]})
    _run(store, {"dense": [x - 1 for x in base], "fasp-plus": [x - 0.2 + 0.01 * math.cos(5 * i)
                                                               for i, x in enumerate(base)],
                 "fasp-plus:widths=uniform": [x + 0.01 * math.cos(3 * i) for i, x in enumerate(base)]})
    assert main(["study", str(store.path), "--against", "fasp", "flap"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("### WikiText-2, dense: ")
    # oracle: over the same windows, a paired log-ppl difference is the mean of the window differences
    plus = _row(text, "fasp-plus")
    assert plus[0] == "20%" and plus[3].startswith("-0.200 [") and plus[3].endswith("*")
    assert plus[4].startswith("-0.300 [") and plus[4].endswith("*")
    uniform = _row(text, "fasp-plus:widths=uniform")
    assert uniform[3].startswith("+0.000 [") and not uniform[3].endswith("*")  # no difference: not resolved
    fasp = _row(text, "fasp")
    assert fasp[3] == "" and fasp[4].startswith("-0.100 [")  # no row is paired with itself
    assert f"{math.exp(sum(base) / len(base)):.2f} [" in fasp[2]


def test_study_tags_stores_and_pairs_only_within_a_tag(tmp_path, capsys):
    base = [2.0 + 0.3 * math.cos(i) for i in range(20)]
    small, large = ResultsStore(tmp_path / "n16" / "results.jsonl"), ResultsStore(tmp_path / "n64" / "results.jsonl")
    _run(small, {"dense": base, "fasp": [x + 0.5 for x in base], "fasp-plus": [x + 0.4 for x in base]})
    _run(large, {"dense": base, "fasp": [x + 0.3 for x in base], "fasp-plus": [x + 0.25 for x in base]})
    assert main(["study", f"{small.path}=16", f"{large.path}=64", "--against", "fasp",
                 "--out", str(tmp_path / "study.md")]) == 0
    text = (tmp_path / "study.md").read_text()
    assert _row(text, "fasp-plus", "16")[4].startswith("-0.100 [")
    assert _row(text, "fasp-plus", "64")[4].startswith("-0.050 [")  # paired with the 64-window fasp, not the other


def test_study_refuses_a_missing_file_in_one_line(tmp_path, capsys):
    assert main(["study", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fasp-bench: error: results file") and "does not exist" in err and "\n" not in err


def test_study_restricts_the_zero_shot_mean_to_chosen_tasks(capsys):
    items = Path(__file__).parent / "data" / "results_items.jsonl"  # a real run with per-document correctness
    table, _ = model_table(ResultsStore(items).records())
    fasp = table.set_index("model").loc["fasp-0.2"]  # the first fasp row of the study
    assert main(["study", str(items), "--against", "flap", "--tasks", "piqa", "arc_easy"]) == 0
    text = capsys.readouterr().out
    assert "mean zero-shot accuracy (%) over PIQA, ARC-e, dense: " in text
    mean = (fasp["acc piqa"] + fasp["acc arc_easy"]) / 2  # oracle: the two tasks' accuracies from the report
    se = math.hypot(fasp["acc piqa se"], fasp["acc arc_easy se"]) / 2
    section = text.split("### mean zero-shot")[1].split("###")[0]
    assert _row(section, "fasp")[2] == f"{mean * 100:.1f} ± {se * 100:.1f}"
    per_task = text.split("### zero-shot accuracy per task")[1]
    assert "| PIQA " in per_task and "BoolQ" not in per_task

    assert main(["study", str(items), "--tasks", "piqa", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert "no zero-shot results for task(s) hellaswag" in err and len(err.strip().splitlines()) == 1


def test_study_limit_selects_the_zero_shot_records_of_that_document_count(capsys):
    items = Path(__file__).parent / "data" / "results_items.jsonl"  # zero-shot scored on 20 documents per task
    assert main(["study", str(items)]) == 0
    default = capsys.readouterr().out
    assert main(["study", str(items), "--limit", "20"]) == 0
    assert capsys.readouterr().out == default and "### mean zero-shot" in default
    assert main(["study", str(items), "--limit", "7"]) == 0  # no records at 7: perplexity only
    text = capsys.readouterr().out
    assert "### WikiText-2" in text and "zero-shot" not in text


def test_summary_puts_every_model_in_one_table_with_its_own_dense_speedup(tmp_path, capsys):
    base = [2.5 + 0.2 * math.sin(2 * i) for i in range(24)]
    stores = {}
    for tag, (dense_tok_s, fasp_tok_s) in {"small": ((95, 100, 105), (125, 130, 135)),
                                           "large": ((40, 50, 60), (45, 55, 65))}.items():
        store = stores[tag] = ResultsStore(tmp_path / tag / "results.jsonl")
        _run(store, {"dense": base, "fasp": [x + 0.3 for x in base]})
        for fp, (low, median, high) in (("dense@0.2", dense_tok_s), ("fasp@0.2", fasp_tok_s)):
            store.add(fp, "serving", {"prompts": -1, "repeats": 3},
                      {"output_tok_s": median, "output_tok_s_min": low, "output_tok_s_max": high})
    assert main(["study", f"{stores['small'].path}=small", f"{stores['large'].path}=large", "--summary"]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [[cell.strip() for cell in line.split("|")[1:4]] for line in lines] == [
        ["small", "0%", "dense"], ["small", "20%", "fasp"], ["large", "0%", "dense"], ["large", "20%", "fasp"]]
    small_fasp = _row(text, "fasp", "small")
    assert small_fasp[3].startswith(f"{math.exp(sum(base) / len(base) + 0.3):.2f} [")
    assert small_fasp[4:7] == ["20.0 / 10.0", "1", "1.30x (1.19-1.42)"]  # 130/100; 125/105 to 135/95
    assert _row(text, "fasp", "large")[6] == "1.10x (0.75-1.62) not resolved"  # against its own dense, 50 tok/s
    assert _row(text, "dense", "small")[4:7] == ["-", "-", "1.00x (reference)"]


def test_a_configuration_missing_a_task_gets_no_mean(tmp_path, capsys):
    """An interrupted run scored fasp-0.2 on PIQA only: a mean over that one task beside the others' five-task
    means would be compared as if equal (it was, 60.8 vs 41.5 on SmolLM2)."""
    items = Path(__file__).parent / "data" / "results_items.jsonl"
    partial = tmp_path / "results.jsonl"
    fasp = "3aac35fb2cad9263311f"  # fasp-0.2 in that run
    lines = [line for line in items.read_text().splitlines()
             if not ('"metric": "zeroshot"' in line and fasp in line and '"task": "piqa"' not in line)]
    assert len(lines) < len(items.read_text().splitlines())  # the filter did drop records
    partial.write_text("\n".join(lines) + "\n")
    table = model_table(ResultsStore(partial).records())[0].set_index("model")
    assert table.loc["fasp-0.2", "acc piqa"] > 0 and table.loc["fasp-0.2", ["acc mean", "margin mean"]].isna().all()
    assert table.loc["flap-0.2", "acc mean"] == table.loc["flap-0.2", [c for c in table.columns if c.startswith(
        "acc ") and not c.endswith(" se") and c != "acc mean"]].mean()  # complete rows keep theirs
    assert main(["study", str(partial)]) == 0
    section = capsys.readouterr().out.split("### mean zero-shot")[1].split("###")[0]
    assert not re.search(r"\| 20% +\| fasp +\|", section) and re.search(r"\| 20% +\| flap +\|", section)
