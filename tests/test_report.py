"""The comparison: the report (intervals, paired differences, Findings) from fixed results files, method specs
in `run`, bad input refused in-process, and compare.py run exactly as the README shows."""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fasp_bench.plots import SWEEP_PLOT, plot_sweep, sweep_lines
from fasp_bench.report import PLOTS, model_table, paired_table, sweep_table, width_table, write_report
from fasp_bench.store import ResultsStore

FIXED = Path(__file__).parent / "data" / "results_minimal.jsonl"  # a real minimal run, before per-item data was kept
# a real run on SmolLM2 (16 x 512 calibration, 32 windows of 512, 20 docs per task) with per-item data
ITEMS = Path(__file__).parent / "data" / "results_items.jsonl"
REPO = Path(__file__).resolve().parents[1]


def test_report_from_old_records_without_per_item_data(tmp_path):
    table, _ = model_table(ResultsStore(FIXED).records())
    assert list(table["model"]) == ["dense", "fasp-0.3", "flap-0.3"]
    dense, fasp = table.iloc[0], table.iloc[1]
    assert dense["ppl wikitext2"] == pytest.approx(296.1251, rel=1e-6)
    assert fasp["ppl c4-heldout"] == pytest.approx(343.8417, rel=1e-6)
    assert fasp["sparsity_realised"] == pytest.approx(0.3, abs=1e-3) and dense["sparsity_realised"] == 0
    assert fasp["speedup"] == pytest.approx(294.0385 / 260.5845, rel=1e-4)
    assert fasp["dense/weights"] > 1.3 and dense["speedup"] == 1
    assert "ppl wikitext2 low" not in table  # no per-window data, no interval

    readme = write_report(FIXED, tmp_path / "reports", header="test header")
    text = readme.read_text()
    for heading in ("## Findings", "## Quality and size", "## Paired differences", "## Serving (vLLM)",
                    "## What pruning buys in memory", "test header"):
        assert heading in text
    assert re.search(r"^\| dense +\| 1\.6 ", text, re.M) and "| fasp-0.3 " in text and "Profile **minimal**" in text
    assert "| 296.13 " in text  # perplexity without an interval
    findings = text.split("## Findings")[1].split("## Quality")[0]
    assert "not resolved (Δ log-ppl n/a: a record without per-item data)" in findings
    assert ": resolved" not in findings and "its speed-up over dense is not resolved" in findings  # one repeat
    for plot in PLOTS:
        png = tmp_path / "reports" / plot
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert (tmp_path / "reports" / "results.jsonl").read_text() == FIXED.read_text()


def test_report_with_per_item_data_has_intervals_pairs_and_findings(tmp_path):
    records = ResultsStore(ITEMS).records()
    table, items = model_table(records)
    by_model = table.set_index("model")
    # independent oracles: each interval holds its estimate; the paired log-ppl difference of the same windows is
    # the log of the two perplexities' ratio; a 0/1 accuracy's standard error is sqrt(p (1 - p) / (n - 1))
    for dataset in ("wikitext2", "c4-heldout"):
        assert (table[f"ppl {dataset} low"] < table[f"ppl {dataset}"]).all()
        assert (table[f"ppl {dataset}"] < table[f"ppl {dataset} high"]).all()
    pairs = paired_table(table, items).set_index(["a", "b"])
    fasp_flap = pairs.loc[("fasp-0.3", "flap-0.3")]
    expected = math.log(by_model.loc["fasp-0.3", "ppl wikitext2"] / by_model.loc["flap-0.3", "ppl wikitext2"])
    assert fasp_flap["d ppl wikitext2"] == pytest.approx(expected, abs=1e-9)
    assert fasp_flap["d ppl wikitext2 low"] < expected < fasp_flap["d ppl wikitext2 high"] < 0
    p, n = by_model.loc["dense", "acc piqa"], len(items["dense"].docs["piqa"][1])
    assert by_model.loc["dense", "acc piqa se"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert len(pairs) == 6  # three methods, two sparsities

    text = write_report(ITEMS, tmp_path / "reports").read_text()
    quality = text.split("## Quality and size")[1].split("## Paired")[0]
    assert re.search(r"\| dense +\| 134\.5 +\| 0\.0 +\| 0\.0 +\| \d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\]", quality)
    assert re.search(r"\| \d+\.\d ± \d+\.\d ", quality)  # accuracy in % with its standard error
    paired = text.split("## Paired differences")[1].split("## Serving")[0]
    assert "| fasp vs flap " in paired and "**-0.3" in paired  # FASP at 30%: resolved, in bold
    findings = text.split("## Findings")[1].split("## Quality")[0]
    assert "WikiText-2 perplexity: fasp is lowest" in findings
    assert "over flap: resolved (Δ log-ppl -0.3" in findings
    assert "mean zero-shot accuracy" in findings and "over flap: not resolved" in findings
    assert "Accuracy does not rank these methods at this profile" in findings
    assert "(more documents per task would be needed)" in findings  # these records hold no margins
    for plot in PLOTS:
        assert (tmp_path / "reports" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_findings_let_the_paired_margin_decide_where_accuracy_cannot(tmp_path):
    """Two methods whose gold margins differ by a small shift on every document: accuracy (the margin's sign)
    resolves nothing, the paired margin does, and the Findings say which statistic decided."""
    import numpy as np

    rng = np.random.default_rng(0)
    store = ResultsStore(tmp_path / "results.jsonl")
    base = {task: rng.normal(0.2, 1.5, size=300) for task in ("piqa", "arc_easy")}
    models = [{"label": "dense", "fingerprint": "dense", "sparsity_realised": 0.0, "model_sparsity_realised": 0.0}]
    for label, shift in (("dense", 0.3), ("fasp", 0.0), ("flap", -0.04)):
        for task, margin in base.items():
            margin = margin + shift + rng.normal(0, 0.3, size=len(margin))
            store.add(label, "zeroshot", {"task": task, "limit": 300},
                      {"acc": float((margin > 0).mean()), "doc_ids": list(range(len(margin))),
                       "doc_acc": (margin > 0).astype(float).tolist(), "doc_margin": margin.tolist()})
        if label != "dense":
            models.append({"label": f"{label}-0.2", "method": label, "sparsity": 0.2, "fingerprint": label,
                           "params": 90, "sparsity_realised": 0.2, "model_sparsity_realised": 0.1,
                           "prune_seconds": 1.0})
    store.add("-", "run", {}, {"profile": "minimal", "model": "m", "models": models, "calibration": "c",
                               "ppl_note": "p", "zeroshot_note": "z", "serve_note": "not run", "ppl_match": {},
                               "zeroshot_match": {"limit": 300}, "serve_match": {"prompts": -1}})
    table, items = model_table(store.records())
    fasp = table.set_index("model").loc["fasp-0.2"]
    expected = np.mean([np.mean(items["fasp-0.2"].margins[t][1]) for t in base])  # tasks weigh equally
    assert fasp["margin mean"] == pytest.approx(expected)
    text = write_report(tmp_path / "results.jsonl", tmp_path / "reports").read_text()
    findings = text.split("## Findings")[1].split("## Quality")[0]
    assert "Accuracy does not rank these methods" in findings
    assert "the paired log-likelihood margin below is the statistic that decides" in findings
    margin_line = next(line for line in findings.splitlines() if "log-likelihood margin of the gold choice" in line)
    assert "fasp is highest" in margin_line and "over flap: resolved (Δ nats +0.0" in margin_line
    assert "Mean gold margin (nats ± SE)" in text and "Δ gold margin (nats)" in text


def _synthetic_run(path: Path, window_nll: dict[str, list[float]]) -> None:
    """A results file of one run: dense plus the given methods at 20%, perplexity records only."""
    store = ResultsStore(path)
    models = [{"label": "dense", "fingerprint": "dense", "sparsity_realised": 0.0, "model_sparsity_realised": 0.0}]
    for label, nll in window_nll.items():
        store.add(label, "perplexity", {"dataset": "wikitext2", "seqlen": 8, "dtype": "float32", "device": "cpu"},
                  {"ppl": math.exp(sum(nll) / len(nll)), "window_nll": nll})
        if label != "dense":
            models.append({"label": f"{label}-0.2", "method": label, "sparsity": 0.2, "fingerprint": label,
                           "params": 90, "sparsity_realised": 0.2, "model_sparsity_realised": 0.1,
                           "prune_seconds": 1.0})
    store.add("-", "run", {}, {"profile": "minimal", "model": "m", "models": models, "calibration": "c",
                               "ppl_note": "p", "zeroshot_note": "z", "serve_note": "not run",
                               "ppl_match": {"seqlen": 8, "dtype": "float32", "device": "cpu"},
                               "zeroshot_match": {}, "serve_match": {"prompts": -1}})


def test_findings_say_resolved_only_where_the_paired_interval_excludes_zero(tmp_path):
    base = [3.0 + 0.5 * math.sin(i) for i in range(40)]  # windows differ a lot; the pairs are what matters
    _synthetic_run(tmp_path / "r.jsonl", {
        "dense": [x - 0.5 for x in base],
        "good": base,
        "bad": [x + 0.2 + 0.01 * math.cos(7 * i) for i, x in enumerate(base)],  # 0.2 worse on every window
        "twin": [x + 0.2 + 0.01 * math.cos(7 * i + 2) for i, x in enumerate(base)]})  # bad's equal
    text = write_report(tmp_path / "r.jsonl", tmp_path / "out").read_text()
    findings = text.split("## Findings")[1].split("## Quality")[0]
    assert "WikiText-2 perplexity: good is lowest" in findings
    assert "over bad: resolved (Δ log-ppl -0.200 [" in findings and "over twin: resolved" in findings
    pairs = text.split("## Paired differences")[1].split("## Serving")[0]
    bad_twin = next(line for line in pairs.splitlines() if "| bad vs twin " in line)
    assert "**" not in bad_twin  # the bad-twin difference straddles zero: not resolved, not bold


def test_sweep_table_gives_limit_and_share_from_the_stored_bounds(tmp_path):
    store = ResultsStore(tmp_path / "r.jsonl")
    point = {"prompts": 8, "input_len": 64, "output_len": 32, "repeats": 3, "kv_cache_gib": 1}
    prefill = {**point, "output_len": 1}
    # (decode tok/s per repeat, decode bound in bytes, prefill prompt tok/s per repeat, prefill bound in FLOPs)
    served = {"dense": ([100, 100, 100], 1000, [50, 50, 50], 800),
              "small": ([110, 112, 114], 800, [60, 60, 60], 400),  # decode limit 1.25, share 0.48; prefill 2.0
              "same": ([101, 101, 101], 1000, [50, 50, 50], 800)}  # nothing pruned: limit 1, no share
    models = []
    for label, (decode, bound, prompt, flops) in served.items():
        roof = {"kv_bytes_per_token": bound // 10, "kv_bytes_per_token_padded_v": 100}
        # "small" was measured while another program took 35% of the CPUs; the rest on an idle machine
        store.add(label, "serving", point, {"output_tok_s_runs": decode, "kv_cache_tokens": 4096 * 10,
                                            "other_cpu": 0.35 if label == "small" else 0.01,
                                            "roofline": {**roof, "kind": "decode", "bound": bound}})
        store.add(label, "serving", prefill, {"output_tok_s_runs": [1, 1, 1], "prompt_tok_s_runs": prompt,
                                              "roofline": {**roof, "kind": "prefill", "bound": flops}})
        models.append({"label": label, "fingerprint": label, "sparsity_realised": 0.0, "model_sparsity_realised": 0.0,
                       **({} if label == "dense" else {"method": label, "sparsity": 0.3})})
    store.add("-", "run", {}, {"profile": "minimal", "model": "m", "models": models, "calibration": "c",
                               "ppl_note": "p", "zeroshot_note": "z", "serve_note": "s", "ppl_match": {},
                               "zeroshot_match": {}, "serve_match": point, "sweep_match": [point, prefill]})
    sweep = sweep_table(store.records(), models, [point, prefill]).set_index(["model", "kind"])
    assert sweep.loc[("small", "decode"), "speedup"] == pytest.approx(1.12)
    assert sweep.loc[("small", "decode"), "speedup low"] == pytest.approx(1.10)
    assert sweep.loc[("small", "decode"), "limit"] == pytest.approx(1.25)
    assert sweep.loc[("small", "decode"), "share"] == pytest.approx(0.12 / 0.25)
    assert sweep.loc[("small", "prefill"), "limit"] == pytest.approx(2.0)
    assert sweep.loc[("small", "prefill"), "share"] == pytest.approx(0.2)
    assert sweep.loc[("same", "decode"), "limit"] == pytest.approx(1.0)
    assert math.isnan(sweep.loc[("same", "decode"), "share"])  # undefined, not 0

    text = write_report(tmp_path / "r.jsonl", tmp_path / "out").read_text()
    section = text.split("## Serving across load regimes")[1].split("## What pruning buys")[0]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
            for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Model")}
    assert rows[("same", "decode, batch 8, 64 in / 32 out")][-1] == "-"  # share undefined, never a number
    assert rows[("dense", "decode, batch 8, 64 in / 32 out")][-1] == "-"
    assert rows[("small", "prefill, batch 8, 64 in / 1 out")][-2:] == ["2.000x", "0.20"]
    disturbed = text.split("**Disturbed:**")[1].split("\n")[0]
    assert "small at 8x64x32 (35%)" in disturbed and "dense" not in disturbed and "same" not in disturbed
    assert "small at 8x64x1" not in disturbed  # its prefill record holds no share: not judged
    kv = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in text.split("KV cache at the fixed budget of 1 GiB")[1].split("## Plots")[0].splitlines()
          if line.startswith("| ") and not line.startswith("| model")}
    # small: 80 bytes per token -> 2**30 // (80 * 2048) = 6553 sequences; the engine allocated 40960 tokens: 20
    assert kv["small"] == ["80", "100", "6,553", "20"]


def test_engine_perplexity_on_fewer_windows_is_compared_with_the_same_windows_of_transformers(tmp_path):
    """The quick profile scores the first few of its 24 windows inside vLLM (8 here): transformers' figure beside
    it must be its perplexity over those windows, not over all 24 (which would flag a sound checkpoint, or pass a
    broken one)."""
    from fasp_bench.report import engine_ppl_table

    nll = [2.0 + 0.1 * i for i in range(24)]  # later windows are harder: the 8-window and 24-window ppl differ
    first8 = math.exp(sum(nll[:8]) / 8)
    store = ResultsStore(tmp_path / "r.jsonl")
    key = {"dataset": "wikitext2", "seqlen": 8, "dtype": "bfloat16", "device": "cpu"}
    served_key = {"dataset": "wikitext2", "seqlen": 8, "dtype": "bfloat16", "engine": "in-process",
                  "tensor_parallel_size": 1}
    served = {"sound": first8 * 1.002, "broken": first8 * 1.05}  # inside / outside bf16's 1%
    models = []
    for label, engine_ppl in served.items():
        store.add(label, "perplexity", {**key, "max_windows": 24}, {"ppl": math.exp(sum(nll) / 24), "window_nll": nll})
        store.add(label, "served_perplexity", {**served_key, "max_windows": 8},
                  {"ppl": engine_ppl, "windows": 8, "window_nll": [math.log(engine_ppl)] * 8})
        models.append({"label": label, "fingerprint": label})
    run = {"result": {"models": models, "ppl_match": {"seqlen": 8, "dtype": "bfloat16", "device": "cpu"},
                      "served_ppl_match": {k: v for k, v in served_key.items() if k != "dataset"}}}
    table = engine_ppl_table(store.records(), run).set_index("model")
    assert table.loc["sound", "transformers"] == pytest.approx(first8)
    assert table.loc["sound", "gap"] == pytest.approx(0.002)
    assert table.loc["sound", "status"] == "agrees"
    assert table.loc["broken", "status"].startswith("FAILED")
    assert table.loc["sound", "windows"] == 8


def test_step_overhead_recovers_a_fixed_cost_and_a_bandwidth():
    from fasp_bench.report import step_overhead

    # steps of 8 sequences that take 2 ms plus their bytes at 1 GB/s: tok/s = 8 / step
    bounds = {"dense": 4e6, "a": 3e6, "b": 2.5e6}
    sweep = pd.DataFrame([{"model": m, "method": "dense" if m == "dense" else "x", "kind": "decode", "batch": 8,
                           "input_len": 64, "output_len": 32, "bound": b, "tok/s": 8 / (2e-3 + b / 1e9)}
                          for m, b in bounds.items()])
    (row,) = step_overhead(sweep).to_dict("records")
    assert row["fixed overhead (ms)"] == pytest.approx(2.0)
    assert row["effective GB/s"] == pytest.approx(1.0)
    assert row["dense step (ms)"] == pytest.approx(6.0)
    assert row["share the overhead allows"] == pytest.approx(1 - 2 / 6)


def test_method_options_give_two_checkpoints_and_a_rerun_recomputes_nothing(cli, tiny_model_dirs, data_root,
                                                                             tmp_path):
    args = ["run", "--model", tiny_model_dirs["llama"], "--methods", "fasp:restore=false", "fasp",
            "fasp:restore=true", "--sparsities", "0.3", "--profile", "minimal", "--out", tmp_path / "reports",
            "--work-dir", tmp_path / "runs", "--no-serve", "--dtype", "float32", "--device", "cpu", "--nsamples", "3",
            "--ppl", "c4-calval", "--zeroshot", "none"]
    code, _, err = cli(*args, data=data_root)
    assert code == 0, err
    folders = sorted(p.name for p in (tmp_path / "runs" / "checkpoints").iterdir())
    for folder in folders:  # --nsamples overrides the profile's 4 calibration windows
        assert json.loads((tmp_path / "runs" / "checkpoints" / folder / "pruning.json").read_text()
                          )["calibration"]["nsamples"] == 3
    name = tiny_model_dirs["llama"].name
    assert folders == [f"{name}-fasp-0.3", f"{name}-fasp_restore=false-0.3"]  # restore=true is fasp itself
    store = tmp_path / "runs" / "results.jsonl"
    records = [json.loads(line) for line in store.read_text().splitlines()]
    prunes = {r["model"]: r for r in records if r["metric"] == "prune"}
    assert sorted(prunes) == ["fasp-0.3", "fasp:restore=false-0.3"]
    # --ppl and --zeroshot replace the minimal profile's sets (wikitext2, c4) and task (arc_easy)
    assert {r["protocol"]["dataset"] for r in records if r["metric"] == "perplexity"} == {"c4-calval"}
    assert not [r for r in records if r["metric"] == "zeroshot"]
    assert prunes["fasp-0.3"]["protocol"]["options"] == {"restore": True, "damping": 0.1,
                                                         "damping_toward": "original"}
    assert prunes["fasp:restore=false-0.3"]["protocol"]["options"]["restore"] is False
    fingerprints = {r["result"]["checkpoint_fingerprint"] for r in prunes.values()}
    assert len(fingerprints) == 2  # different weights, so different evaluation records too
    text = (tmp_path / "reports" / "README.md").read_text()
    assert "| fasp:restore=false-0.3 " in text and "fasp:restore=false vs fasp" in text
    # the widths plot renders the store's per-layer widths: the checkpoint's own, beside the dense config's
    for folder in folders:
        recorded = json.loads((tmp_path / "runs" / "checkpoints" / folder / "pruning.json").read_text())
        label = "fasp-0.3" if folder.endswith("-fasp-0.3") else "fasp:restore=false-0.3"
        assert prunes[label]["result"]["widths"] == recorded["layers"]
    widths = width_table(json.loads(store.read_text().splitlines()[-1])["result"])
    dense = widths[widths["method"] == "dense"]
    assert list(dense["ffn width"]) == [96] * 3 and list(dense["v width"]) == [16] * 3
    assert (widths[widths["method"] == "fasp"]["ffn width"] < 96).all()
    assert "![widths](widths.png)" in text and (tmp_path / "reports" / "widths.png").stat().st_size > 5000
    # a page rebuilt from the store alone names the command, time and machine of the run that made it
    code, _, err = cli("report", "--results", store, "--out", tmp_path / "rebuilt")
    assert code == 0, err
    header = (tmp_path / "rebuilt" / "README.md").read_text().splitlines()[2]
    assert header == text.splitlines()[2] and header.startswith("Generated by `fasp-bench run --model ")

    code, _, err = cli(*args, data=data_root)
    assert code == 0, err
    again = [json.loads(line) for line in store.read_text().splitlines()]
    assert again[: len(records)] == records and [r["metric"] for r in again[len(records):]] == ["run"]

    # --limit replaces the minimal profile's 2 documents per task; the checkpoints are reused
    code, _, err = cli(*args[:-1], "arc_easy", "--limit", "3", data=data_root)
    assert code == 0, err
    added = [json.loads(line) for line in store.read_text().splitlines()][len(again):]
    shots = [r for r in added if r["metric"] == "zeroshot"]
    assert {r["metric"] for r in added} == {"zeroshot", "run"} and len(shots) == 3  # dense and both checkpoints
    assert all(r["protocol"]["limit"] == 3 and len(r["result"]["doc_acc"]) == 3 for r in shots)

    # --max-windows replaces the minimal profile's 2 windows per perplexity set
    code, _, err = cli(*args, "--max-windows", "1", data=data_root)
    assert code == 0, err
    scored = [json.loads(line) for line in store.read_text().splitlines()][len(again) + len(added):]
    windows = [r for r in scored if r["metric"] == "perplexity"]
    assert len(windows) == 3 and all(len(r["result"]["window_nll"]) == 1 for r in windows)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--methods", "magic"), "unknown method 'magic'"),
        (("--methods", "fasp:nosuch=1"), "unknown option 'nosuch' of method fasp: its options are restore"),
        (("--methods", "fasp:restore"), "malformed method spec 'fasp:restore'"),
        (("--methods", "fasp:restore=maybe"), "option restore of method fasp is true or false"),
        (("--methods", "wanda-sp:x=1"), "unknown option 'x' of method wanda-sp: it takes no options"),
        (("--sparsities", "1.5"), "sparsity 1.5 is out of range"),
        (("--profile", "huge"), "unknown profile 'huge'"),
        (("--out", "FILE/reports"), "is not writable"),
        (("--nsamples", "0"), "--nsamples must be at least 1"),
        (("--limit", "0"), "--limit must be at least 1 document per task"),
        (("--max-windows", "0"), "--max-windows must be at least 1 window per set"),
        (("--ppl", "wikitext3"), "unknown perplexity set 'wikitext3'"),
        (("--zeroshot", "arc_hard"), "unknown zero-shot task 'arc_hard'"),
        (("--sweep", "0x64x256"), "BATCHxINxOUT with each at least 1"),
        (("--ray-address", "10.0.0.1:6379"), "--ray-address is for --executor ray"),
        (("--executor", "ray", "--task-cpus", "0"), "--task-cpus must be positive"),
        (("--recover", "kd:tokens=1e9,seqlen=32"), "passes over the c4 source"),
        (("--recover", "kd:tokens=all,source=teacher"), "tokens=all needs the c4 source"),
        (("--recover", "lora:tokens=100"), "unknown recovery 'lora'"),
    ],
)
def test_bad_input_is_refused_before_any_work(cli, tiny_model_dirs, data_root, tmp_path, extra, message):
    (tmp_path / "FILE").write_text("a file, not a folder")
    args = ["run", "--model", tiny_model_dirs["llama"], "--methods", "fasp", "--sparsities", "0.2", "--profile",
            "minimal", "--out", tmp_path / "reports", "--work-dir", tmp_path / "runs", "--no-serve"]
    for flag, value in zip(extra[::2], extra[1::2]):
        value = str(tmp_path / value) if flag == "--out" else value
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    code, out, err = cli(*args, data=data_root)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


@pytest.mark.parametrize("sweep, expected", [(None, "profile"), ([], "default"),
                                             (["2x8x4", "4X16X1"], ((2, 8, 4), (4, 16, 1)))])
def test_run_sweep_replaces_the_profiles_serving_points(cli, tiny_model_dirs, data_root, tmp_path, monkeypatch,
                                                         sweep, expected):
    from fasp_bench import cli as cli_module
    from fasp_bench.run import PROFILES, SWEEP

    plans = []
    monkeypatch.setattr(cli_module, "run", lambda plan, command: plans.append(plan) or tmp_path / "README.md")
    args = ["run", "--model", tiny_model_dirs["llama"], "--profile", "quick", "--out", tmp_path / "r",
            "--work-dir", tmp_path / "w"] + ([] if sweep is None else ["--sweep", *sweep])
    assert cli(*args, data=data_root)[0] == 0
    wanted = {"profile": PROFILES["quick"].sweep, "default": SWEEP}.get(expected, expected)
    assert plans[0].profile_settings.sweep == wanted and plans[0].profile_settings.nsamples == 16


def readme_compare_command() -> str:
    """The compare.py line of the README's third step (after the environment it runs in is activated)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Then", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert ". .tox/bench/bin/activate" in block and "export FASP_BENCH_DATA=" in block
    return next(line.split("#")[0].strip() for line in block.splitlines() if "scripts/compare.py" in line)


def test_compare_as_the_readme_shows_then_a_rerun_recomputes_nothing(servable_model_dirs, data_root, tmp_path):
    """The README's command, run from the repository root by the environment's python; only a tiny model, the
    minimal profile and temporary folders are added so it fits in a test."""
    pytest.importorskip("vllm", reason="vLLM is installed by tox (python -m fasp_bench.serving.install)")
    command = shlex.split(readme_compare_command())
    assert command[:4] == ["python", "scripts/compare.py", "--methods", "fasp"]
    args = [sys.executable, *command[1:], "--model", servable_model_dirs["llama"], "--sparsities", "0.3",
            "--profile", "minimal", "--out", tmp_path / "reports", "--work-dir", tmp_path / "runs",
            "--dtype", "float32", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["FASP_BENCH_DATA"] = str(data_root)

    def compare():
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=1200)

    first = compare()
    assert first.returncode == 0, first.stderr[-3000:]
    reports, store = tmp_path / "reports", tmp_path / "runs" / "results.jsonl"
    text = (reports / "README.md").read_text()
    for row in ("| dense ", "| fasp-0.3 ", "| flap-0.3 "):
        assert text.count(row) == 5  # quality, serving and KV-cache tables, engine perplexity on both sets
    kv = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in text.split("KV cache at the fixed budget")[1].split("## Quality inside")[0].splitlines()
          if line.startswith("| ") and not line.startswith("| model")}
    # FASP narrows V: fewer KV bytes per token at its widths, the same as dense once V is padded back
    assert int(kv["fasp-0.3"][0].replace(",", "")) < int(kv["dense"][0].replace(",", "")) == int(
        kv["fasp-0.3"][1].replace(",", ""))
    engine = text.split("## Quality inside the engine")[1].split("## Plots")[0]
    assert "All 6 agree." in engine  # 3 models x 2 sets, vLLM's perplexity within 0.1% of transformers' (float32)
    serving = text.split("## Serving")[1].split("## What pruning buys")[0]
    assert "n/a" not in serving  # every model served
    assert " LlamaForCausalLM " in serving and " PrunedLlamaForCausalLM " in serving  # stock dense, plugin FASP
    for plot in PLOTS:
        assert (reports / plot).stat().st_size > 5000
    records = [json.loads(line) for line in store.read_text().splitlines()]
    metrics = sorted(r["metric"] for r in records)
    assert metrics.count("prune") == 2 and metrics.count("serving") == 3 and metrics.count("run") == 1
    assert metrics.count("served_perplexity") == 6
    assert metrics.count("perplexity") == 6 and metrics.count("zeroshot") == 3
    for r in records:  # --device and --dtype reached every stage; per-item data kept
        recorded = r["result"] if r["metric"] == "prune" else r["protocol"]
        if r["metric"] != "run":
            assert recorded["dtype"] == "float32", r
        if r["metric"] in ("prune", "perplexity", "zeroshot"):
            assert recorded["device"] == "cpu", r
        item = {"perplexity": "window_nll", "zeroshot": "doc_acc", "serving": "output_tok_s_runs"}.get(r["metric"])
        if item:
            assert len(r["result"][item]) >= 1, r
    checkpoint = tmp_path / "runs" / "checkpoints" / f"{servable_model_dirs['llama'].name}-fasp-0.3"
    stamp = (checkpoint / "model.safetensors.index.json").stat().st_mtime_ns
    shutil.rmtree(reports)

    second = compare()
    assert second.returncode == 0, second.stderr[-3000:]
    again = [json.loads(line) for line in store.read_text().splitlines()]
    assert again[: len(records)] == records and [r["metric"] for r in again[len(records):]] == ["run"]
    assert (checkpoint / "model.safetensors.index.json").stat().st_mtime_ns == stamp
    assert (reports / "README.md").is_file() and all((reports / plot).is_file() for plot in PLOTS)


def test_sweep_plot_joins_only_points_of_the_same_lengths(tmp_path):
    # the sweep's decode points at 64 in / 256 out beside the protocol's own point (16 x 128 in x 64 out) and a prefill
    points = [("decode", 1, 64, 256), ("decode", 8, 64, 256), ("decode", 32, 64, 256), ("decode", 16, 128, 64),
              ("prefill", 8, 1024, 1)]
    sweep = pd.DataFrame([{"model": m, "method": "dense" if m == "dense" else "fasp", "kind": kind, "batch": batch,
                           "input_len": i, "output_len": o, "speedup": 1.1, "limit": 1.2}
                          for m in ("dense", "a", "b") for kind, batch, i, o in points])
    lines = sweep_lines(sweep)
    assert [(model, lengths) for model, lengths, _ in lines] == [("a", "64 in, 256 out"), ("b", "64 in, 256 out")]
    assert all(rows["batch"].tolist() == [1, 8, 32] for _, _, rows in lines)
    assert plot_sweep(sweep, tmp_path) == [SWEEP_PLOT] and (tmp_path / SWEEP_PLOT).is_file()
    # one decode point per length pair (two batch sizes, but at different lengths): no curve, no plot
    single = sweep[sweep["batch"].isin([8, 16])]
    assert sweep_lines(single) == [] and plot_sweep(single, tmp_path / "none") == []
    assert not (tmp_path / "none" / SWEEP_PLOT).exists()
