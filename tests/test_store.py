"""The results store: append-only, reruns skip what is done, a torn last line is ignored and cut."""

import json
import warnings

import pytest

from fasp_bench.store import ResultsStore


def test_measure_runs_once_and_survives_reopening(tmp_path):
    path = tmp_path / "results.jsonl"
    calls = []
    store = ResultsStore(path)
    record, cached = store.measure("fp", "perplexity", {"dataset": "wikitext2", "seqlen": 8},
                                   lambda: calls.append(1) or {"ppl": 3.0})
    assert not cached and record["result"] == {"ppl": 3.0} and record["wall_s"] >= 0
    again, cached = ResultsStore(path).measure("fp", "perplexity", {"seqlen": 8, "dataset": "wikitext2"},
                                               lambda: calls.append(1) or {"ppl": 9.0})
    assert cached and again["result"] == {"ppl": 3.0} and calls == [1]
    # Another protocol is another measurement.
    ResultsStore(path).measure("fp", "perplexity", {"dataset": "wikitext2", "seqlen": 16}, lambda: {"ppl": 4.0})
    assert len(path.read_text().splitlines()) == 2


def test_torn_last_line_is_ignored_with_a_warning_and_cut_on_append(tmp_path):
    path = tmp_path / "results.jsonl"
    ResultsStore(path).add("fp", "m", {"p": 1}, {"v": 1})
    with open(path, "ab") as out:
        out.write(b'{"fingerprint": "fp", "metric": "m", "proto')  # a kill mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        store = ResultsStore(path)
    assert [r["result"] for r in store.records()] == [{"v": 1}]
    store.add("fp", "m", {"p": 2}, {"v": 2})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["result"] for line in lines] == [{"v": 1}, {"v": 2}]


def test_a_line_that_is_not_a_record_is_skipped(tmp_path):
    path = tmp_path / "results.jsonl"
    ResultsStore(path).add("fp", "m", {"p": 1}, {"v": 1})
    with open(path, "a") as out:
        out.write('{"not": "a record"}\n')
    with pytest.warns(UserWarning, match="not a results record"):
        assert len(ResultsStore(path).records()) == 1


WRITER = """
import sys
from fasp_bench.store import ResultsStore
path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(count):
    # each process opens the store afresh now and then, as a run's stages do
    store = ResultsStore(path) if i % 50 == 0 else store
    store.add(f"{name}-{i}", "perplexity", {"dataset": "wikitext2", "i": i}, {"window_nll": [0.5] * 200})
    if count > 10**6:
        print(i, flush=True)
"""


def _writers(path, names, count):
    import subprocess
    import sys
    return [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(count)],
                             stdout=subprocess.PIPE, text=True) for name in names]


def test_eight_processes_appending_at_once_lose_nothing(tmp_path):
    path = tmp_path / "results.jsonl"
    writers = _writers(path, [f"w{k}" for k in range(8)], 200)
    assert [w.wait(timeout=300) for w in writers] == [0] * 8
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 1601
    records = [json.loads(line) for line in lines[:-1]]  # every line parses: none interleaved or torn
    assert sorted(r["fingerprint"] for r in records) == sorted(f"w{k}-{i}" for k in range(8) for i in range(200))
    assert len(ResultsStore(path).records()) == 1600


def test_a_writer_killed_mid_stream_loses_only_its_unfinished_record(tmp_path):
    import signal
    import time
    path = tmp_path / "results.jsonl"
    endless = _writers(path, ["killed"], 10**7)[0]
    for _ in range(50):  # let it write a few hundred records
        endless.stdout.readline()
    time.sleep(0.05)
    endless.send_signal(signal.SIGKILL)
    endless.wait(timeout=60)
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1].split(b"\n")[:-1]
    assert len(complete) >= 50 and all(json.loads(line)["fingerprint"].startswith("killed-") for line in complete)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn tail, if the kill landed mid-write, is warned about
        store = ResultsStore(path)
    assert len(store.records()) == len(complete)
    assert [w.wait(timeout=60) for w in _writers(path, ["after"], 5)] == [0]  # the lock died with its holder
    lines = path.read_bytes().split(b"\n")
    assert [json.loads(line)["fingerprint"] for line in lines[:-1]][len(complete):] == [f"after-{i}" for i in range(5)]
