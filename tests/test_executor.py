"""`run --executor ray`: the stages as Ray tasks on a local 2-CPU instance give the sequential run's records; a
task that raises is retried, then recorded as failed, the run names it, and a rerun redoes only it."""

import json
import time

import pytest

from fasp_bench.errors import BenchError
from fasp_bench.executor import RETRIES, Task, run_ray
from fasp_bench.report import model_table
from fasp_bench.store import ResultsStore

ray = pytest.importorskip("ray", reason="the test extra installs Ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


TIMED = {"recorded_at", "wall_s", "prune_seconds", "finished_at", "checkpoint"}  # clocks and the work dir's path


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMED}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _records(path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {json.dumps([r["fingerprint"], r["metric"], r["protocol"]], sort_keys=True): _untimed(r["result"])
            for r in records if r["metric"] != "run"}


def test_a_ray_run_stores_what_the_sequential_run_stores(cli, tiny_model_dirs, data_root, tmp_path, local_ray):
    args = ["run", "--model", tiny_model_dirs["llama"], "--methods", "fasp", "flap", "--sparsities", "0.2",
            "--profile", "minimal", "--no-serve", "--dtype", "float32", "--device", "cpu"]
    stores = {}
    for executor in ("local", "ray"):
        work = tmp_path / executor
        code, _, err = cli(*args, "--executor", executor, "--work-dir", work, "--out", work / "report",
                           data=data_root)
        assert code == 0, err
        stores[executor] = work / "results.jsonl"
    local, distributed = _records(stores["local"]), _records(stores["ray"])
    assert {json.loads(k)[1] for k in local} == {"prune", "perplexity", "zeroshot"}
    assert distributed == local  # same keys, same values: pruning and evaluation are deterministic
    tables = [model_table(ResultsStore(stores[e]).records())[0].drop(columns=["prune_seconds"], errors="ignore")
              for e in ("local", "ray")]
    assert tables[0].drop(columns=[c for c in tables[0] if "time" in c]).equals(
        tables[1].drop(columns=[c for c in tables[1] if "time" in c]))
    logs = sorted(p.name for p in (tmp_path / "ray" / "logs").iterdir())
    assert logs == ["evaluate_dense.log", "evaluate_fasp-0.2.log", "evaluate_flap-0.2.log", "prune_fasp-0.2.log",
                    "prune_flap-0.2.log"]
    assert "fasp 20%" in (tmp_path / "ray" / "logs" / "prune_fasp-0.2.log").read_text()  # the task's own progress


def test_a_failing_task_is_retried_recorded_and_redone_alone_by_a_rerun(tmp_path, local_ray):
    attempts, broken = tmp_path / "attempts", tmp_path / "broken"
    attempts.mkdir()
    broken.write_text("b fails while this file exists")
    store_path = tmp_path / "results.jsonl"

    def measure(name: str, *inputs) -> dict:
        (attempts / f"{name}-{time.time_ns()}").write_text("")

        def work():
            if name == "b" and broken.exists():
                raise RuntimeError("b is broken")
            return {"value": name, "inputs": [i["value"] for i in inputs]}
        return ResultsStore(store_path).measure(name, "m", {}, work)[0]["result"]

    tasks = [Task("a", measure, ("a",)), Task("b", measure, ("b",)), Task("c", measure, ("c",), needs=("b",))]

    def tries(name):
        return len(list(attempts.glob(f"{name}-*")))

    from tqdm import tqdm
    with pytest.raises(BenchError) as failure:
        run_ray(tasks, tqdm(disable=True), address=None, work_dir=tmp_path, store=ResultsStore(store_path))
    message = str(failure.value)
    assert "2 task(s) failed: b; c" in message and "RuntimeError: b is broken" in message and "\n" not in message
    assert tries("a") == 1 and tries("b") == 1 + RETRIES and tries("c") == 0  # c never ran: its input failed
    records = [json.loads(line) for line in store_path.read_text().splitlines()]
    failures = {r["fingerprint"]: r["result"]["error"] for r in records if r["metric"] == "failure"}
    assert set(failures) == {"b", "c"} and "b is broken" in failures["b"]
    assert "b is broken" in (tmp_path / "logs" / "b.log").read_text()

    broken.unlink()
    results = run_ray(tasks, tqdm(disable=True), address=None, work_dir=tmp_path, store=ResultsStore(store_path))
    assert results["c"] == {"value": "c", "inputs": ["b"]}
    measured = [json.loads(line)["fingerprint"] for line in store_path.read_text().splitlines()
                if json.loads(line)["metric"] == "m"]
    assert measured == ["a", "b", "c"]  # a was on record and is not measured again


def test_a_work_dir_a_worker_cannot_write_is_refused_in_one_line(tmp_path, local_ray):
    from tqdm import tqdm
    (tmp_path / "FILE").write_text("a file, not a folder")
    ran = tmp_path / "ran"
    tasks = [Task("a", ran.write_text, ("yes",))]
    with pytest.raises(BenchError) as refused:
        run_ray(tasks, tqdm(disable=True), address=None, work_dir=tmp_path / "FILE" / "work",
                store=ResultsStore(tmp_path / "results.jsonl"))
    message = str(refused.value)
    assert "cannot write the work dir" in message and "storage every worker sees" in message and "\n" not in message
    assert not ran.exists()  # refused before any task


def test_a_whole_node_task_runs_alone_while_others_share_the_node(tmp_path, local_ray):
    import os

    from tqdm import tqdm

    def timed(name: str, seconds: float) -> str:
        start = time.time()
        time.sleep(seconds)
        (tmp_path / f"{name}.json").write_text(json.dumps([start, time.time(), os.environ.get("OMP_NUM_THREADS")]))
        return name

    tasks = [Task("a", timed, ("a", 2.0)), Task("b", timed, ("b", 2.0)),
             Task("serve", timed, ("serve", 1.0), whole_node=True), Task("c", timed, ("c", 2.0))]
    run_ray(tasks, tqdm(disable=True), address=None, work_dir=tmp_path, store=ResultsStore(tmp_path / "s.jsonl"))
    spans = {t.name: json.loads((tmp_path / f"{t.name}.json").read_text()) for t in tasks}

    def overlap(x, y) -> bool:
        return spans[x][0] < spans[y][1] and spans[y][0] < spans[x][1]

    assert any(overlap(x, y) for x, y in (("a", "b"), ("a", "c"), ("b", "c")))  # one-CPU tasks share the node
    assert not any(overlap("serve", other) for other in "abc")  # the measurement shares it with none
    assert spans["serve"][2] == "2" and spans["a"][2] == "1"  # and gets every core's thread, as in-process
