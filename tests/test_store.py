"""The results store: append-only, reruns skip what is done, a torn last line is ignored and cut."""

import json

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
