"""Zero-shot task YAMLs: the shipped files parse, prompts match lm-eval's formats, tasks score a model."""

import gzip
import json

import pytest

from fasp_bench.errors import BenchError
from fasp_bench.zeroshot import ALL_TASKS, TASKS_DIR, evaluate_task, resolve_tasks, task_manager, task_yamls

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


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_task_scores_a_tiny_model(data_root, tiny_model_dirs, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dirs["llama-gqa"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    result = evaluate_task(model, tokenizer, name, data_root, limit=3, batch_size=4)
    assert 0.0 <= result["acc"] <= 1.0 and result["docs"] == 3
    assert result["docs_total"] == len(shipped_records(data_root, name))
    assert (result["acc_norm"] is None) == (name in ("boolq", "winogrande"))  # lm-eval scores those by acc only


def test_a_dropped_in_yaml_is_a_new_task(data_root, tiny_model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = (TASKS_DIR / "arc_easy.yaml").read_text().replace("task: arc_easy", "task: my_arc")
    (tmp_path / "my_arc.yaml").write_text(text)
    assert resolve_tasks("my_arc,piqa", [tmp_path]) == ["my_arc", "piqa"]
    path = tiny_model_dirs["llama"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    result = evaluate_task(model, tokenizer, "my_arc", data_root, limit=2, tasks_dirs=[tmp_path])
    assert result["docs"] == 2 and 0.0 <= result["acc"] <= 1.0
