"""The comparison: report generation from a fixed results file, and compare.py end to end on a tiny model."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fasp_bench.report import PLOTS, model_table, write_report
from fasp_bench.store import ResultsStore

FIXED = Path(__file__).parent / "data" / "results_minimal.jsonl"  # from a real minimal run on a tiny model
REPO = Path(__file__).resolve().parents[1]


def test_report_from_a_fixed_results_file(tmp_path):
    table = model_table(ResultsStore(FIXED).records())
    assert list(table["model"]) == ["dense", "fasp-0.3", "flap-0.3"]
    dense, fasp = table.iloc[0], table.iloc[1]
    assert dense["ppl wikitext2"] == pytest.approx(296.1251, rel=1e-6)
    assert fasp["ppl c4-heldout"] == pytest.approx(343.8417, rel=1e-6)
    assert fasp["sparsity_realised"] == pytest.approx(0.3, abs=1e-3) and dense["sparsity_realised"] == 0
    assert fasp["speedup"] == pytest.approx(294.0385 / 260.5845, rel=1e-4)
    assert fasp["dense/weights"] > 1.3 and dense["speedup"] == 1

    readme = write_report(FIXED, tmp_path / "reports", header="test header")
    text = readme.read_text()
    for heading in ("## Quality and size", "## Serving (vLLM)", "## What pruning buys in memory", "test header"):
        assert heading in text
    assert "| fasp-0.3 |" in text and "| flap-0.3 |" in text and "Profile **minimal**" in text
    for plot in PLOTS:
        png = tmp_path / "reports" / plot
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert (tmp_path / "reports" / "results.jsonl").read_text() == FIXED.read_text()


def compare(*args, data_root):
    import os

    env = {**os.environ, "FASP_BENCH_DATA": str(data_root)}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "compare.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=1200)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--methods", "magic"), "unknown method 'magic'"),
        (("--sparsities", "1.5"), "sparsity 1.5 is out of range"),
        (("--profile", "huge"), "unknown profile 'huge'"),
        (("--out", "FILE/reports"), "is not writable"),
    ],
)
def test_bad_input_is_refused_before_any_work(tiny_model_dirs, data_root, tmp_path, extra, message):
    (tmp_path / "FILE").write_text("a file, not a folder")
    args = ["--model", tiny_model_dirs["llama"], "--methods", "fasp", "--sparsities", "0.2", "--profile", "minimal",
            "--out", tmp_path / "reports", "--work-dir", tmp_path / "runs", "--no-serve"]
    for flag, value in zip(extra[::2], extra[1::2]):
        args[args.index(flag) + 1] = str(tmp_path / value) if flag == "--out" else value
    done = compare(*args, data_root=data_root)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


def test_compare_end_to_end_then_a_rerun_recomputes_nothing(servable_model_dirs, data_root, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is installed by tox (python -m fasp_bench.serving.install)")
    args = ["--model", servable_model_dirs["llama"], "--methods", "fasp", "flap", "--sparsities", "0.3",
            "--profile", "minimal", "--out", tmp_path / "reports", "--work-dir", tmp_path / "runs",
            "--dtype", "float32", "--device", "cpu"]
    first = compare(*args, data_root=data_root)
    assert first.returncode == 0, first.stderr[-3000:]
    reports, store = tmp_path / "reports", tmp_path / "runs" / "results.jsonl"
    text = (reports / "README.md").read_text()
    for row in ("| dense ", "| fasp-0.3 ", "| flap-0.3 "):
        assert text.count(row) == 2  # quality table and serving table
    assert "n/a" not in text.split("## What pruning buys")[0].split("## Serving")[1]  # every model served
    for plot in PLOTS:
        assert (reports / plot).stat().st_size > 5000
    records = [json.loads(line) for line in store.read_text().splitlines()]
    metrics = sorted(r["metric"] for r in records)
    assert metrics.count("prune") == 2 and metrics.count("serving") == 3 and metrics.count("run") == 1
    assert metrics.count("perplexity") == 6 and metrics.count("zeroshot") == 3
    for r in records:  # --device and --dtype reached every stage
        recorded = r["result"] if r["metric"] == "prune" else r["protocol"]
        if r["metric"] != "run":
            assert recorded["dtype"] == "float32", r
        if r["metric"] in ("prune", "perplexity", "zeroshot"):
            assert recorded["device"] == "cpu", r
    checkpoint = tmp_path / "runs" / "checkpoints" / f"{servable_model_dirs['llama'].name}-fasp-0.3"
    stamp = (checkpoint / "model.safetensors.index.json").stat().st_mtime_ns
    shutil.rmtree(reports)

    second = compare(*args, data_root=data_root)
    assert second.returncode == 0, second.stderr[-3000:]
    again = [json.loads(line) for line in store.read_text().splitlines()]
    assert again[: len(records)] == records and [r["metric"] for r in again[len(records):]] == ["run"]
    assert (checkpoint / "model.safetensors.index.json").stat().st_mtime_ns == stamp
    assert (reports / "README.md").is_file() and all((reports / plot).is_file() for plot in PLOTS)
