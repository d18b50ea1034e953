"""Serving measurement of several models: one fresh `measure` subprocess each, results into the store.

Every model gets the same prompts, lengths, seed and KV-cache budget. A model that fails to load is
recorded with its one-line error and the run goes on; a hung engine is killed at the timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
from safetensors import SafetensorError, safe_open

from .. import devices
from ..errors import BenchError
from ..models import fingerprint, load_config, resolve_model
from ..perplexity import summary
from ..store import ResultsStore
from .measure import RESULT_TAG
from .roofline import DTYPE_BYTES, ServingCost, serving_cost

# Above this share of the CPUs taken by other programs during a measurement's timed repeats, the run warns and the
# report marks the point: on two cores, a tenth is a fifth of a core, more than the repeats' usual spread.
OTHER_CPU_LIMIT = 0.10

_ERROR_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:ERROR [^\]]*\] )?(\w+(?:Error|Exception)): (.+)$")


def default_dtype() -> str:
    """The serving dtype: vLLM sees the GPU through nvidia-smi even where torch is a CPU build."""
    from .install import has_nvidia_gpu

    return devices.default_dtype(gpu=has_nvidia_gpu())


@dataclass(frozen=True)
class ServeProtocol:
    prompts: int = 16
    input_len: int = 128
    output_len: int = 64
    repeats: int = 3
    dtype: str = "float32"
    kv_cache_gib: int = 1  # per rank: VLLM_CPU_KVCACHE_SPACE on a CPU, kv_cache_memory_bytes on a GPU
    seed: int = 0
    tensor_parallel_size: int = 1
    engine: str | None = None  # where vLLM's engine runs: ENGINES; None: default_engine()

    def check(self) -> None:
        for name in ("prompts", "input_len", "output_len", "repeats", "kv_cache_gib", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise BenchError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.dtype not in DTYPE_BYTES:
            raise BenchError(f"unknown dtype {self.dtype!r}: choose from {', '.join(DTYPE_BYTES)}")
        if self.engine is not None and self.engine not in ENGINES:
            raise BenchError(f"unknown --engine {self.engine!r}: choose from {', '.join(ENGINES)}")
        if self.engine == "in-process" and self.tensor_parallel_size > 1:
            raise BenchError("--engine in-process runs one rank: use --engine separate with --tensor-parallel-size")

    def resolved(self) -> ServeProtocol:
        """The protocol with its engine chosen, as the store keys it (the two engines measure differently)."""
        return self if self.engine else replace(self, engine=default_engine(self.tensor_parallel_size))


# "separate": vLLM's own layout, the engine core and each worker in their own processes, so scheduling overlaps
# the model's work (what a GPU wants). On a CPU that layout keeps one core back for the frontend processes (on
# two cores the model gets one) and spawns two more interpreters per model (about 25 s each start). "in-process":
# engine and worker in the measuring process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the "uni" executor), every core
# on the model; one rank only.
ENGINES = ("separate", "in-process")


def default_engine(tensor_parallel_size: int) -> str:
    from .install import has_nvidia_gpu

    return "in-process" if tensor_parallel_size == 1 and not has_nvidia_gpu() else "separate"


def weight_bytes(path: Path, dtype: str) -> int:
    """Bytes of the weights when served in `dtype` (from the safetensors headers; no tensor is read)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise BenchError(f"{path} has no *.safetensors weights: give a checkpoint folder written by fasp-bench prune")
    total = 0
    for file in files:
        try:
            with safe_open(file, "pt") as weights:
                for name in weights.keys():
                    total += _numel(weights, name)
        except (SafetensorError, OSError) as err:
            raise BenchError(f"cannot read {file}: {err} (is the checkpoint complete? re-create it)") from None
    return total * DTYPE_BYTES[dtype]


def _numel(weights, name: str) -> int:
    count = 1
    for size in weights.get_slice(name).get_shape():
        count *= size
    return count


def cpu_tensor_parallel_env(tp: int) -> dict[str, str]:
    """vLLM's CPU backend binds each rank to a NUMA node by default and refuses more ranks than nodes; on a
    one-node machine give each rank its own contiguous slice of this process's cores instead, and keep no
    core back for the scheduler when a rank would be left with none."""
    from .install import has_nvidia_gpu

    if tp == 1 or has_nvidia_gpu() or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tp:
        raise BenchError(f"--tensor-parallel-size {tp} needs at least {tp} CPU cores; this process has {len(cores)}")
    per_rank = len(cores) // tp
    slices = [cores[r * per_rank:(r + 1) * per_rank] for r in range(tp)]
    env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, s)) for s in slices)}
    if per_rank < 2:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return env


def measure_in_subprocess(path: str, protocol: ServeProtocol, timeout_s: float = 900,
                          return_tokens: bool = False, points: list[ServeProtocol] | None = None,
                          ppl: dict[str, list[list[int]]] | None = None, sample: dict | None = None) -> dict:
    """The measurement of one model in a fresh process: a result dict, or {"error": one line}. With `points`
    (batch shapes of one protocol), one engine measures each and the dict holds a "points" list in their order,
    and "ppl": each window's mean NLL per dataset of `ppl` (windows of token ids) as the engine scores it. With
    `sample` ({"sequences", "length", "seed"}), "sampled": that many sequences the model samples itself."""
    protocol = protocol.resolved()
    spec = {**asdict(protocol), "model": path, "return_tokens": return_tokens}
    if points is not None:
        spec["points"] = [[p.prompts, p.input_len, p.output_len] for p in points]
    if ppl:
        spec["ppl"] = ppl
    if sample:
        spec["sample"] = sample
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(protocol.kv_cache_gib), "TOKENIZERS_PARALLELISM": "false",
           **cpu_tensor_parallel_env(protocol.tensor_parallel_size)}
    if protocol.engine == "in-process":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    proc = subprocess.Popen([sys.executable, "-m", "fasp_bench.serving.measure", handle.name], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # a hung engine core ignores SIGTERM
        proc.communicate()
        return {"error": f"no result within {timeout_s:.0f} s (engine hung or too slow): killed"}
    finally:
        Path(handle.name).unlink(missing_ok=True)
    for line in out.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return {"error": _last_error(err) or f"measurement process exited with {proc.returncode} and no result"}


def _last_error(stderr: str) -> str | None:
    """A native crash of vLLM's worker (e.g. a segfault in a kernel), else the last Python exception line."""
    crash = re.search(r"Fatal Python error: [^\n]+|Worker proc \S+ died unexpectedly[^\n]*", stderr)
    if crash:
        return crash.group(0)[:400]
    found = None
    for line in stderr.splitlines():
        match = _ERROR_LINE.match(line.strip())
        if match:
            found = f"{match.group(1)}: {match.group(2)}"[:400]
    return found


def require_vllm() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise BenchError("vLLM is not installed: run `python -m fasp_bench.serving.install` (tox does this)")


def serving_table(rows: list[dict]) -> pd.DataFrame:
    """Rows of serve_models -> a table with ratios to the first row (the dense model)."""
    table = pd.DataFrame(rows)
    for column in ("output_tok_s", "weight_bytes", "kv_cache_tokens", "peak_rss_bytes", "error"):
        if column not in table:
            table[column] = None
    base = table.iloc[0]
    out = pd.DataFrame({"model": table["model"], "out tok/s": table["output_tok_s"]})
    out["speedup"] = table["output_tok_s"] / base["output_tok_s"]
    out["weight MB"] = table["weight_bytes"] / 1e6
    out["dense/weights"] = base["weight_bytes"] / table["weight_bytes"]
    out["KV tokens"] = table["kv_cache_tokens"]
    out["KV ratio"] = table["kv_cache_tokens"] / base["kv_cache_tokens"]
    out["peak RSS MB"] = table["peak_rss_bytes"] / 1e6
    out["status"] = [r.get("error") or r["status"] for r in rows]
    return out


def sweep_points(protocol: ServeProtocol, shapes: tuple[tuple[int, int, int], ...] = ()) -> list[ServeProtocol]:
    """The protocol's own point, then each (prompts, input_len, output_len) of `shapes` not equal to it."""
    points = [protocol]
    for prompts, input_len, output_len in shapes:
        point = replace(protocol, prompts=prompts, input_len=input_len, output_len=output_len)
        if point not in points:
            points.append(point)
    return points


def point_kind(point: ServeProtocol) -> str:
    """"prefill" (one output token: prompt tok/s is the figure) or "decode" (output tok/s)."""
    return "prefill" if point.output_len == 1 else "decode"


def _roofline(cost: ServingCost, point: ServeProtocol) -> dict:
    """What bounds this point's speed for this model: bytes per decode step (at the mean context over the
    output) or prefill FLOPs, and the KV bytes per token at the checkpoint's widths and as padded V stores it."""
    if point_kind(point) == "prefill":
        bound = cost.prefill_flops(point.prompts, point.input_len)
    else:
        bound = cost.decode_bytes(point.prompts, point.input_len + (point.output_len - 1) / 2)
    return {"kind": point_kind(point), "bound": bound, "weight_bytes": cost.weight_bytes,
            "kv_bytes_per_token": cost.kv_bytes_per_token(),
            "kv_bytes_per_token_padded_v": cost.kv_bytes_per_token(padded_v=True)}


@dataclass(frozen=True)
class EnginePerplexity:
    """Windows of one perplexity set to score inside the engine; `key` names them as the transformers record
    of the same windows does (dataset, seqlen, max_windows)."""

    key: dict
    windows: list[list[int]]


def served_subset(key: dict, windows: list[list[int]], count: int | None) -> EnginePerplexity:
    """The first `count` of an evaluation's windows (all when None), named as a transformers record of that many
    windows of the same set would be; the report compares them with the first `count` of transformers' windows."""
    if count is None or count >= len(windows):
        return EnginePerplexity(key, windows)
    return EnginePerplexity({**key, "max_windows": count}, windows[:count])


# How far the engine's perplexity of a checkpoint may be from transformers' on the same windows before the
# checkpoint is reported as served wrongly (relative): float32 leaves only summation order; half precision
# rounds differently in each engine's kernels.
ENGINE_PPL_TOLERANCE = {"float32": 0.001, "bfloat16": 0.01, "float16": 0.01}


def ppl_gap(engine_ppl: float, reference_ppl: float, dtype: str) -> tuple[float, bool]:
    """The engine's perplexity relative to the reference's, minus one, and whether it is within tolerance."""
    gap = engine_ppl / reference_ppl - 1
    return gap, abs(gap) <= ENGINE_PPL_TOLERANCE[dtype]


def served_ppl_key(ppl: EnginePerplexity, protocol: ServeProtocol) -> dict:
    return {**ppl.key, "dtype": protocol.dtype, "engine": protocol.engine,
            "tensor_parallel_size": protocol.tensor_parallel_size}


def serve_models(specs: list[str], store: ResultsStore, protocol: ServeProtocol, names: list[str] | None = None,
                 timeout_s: float = 900, progress=None, sweep: tuple[tuple[int, int, int], ...] = (),
                 ppl: list[EnginePerplexity] = (), remeasure: bool = False) -> list[dict]:
    """Measure every (model, point) not already in the store (a stored failure is retried), and score every
    perplexity set of `ppl` inside the engine: one engine per model does what is missing. Returns one row per
    model at the protocol's own point. `remeasure`: every point is measured again (the machine was disturbed
    when they were); the new records supersede the stored ones, and engine perplexity stays as stored."""
    protocol.check()
    protocol = protocol.resolved()
    points = sweep_points(protocol, sweep)
    for point in points:
        point.check()
    rows = []
    for i, spec in enumerate(specs):
        name = names[i] if names else spec
        path = resolve_model(spec)
        fp = fingerprint(spec)
        results = {}
        for point in [] if remeasure else points:
            found = store.get(fp, "serving", asdict(point))
            if found is not None and "output_tok_s_runs" in found["result"]:  # not a failure, every repeat kept
                results[point] = {**found["result"], "status": "cached"}
        missing = [point for point in points if point not in results]
        unscored = [p for p in ppl if (store.get(fp, "served_perplexity", served_ppl_key(p, protocol)) or {}
                                       ).get("result", {}).get("window_nll") is None]
        if missing or unscored:
            windows = {p.key["dataset"]: p.windows for p in unscored}
            try:
                common = {"weight_bytes": weight_bytes(Path(path), protocol.dtype)}
                measured = measure_in_subprocess(path, protocol, timeout_s * max(len(missing), 1), points=missing,
                                                 ppl=windows)
            except BenchError as err:
                common, measured = {}, {"error": str(err)}
            engine = {k: v for k, v in measured.items() if k not in ("points", "ppl")}
            cost = serving_cost(load_config(path), protocol.dtype) if "points" in measured else None
            for j, point in enumerate(missing):
                result = {**common, **engine}
                if "points" in measured:
                    result.update(measured["points"][j], roofline=_roofline(cost, point))
                store.add(fp, "serving", asdict(point), result, model=name)
                if result.get("other_cpu", 0.0) > OTHER_CPU_LIMIT:
                    print(f"fasp-bench: warning: other programs kept {result['other_cpu']:.0%} of the CPUs busy while "
                          f"{name} was measured at {point.prompts}x{point.input_len}x{point.output_len}: measure "
                          "again on an idle machine (run --remeasure-serving, serve --remeasure)", file=sys.stderr)
                results[point] = {**result, "status": "failed" if "error" in result else "measured"}
            for p in unscored:
                nll = (measured.get("ppl") or {}).get(p.key["dataset"])
                result = (summary(nll, p.key["seqlen"], engine.get("bos", False)) if nll
                          else {"error": measured.get("error", "no perplexity came back")})
                store.add(fp, "served_perplexity", served_ppl_key(p, protocol), result, model=name)
        rows.append({**results[protocol], "model": name})
        if progress is not None:
            progress.update(1)
    return rows
