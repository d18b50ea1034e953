"""Append-only JSONL results store: one record per (checkpoint fingerprint, metric, protocol).

Each record is one line written with a single write, then flushed and fsynced, so a process killed at
any moment loses at most the measurement in flight. A torn last line (the kill landed mid-write) is
ignored with a warning and cut off before the next append; a rerun skips every measurement on record.
Several processes (several runs, or a run's workers) may share one store: every append holds
an exclusive lock on `results.jsonl.lock` beside it (filelock: flock on Unix, released by the kernel when a
holder dies), so lines never interleave and a torn tail is repaired only when no one is writing. Readers take
no lock (a store may sit in a read-only folder): a line still being written reads as a torn tail and is
skipped, complete lines are always whole.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from . import __version__

STORE_FILE = "results.jsonl"


def record_key(fingerprint: str, metric: str, protocol: dict) -> str:
    return json.dumps([fingerprint, metric, protocol], sort_keys=True)


class ResultsStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._records: dict[str, dict] = {}
        self._load()

    def _lock(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(f"{self.path}.lock")

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()  # no lock: a line being written shows as a torn tail, which is skipped
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        if tail.strip():
            warnings.warn(f"{self.path}: ignoring a torn last line ({len(tail)} bytes; a run was killed mid-write, "
                          "or another is writing it now)", stacklevel=3)
        for number, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = record_key(record["fingerprint"], record["metric"], record["protocol"])
            except (ValueError, KeyError, TypeError):
                warnings.warn(f"{self.path}:{number}: ignoring a line that is not a results record", stacklevel=3)
                continue
            self._records[key] = record

    def records(self) -> list[dict]:
        return list(self._records.values())

    def get(self, fingerprint: str, metric: str, protocol: dict) -> dict | None:
        return self._records.get(record_key(fingerprint, metric, protocol))

    def add(self, fingerprint: str, metric: str, protocol: dict, result: dict, **fields) -> dict:
        record = {"fingerprint": fingerprint, "metric": metric, "protocol": protocol, "result": result, **fields,
                  "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fasp_bench": __version__}
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        with self._lock(), open(self.path, "a+b") as out:
            if out.tell():  # a torn tail (no final newline) is cut so the record starts on its own line
                out.seek(-1, os.SEEK_END)
                if out.read(1) != b"\n":
                    out.truncate(self.path.read_bytes().rfind(b"\n") + 1)
            out.write(line)
            out.flush()
            os.fsync(out.fileno())
        self._records[record_key(fingerprint, metric, protocol)] = record
        return record

    def measure(self, fingerprint: str, metric: str, protocol: dict, run: Callable[[], dict],
                complete: Callable[[dict], bool] = lambda result: True, **fields) -> tuple[dict, bool]:
        """(record, cached): the stored record, or run the measurement and store it with its wall time.

        A stored result that `complete` rejects (e.g. written before per-item data was kept) is measured
        again; the new record supersedes it and the old line stays in the file."""
        found = self.get(fingerprint, metric, protocol)
        if found is not None and complete(found["result"]):
            return found, True
        started = time.perf_counter()
        result = run()
        return self.add(fingerprint, metric, protocol, result, wall_s=round(time.perf_counter() - started, 3),
                        **fields), False
