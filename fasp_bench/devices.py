"""Where each stage runs and in which precision: one default for pruning, evaluation and serving.

cuda when torch sees a GPU, else the CPU; bfloat16 on a GPU or on a CPU with native bf16 (AVX512-BF16/AMX),
float32 on a CPU without it, where emulated bf16 is about 3x slower.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from .errors import BenchError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


NATIVE_BF16_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX"}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def native_bf16_features(cpuinfo: str) -> list[str]:
    """The native bf16 instruction sets a /proc/cpuinfo text lists (whole flags only), as report labels."""
    flags = set(re.findall(r"\S+", " ".join(re.findall(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE))))
    return [label for flag, label in NATIVE_BF16_FLAGS.items() if flag in flags]


def cpu_has_native_bf16() -> bool:
    return bool(native_bf16_features(_cpuinfo()))


def machine_description(cpuinfo: str | None = None) -> str:
    """The machine a run's timings came from, for the report header: timings compare only within one CPU model,
    and whether bf16 is native decides both the default dtype and how fast it runs."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    name = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    cpu = re.sub(r"\s+", " ", name.group(1)).strip() if name else (platform.processor() or "unknown CPU")
    native = native_bf16_features(cpuinfo)
    bf16 = f"native bf16 ({', '.join(native)})" if native else "no native bf16"
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {bf16}, {platform.machine()}, {os.cpu_count()} cores{gpu}, {platform.platform()}"


def default_dtype(gpu: bool) -> str:
    return "bfloat16" if gpu or cpu_has_native_bf16() else "float32"


def resolve_device(device: str | None) -> torch.device:
    """`device` checked against what this machine has; None: cuda when present, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise BenchError(f"unknown device {device!r}: give cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise BenchError(f"device {device} is not supported: give cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            seen = f"{count} CUDA GPU(s)" if count else "no CUDA GPU here"
            raise BenchError(f"device {device} requested but torch sees {seen}: pass --device cpu or another GPU")
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    """`dtype` checked; None: the default for `device`."""
    if dtype is None:
        return default_dtype(device.type == "cuda")
    if dtype not in DTYPES:
        raise BenchError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    return dtype
