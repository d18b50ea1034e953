"""One model's serving measurement in a fresh process: `python -m fasp_bench.serving.measure SPEC.json`.

Prints one JSON line (prefixed with RESULT_TAG) with throughput, time to first token, KV-cache capacity,
peak RSS and, when asked, the greedy tokens. The parent (`fasp_bench.serving.bench`) runs one such process
per checkpoint, so no model's memory or warm caches leak into another's numbers.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

RESULT_TAG = "FASP_BENCH_RESULT "


def _process_tree() -> list:
    """This process and its descendants (with a separate engine, its core and workers), as psutil processes."""
    import psutil

    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def _peak_rss_bytes() -> int:
    """Largest VmHWM over this process and its descendants (with a separate engine, its worker holds the model)."""
    peak = 0
    for proc in _process_tree():
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            continue
    return peak


class OtherCPU:
    """The share of this process's CPUs that processes outside its tree kept busy between `start()` and
    `share()`: the machine's busy time on those CPUs (/proc/stat, steal included) less this tree's own CPU time,
    over wall time x CPUs. A timing is only as good as the machine was idle: 0.3 on two cores means another
    program took about 0.6 of a core from the engine."""

    def __init__(self) -> None:
        self._cpus = (sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else list(range(os.cpu_count() or 1)))

    def _clock(self) -> tuple[float, float, float]:
        import psutil

        per_cpu = psutil.cpu_times(percpu=True)
        busy = sum(per_cpu[c].user + per_cpu[c].nice + per_cpu[c].system + getattr(per_cpu[c], "irq", 0.0)
                   + getattr(per_cpu[c], "softirq", 0.0) + getattr(per_cpu[c], "steal", 0.0)
                   for c in self._cpus if c < len(per_cpu))
        tree = _process_tree()
        own = 0.0
        for proc in tree:
            try:
                t = proc.cpu_times()
            except psutil.Error:  # a child that ended in between
                continue
            own += t.user + t.system + (t.children_user + t.children_system if proc is tree[0] else 0.0)
        return time.perf_counter(), busy, own

    def start(self) -> None:
        self._start = self._clock()

    def share(self) -> float:
        (t0, busy0, own0), (t1, busy1, own1) = self._start, self._clock()
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max((t1 - t0) * len(self._cpus), 1e-9)


def prompt_token_ids(vocab_size: int, prompts: int, input_len: int, seed: int, bos: int | None = None,
                     ) -> list[list[int]]:
    """Seeded random token prompts, the same for every model that shares the vocabulary; a model trained with
    a BOS gets it as the first of the `input_len` tokens."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    high = min(vocab_size, 32_000)
    ids = torch.randint(10, high, (prompts, input_len), generator=generator)
    if bos is not None:
        ids[:, 0] = bos
    return ids.tolist()


def run(spec: dict) -> dict:
    """Load the model once and measure every point of `spec["points"]` ([prompts, input_len, output_len] each)."""
    from vllm import LLM
    from vllm.platforms import current_platform

    points = spec["points"] if "points" in spec else [[spec["prompts"], spec["input_len"], spec["output_len"]]]
    ppl = spec.get("ppl") or {}  # dataset -> windows of token ids, scored by the engine
    sample = spec.get("sample")  # {"sequences", "length", "seed"}: text the model samples (recovery training)
    lengths = ([i + o for _, i, o in points] + [len(w) for windows in ppl.values() for w in windows]
               + ([sample["length"]] if sample else []))
    batches = [p for p, _, _ in points] + ([_PPL_GROUP] if ppl else []) + ([_SAMPLE_GROUP] if sample else [])
    # The KV budget: the CPU backend reads VLLM_CPU_KVCACHE_SPACE (set by main); a GPU takes it as an engine
    # argument, in place of the gpu_memory_utilization fraction.
    budget = {"kv_cache_memory_bytes": spec["kv_cache_gib"] << 30} if current_platform.is_cuda_alike() else {}
    executor = {"distributed_executor_backend": "uni"} if spec["engine"] == "in-process" else {}
    started = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], enforce_eager=True, seed=spec["seed"],
              max_model_len=max(lengths) + 8, max_num_seqs=max(batches),
              tensor_parallel_size=spec.get("tensor_parallel_size", 1), disable_log_stats=True, **budget, **executor)
    load_s = time.perf_counter() - started
    from fasp_bench.data import bos_id

    vocab = llm.llm_engine.model_config.get_vocab_size()
    bos = bos_id(llm.get_tokenizer())
    measured = [_measure_point(llm, vocab, bos, *point, spec) for point in points]
    scored = {dataset: _window_nll(llm, windows, vocab) for dataset, windows in ppl.items()}
    cache = llm.llm_engine.vllm_config.cache_config
    engine = {
        "kv_cache_tokens": int(cache.num_gpu_blocks * cache.block_size),
        "peak_rss_bytes": _peak_rss_bytes(),
        "load_s": load_s,
        "architecture": llm.llm_engine.model_config.architectures[0],
        "platform": current_platform.device_name,
        "bos": bos is not None,
    }
    if sample:
        engine["sampled"] = _sample(llm, vocab, bos, **sample)
    if "points" in spec:
        return {**engine, "points": measured, "ppl": scored}
    return {**measured[0], **engine, **({"ppl": scored} if scored else {})}


_PPL_GROUP = 8  # windows per request batch at most
# ... and at most this many bytes of float32 prompt logprobs per batch ([tokens, vocab]: 8 windows of 512 are 0.8 GB
# on SmolLM2's 49k vocabulary, 4.3 GB on Gemma-3's 262k, which the engine forms again in its own temporaries)
_PPL_LOGPROB_BYTES = 1 << 30


def ppl_group(window_len: int, vocab: int) -> int:
    """Windows scored per request batch: as many as fit the logprob budget, between 1 and _PPL_GROUP."""
    return max(1, min(_PPL_GROUP, _PPL_LOGPROB_BYTES // (4 * window_len * vocab)))


def _window_nll(llm, windows: list[list[int]], vocab: int) -> list[float]:
    """Each window's mean NLL of its tokens after the first, from the engine's prompt logprobs (the actual next
    token's log-softmax, in float32 over the model's logits)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0, detokenize=False)
    nll = []
    size = ppl_group(max(map(len, windows)), vocab)
    for start in range(0, len(windows), size):
        group = windows[start:start + size]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in group], params, use_tqdm=False)
        for ids, output in zip(group, outputs, strict=True):
            scores = output.prompt_logprobs[1:]  # the first token has no prediction
            nll.append(-math.fsum(position[token].logprob for position, token in zip(scores, ids[1:], strict=True))
                       / (len(ids) - 1))
    return nll


_SAMPLE_GROUP = 32  # sequences sampled at once


def _sample(llm, vocab: int, bos: int | None, sequences: int, length: int, seed: int) -> list[list[int]]:
    """`sequences` sequences of `length` tokens: a seeded random first token (after <bos> for a BOS model), then
    the model's own samples at temperature 1, one sampling seed per sequence, no early stop at EOS."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    starts = prompt_token_ids(vocab, sequences, 1 + (bos is not None), seed, bos)
    params = [SamplingParams(temperature=1.0, top_p=1.0, seed=seed * 1_000_003 + i, max_tokens=length - len(p),
                             min_tokens=length - len(p), ignore_eos=True, detokenize=False)
              for i, p in enumerate(starts)]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in starts], params, use_tqdm=False)
    return [p + list(o.outputs[0].token_ids) for p, o in zip(starts, outputs, strict=True)]


def _measure_point(llm, vocab: int, bos: int | None, prompts: int, input_len: int, output_len: int,
                   spec: dict) -> dict:
    """Throughput of one batch shape: a warm-up, then `repeats` timed runs (each after a one-token TTFT probe)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    batch = [TokensPrompt(prompt_token_ids=ids)
             for ids in prompt_token_ids(vocab, prompts, input_len, spec["seed"], bos)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    # warm-up at this batch and prompt length: a prefill and a decode step
    llm.generate(batch, SamplingParams(temperature=0, max_tokens=min(output_len, 2), ignore_eos=True), use_tqdm=False)
    runs, ttft = [], []
    outputs = None
    other = OtherCPU()
    other.start()
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        llm.generate(batch[:1], first, use_tqdm=False)
        ttft.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        runs.append(time.perf_counter() - t0)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    result = {
        "output_tok_s": generated / statistics.median(runs),
        "output_tok_s_min": generated / max(runs),
        "output_tok_s_max": generated / min(runs),
        "output_tok_s_runs": [generated / run for run in runs],
        "prompt_tok_s_runs": [prompt_tokens / run for run in runs],
        "total_tok_s": (generated + prompt_tokens) / statistics.median(runs),
        "ttft_s": statistics.median(ttft),
        "generated_tokens": generated,
        "other_cpu": other.share(),  # over the timed repeats: what other programs took from this measurement
    }
    if spec.get("return_tokens"):
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec["kv_cache_gib"]))
    print(RESULT_TAG + json.dumps(run(spec)), flush=True)
    if spec.get("engine") == "in-process":
        # The result is out; what is left is vLLM's teardown and the interpreter's (freeing the model, joining
        # threads), which measures nothing. An in-process engine has no worker to shut down, so end here.
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":  # vLLM's engine core is a spawned process: the LLM is created under this guard
    main()
