"""Benchmarks that print ratios (targets live here, not in timed tests): prune speed and prune memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import pruning

from .data import calibration_ids
from .devices import DTYPES
from .models import load_model
from .prune_job import PruneJob


def prune_speed(job: PruneJob) -> str:
    """Prune wall time / one dense forward over the same calibration tokens (target <= 2.5)."""
    job = job.check()
    device = torch.device(job.device)
    model, tokenizer = load_model(job.model, DTYPES[job.dtype])
    model.to(device)
    ids = calibration_ids(tokenizer, job.nsamples, job.seqlen, job.seed, job.data_root)
    with torch.no_grad():
        model(input_ids=ids[: job.batch_size].to(device), use_cache=False)  # warm-up
        _sync(device)
        started = time.perf_counter()
        for batch in ids.split(job.batch_size):
            model(input_ids=batch.to(device), use_cache=False)
        _sync(device)
        forward = time.perf_counter() - started
    started = time.perf_counter()
    pruning.prune(model, method=job.method, sparsity=job.sparsity, calibration=ids, batch_size=job.batch_size,
                  device=device, offload_activations=job.offload_activations, **job.options)
    _sync(device)
    prune_time = time.perf_counter() - started
    return (f"device {device}, {job.dtype}; {ids.shape[0]}x{ids.shape[1]} calibration tokens; dense forward "
            f"{forward:.2f} s; {job.method} prune {prune_time:.2f} s; ratio {prune_time / forward:.2f} "
            "(target <= 2.5)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# Peak from VmHWM, not ru_maxrss: Linux carries the parent's peak RSS across fork+exec into ru_maxrss.
_PRUNE_AND_REPORT_PEAK = textwrap.dedent("""
    import json, re, sys, time, torch
    import pruning
    source, out, method, vocab = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    calibration = torch.randint(0, vocab, (8, 128), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    pruning.prune_pretrained(source, out, method=method, sparsity=0.2, calibration=calibration, device="cpu",
                             progress=False)
    status = open("/proc/self/status").read()
    peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024
    print(json.dumps({"peak_rss": peak, "seconds": time.perf_counter() - started}))
""")


def memory_config(layers: int) -> LlamaConfig:
    """The issue's Llama shape: hidden 2048, FFN 8192, 32 heads, 8 KV heads."""
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def prune_memory(method: str = "fasp", depths: tuple[int, int] = (16, 8), work_dir: str | None = None) -> str:
    """Peak host RSS while streaming-pruning a random-init float32 Llama of `depths[0]` layers / its
    `depths[1]`-layer twin (target <= 1.1: memory does not grow with depth), each in a fresh process."""
    root = Path(tempfile.mkdtemp(prefix="prune-memory-", dir=work_dir))
    lines, peaks = [], {}
    try:
        for layers in depths:
            source, out = root / f"llama-{layers}", root / f"llama-{layers}-pruned"
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(memory_config(layers))
            model.save_pretrained(source, max_shard_size="1GB")
            del model
            size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
            proc = subprocess.run([sys.executable, "-c", _PRUNE_AND_REPORT_PEAK, str(source), str(out), method,
                                   "32000"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"pruning the {layers}-layer model failed: {proc.stderr.strip()[-2000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            peaks[layers] = result["peak_rss"]
            peak = result["peak_rss"]
            lines.append(f"{layers} layers: checkpoint {size / 2**30:.2f} GiB, peak RSS {peak / 2**30:.2f} GiB "
                         f"({peak / size:.2f} x checkpoint), {method} {result['seconds']:.0f} s")
            shutil.rmtree(source)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    deep, shallow = depths
    lines.append(f"peak RSS ratio {deep}/{shallow} layers: {peaks[deep] / peaks[shallow]:.2f} (target <= 1.1)")
    return "\n".join(lines)


def gemm_widths(hidden: int = 2048, width: int = 5461, tokens: int = 512, dtype: str = "float32",
                device: str = "cpu", repeats: int = 20) -> str:
    """Throughput of an FFN's matmuls (x @ W_up, then @ W_down) at a pruned width and at that width rounded
    down to multiples of 8..256: how much an aligned width buys on this hardware (the README's --round-to)."""
    dev, dt = torch.device(device), DTYPES[dtype]
    lines = [f"{device} {dtype}: tokens {tokens}, hidden {hidden}, FFN width rounded down to a multiple of N"]
    for multiple in (1, 8, 16, 32, 64, 128, 256):
        w = width // multiple * multiple
        x = torch.randn(tokens, hidden, device=dev, dtype=dt)
        up, down = torch.randn(hidden, w, device=dev, dtype=dt), torch.randn(w, hidden, device=dev, dtype=dt)
        for _ in range(3):
            (x @ up) @ down
        _sync(dev)
        started = time.perf_counter()
        for _ in range(repeats):
            (x @ up) @ down
        _sync(dev)
        seconds = (time.perf_counter() - started) / repeats
        lines.append(f"N={multiple:<4d} width {w}: {4 * tokens * hidden * w / seconds / 1e9:8.1f} GFLOP/s")
    return "\n".join(lines)
