"""`fasp-bench eval`: a table and records in the store; reruns reuse them; kill -9 loses only what was in flight.

Everything runs in this process (`cli` fixture) except the kill -9 test, the one real `eval` subprocess."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_cli import one_line_error

EVAL = ("--ppl", "wikitext2,c4", "--seqlen", "64", "--max-windows", "3", "--zeroshot", "arc_easy,winogrande",
        "--limit", "4")


def _keys(path):
    return [json.dumps([r["fingerprint"], r["metric"], r["protocol"]], sort_keys=True)
            for r in map(json.loads, path.read_text().splitlines())]


def test_eval_prints_a_table_and_a_rerun_measures_nothing(cli, tiny_model_dirs, data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hellaswag has no offline copy: unavailable, not downloaded
    code, out, err = cli("eval", tiny_model_dirs["opt"], *EVAL, "--zeroshot", "arc_easy,hellaswag",
                         "--run-dir", tmp_path, data=data_root)
    assert code == 0, err
    assert "ppl wikitext2" in out and "ppl c4-heldout" in out and "zero-shot arc_easy" in out
    assert "unavailable" in out
    store = tmp_path / "results.jsonl"
    first = store.read_text()
    assert len(first.splitlines()) == 3
    code, again, err = cli("eval", tiny_model_dirs["opt"], *EVAL, "--zeroshot", "arc_easy", "--run-dir", tmp_path,
                           data=data_root)
    assert code == 0, err
    assert again.count("cached") == 3 and "measured" not in again
    assert store.read_text() == first


def test_a_task_failing_in_the_shared_evaluation_is_isolated(cli, tiny_model_dirs, data_root, tmp_path, monkeypatch):
    """A model's missing tasks run in one lm-eval evaluation; when it fails, each task runs alone, so the error
    names the task that cannot run and what ran before it is stored (a shipped task's error stops the run)."""
    import fasp_bench.evaluation as evaluation
    from fasp_bench.errors import BenchError

    real, calls = evaluation.evaluate_tasks, []

    def piqa_fails(lm, tasks, **kwargs):
        calls.append(list(tasks))
        if "piqa" in tasks:
            raise BenchError("zero-shot task piqa could not run: simulated")
        return real(lm, tasks, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_tasks", piqa_fails)
    code, out, err = cli("eval", tiny_model_dirs["opt"], "--ppl", "none", "--zeroshot", "arc_easy,piqa,winogrande",
                         "--limit", "2", "--run-dir", tmp_path, data=data_root)
    assert code == 2
    assert err.strip().splitlines()[-1] == "fasp-bench: error: zero-shot task piqa could not run: simulated"
    assert calls == [["arc_easy", "piqa", "winogrande"], ["arc_easy"], ["piqa"]]
    stored = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["protocol"]["task"] for r in stored] == ["arc_easy"] and len(stored[0]["result"]["doc_acc"]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--ppl", "ptb"), "unknown perplexity set 'ptb'"),
        (("--zeroshot", "mmlu"), "unknown zero-shot task 'mmlu'"),
        (("--limit", "0"), "--limit must be at least 1"),
        (("--tasks-dir", "/nonexistent/tasks"), "tasks folder /nonexistent/tasks does not exist"),
    ],
)
def test_bad_eval_input_one_line_error(cli, tiny_model_dirs, data_root, tmp_path, extra, message):
    code, out, err = cli("eval", tiny_model_dirs["opt"], *extra, "--run-dir", tmp_path / "run", data=data_root)
    one_line_error(code, out, err, message)
    assert out == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["truncated weights", "garbled config"])
def test_corrupt_checkpoint_one_line_error(cli, tiny_model_dirs, data_root, tmp_path, damage):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs["llama"], broken)
    if damage == "truncated weights":
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    code, out, err = cli("eval", broken, "--ppl", "wikitext2", "--max-windows", "1", "--run-dir", tmp_path / "run",
                         data=data_root)
    one_line_error(code, out, err, str(broken))
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_kill_9_mid_evaluation_then_rerun_reuses_completed_records(tiny_model_dirs, data_root, tmp_path):
    store = tmp_path / "results.jsonl"
    args = [sys.executable, "-m", "fasp_bench.cli", "eval", str(tiny_model_dirs["llama-gqa"]), "--ppl",
            "wikitext2,c4", "--seqlen", "64", "--max-windows", "40", "--zeroshot", "arc_easy,piqa,winogrande",
            "--limit", "12", "--run-dir", str(tmp_path)]
    env = {**os.environ, "FASP_BENCH_DATA": str(data_root)}
    victim = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None and not (store.exists() and store.read_text()):
        time.sleep(0.05)
    still_running = victim.poll() is None
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert still_running, "the evaluation finished before it could be killed"
    survived = store.read_text()
    assert 1 <= len(survived.splitlines()) < 5 and survived.endswith("\n")
    with open(store, "a") as out:  # as if a kill had also landed mid-write
        out.write('{"fingerprint": "x", "metric": "perplexity", "prot')

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "torn last line" in rerun.stderr
    final = store.read_text()
    assert final.startswith(survived)  # completed records untouched, torn line cut
    keys = _keys(store)
    assert len(keys) == len(set(keys)) == 5  # every measurement once: nothing recomputed, nothing lost
    assert rerun.stdout.count("cached") == len(survived.splitlines())
