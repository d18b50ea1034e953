"""One model's serving measurement in a fresh process: `python -m fasp_bench.serving.measure SPEC.json`.

Prints one JSON line (prefixed with RESULT_TAG) with throughput, time to first token, KV-cache capacity,
peak RSS and, when asked, the greedy tokens. The parent (`fasp_bench.serving.bench`) runs one such process
per checkpoint, so no model's memory or warm caches leak into another's numbers.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULT_TAG = "FASP_BENCH_RESULT "


def _peak_rss_bytes() -> int:
    """Largest VmHWM over this process and its descendants (with a separate engine, its worker holds the model)."""
    import psutil

    me = psutil.Process()
    peak = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            continue
    return peak


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
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    # The KV budget: the CPU backend reads VLLM_CPU_KVCACHE_SPACE (set by main); a GPU takes it as an engine
    # argument, in place of the gpu_memory_utilization fraction.
    budget = {"kv_cache_memory_bytes": spec["kv_cache_gib"] << 30} if current_platform.is_cuda_alike() else {}
    executor = {"distributed_executor_backend": "uni"} if spec["engine"] == "in-process" else {}
    started = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], enforce_eager=True, seed=spec["seed"],
              max_model_len=spec["input_len"] + spec["output_len"] + 8, max_num_seqs=max(spec["prompts"], 1),
              tensor_parallel_size=spec.get("tensor_parallel_size", 1), disable_log_stats=True, **budget, **executor)
    load_s = time.perf_counter() - started
    from fasp_bench.data import bos_id

    vocab = llm.llm_engine.model_config.get_vocab_size()
    bos = bos_id(llm.get_tokenizer())
    prompts = [TokensPrompt(prompt_token_ids=ids)
               for ids in prompt_token_ids(vocab, spec["prompts"], spec["input_len"], spec["seed"], bos)]
    params = SamplingParams(temperature=0, max_tokens=spec["output_len"], ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts[:1], first, use_tqdm=False)  # warm-up
    runs, ttft = [], []
    outputs = None
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        llm.generate(prompts[:1], first, use_tqdm=False)
        ttft.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        runs.append(time.perf_counter() - t0)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    cache = llm.llm_engine.vllm_config.cache_config
    result = {
        "output_tok_s": generated / statistics.median(runs),
        "output_tok_s_min": generated / max(runs),
        "output_tok_s_max": generated / min(runs),
        "output_tok_s_runs": [generated / run for run in runs],
        "total_tok_s": (generated + prompt_tokens) / statistics.median(runs),
        "ttft_s": statistics.median(ttft),
        "kv_cache_tokens": int(cache.num_gpu_blocks * cache.block_size),
        "peak_rss_bytes": _peak_rss_bytes(),
        "load_s": load_s,
        "generated_tokens": generated,
        "architecture": llm.llm_engine.model_config.architectures[0],
        "platform": current_platform.device_name,
        "bos": bos is not None,
    }
    if spec.get("return_tokens"):
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec["kv_cache_gib"]))
    print(RESULT_TAG + json.dumps(run(spec)), flush=True)


if __name__ == "__main__":  # vLLM's engine core is a spawned process: the LLM is created under this guard
    main()
