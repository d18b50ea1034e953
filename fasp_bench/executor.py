"""Where a run's stages execute: in this process one after another (the default), or as Ray tasks.

A stage is a `Task`: a module-level function, its arguments, the tasks whose results it takes (appended to its
arguments, in order) and the resources it asks for. The in-process executor runs the list in order, so the
one-machine run is what it always was. The Ray executor submits every task at once; Ray starts each when its
inputs exist and its resources are free, retries one that raised or whose worker died (`retries` times), and a
task whose input failed fails with it. Every task writes its output to its own log in the work dir, and the
store the tasks share takes concurrent appends (`store.py`). A failed task is recorded in the store with its
error; the run then ends with one line naming it, and a rerun redoes only what is missing.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import BenchError
from .store import ResultsStore

EXECUTORS = ("local", "ray")
RETRIES = 2  # a task that raised or lost its worker runs at most 1 + RETRIES times


@dataclass(frozen=True)
class Task:
    name: str  # "prune fasp-0.2", "evaluate dense", "serve fasp-0.2": the log's name and the failure record's key
    fn: Callable[..., Any]
    args: tuple = ()
    needs: tuple[str, ...] = ()  # tasks whose results follow `args`
    cpus: float = 1.0
    gpus: float = 0.0
    # a CPU measurement that must run alone on its node (serving throughput): on Ray it asks for every CPU of the
    # smallest node, so no other task shares its cores and it gets as many threads as the in-process run
    whole_node: bool = False


def log_path(log_dir: Path, name: str) -> Path:
    return log_dir / (re.sub(r"[^A-Za-z0-9._=-]+", "_", name) + ".log")


def run_local(tasks: list[Task], bar: tqdm) -> dict[str, Any]:
    """Every task here, in list order (a task's inputs come before it); the first error ends the run."""
    results: dict[str, Any] = {}
    for task in tasks:
        bar.set_postfix_str(task.name)
        results[task.name] = task.fn(*task.args, *(results[n] for n in task.needs))
        bar.update(1)
    return results


@contextmanager
def _output_to(path: Path):
    """This process's stdout and stderr (file descriptors too: subprocesses and C code) into `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _logged(log: str, fn: Callable[..., Any], args: tuple, *inputs: Any) -> Any:
    """A task's body on a Ray worker: its output goes to its log, with a line per attempt."""
    with _output_to(Path(log)):
        print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()} (pid {os.getpid()})", flush=True)
        try:
            return fn(*args, *inputs)
        except BaseException:
            traceback.print_exc()
            raise


def _probe(folder: str) -> str:
    """Runs on a worker: can it write `folder`? Returns its host name, or raises."""
    probe = Path(folder) / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
    return socket.gethostname()


def import_ray():
    try:
        import ray
    except ImportError:
        raise BenchError("--executor ray needs Ray: pip install 'fasp-bench[ray]' (or pip install ray)") from None
    return ray


def _error_line(err: BaseException) -> str:
    """The innermost error's own message, on one line (Ray wraps a task's exception in its own)."""
    cause = getattr(err, "cause", None) or err
    text = f"{type(cause).__name__}: {cause}".strip()
    return text.splitlines()[-1]


def run_ray(tasks: list[Task], bar: tqdm, *, address: str | None, work_dir: Path, store: ResultsStore,
            retries: int = RETRIES) -> dict[str, Any]:
    """Every task on Ray; returns the results of those that finished, or raises BenchError naming the failed
    ones once every other task is done (each failure recorded in `store` under metric "failure")."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    log_dir = work_dir / "logs"
    _check_workers_can_write(ray, work_dir)
    run = ray.remote(_logged)
    node_cpus = min(n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive"))
    refs: dict[str, Any] = {}
    for task in tasks:
        cpus = max(task.cpus, node_cpus) if task.whole_node else task.cpus
        refs[task.name] = run.options(name=task.name, num_cpus=cpus, num_gpus=task.gpus,
                                      max_retries=retries, retry_exceptions=True).remote(
            str(log_path(log_dir, task.name)), task.fn, task.args, *(refs[n] for n in task.needs))
    names = {ref: name for name, ref in refs.items()}
    inputs_of = {refs[t.name]: [refs[n] for n in t.needs] for t in tasks}
    pending, results, failed = set(names), {}, {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in ready:
            pending.discard(ref)
            name = names[ref]
            try:
                results[name] = ray.get(ref)
            except Exception as err:  # the task's own error after its retries, or its input's
                failed[name] = _error_line(err)
                store.add(name, "failure", {"task": name}, {"error": failed[name],
                                                            "log": str(log_path(log_dir, name))})
            bar.update(1)
        waiting = sum(1 for ref in pending if any(i in pending for i in inputs_of[ref]))
        bar.set_postfix_str(f"running or queued {len(pending) - waiting}, waiting on inputs {waiting}, "
                            f"done {len(results)}, failed {len(failed)}")
    if failed:
        first = next(iter(failed))
        raise BenchError(f"{len(failed)} task(s) failed: {'; '.join(failed)} (first: {failed[first]}); logs in "
                         f"{log_dir}; the same command again redoes only what is missing")
    return results


def _check_workers_can_write(ray, work_dir: Path) -> None:
    """One probe on every live node: checkpoints and the store must be on storage each worker sees."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(_probe)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
                          ).remote(str(work_dir.resolve())) for node in nodes]
    for node, ref in zip(nodes, refs):
        try:
            ray.get(ref)
        except Exception as err:
            raise BenchError(f"a Ray worker (node {node[:12]}) cannot write the work dir {work_dir.resolve()} "
                             f"({_error_line(err)}): put --work-dir on storage every worker sees") from None
