"""The machine line a report's timings are attributed to: the CPU model and whether bf16 is native."""

import pytest

from fasp_bench.devices import machine_description, resolve_device, resolve_dtype
from fasp_bench.errors import BenchError

AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R)   Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""
AVX2 = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx2 fma
"""


def test_machine_names_cpu_model_and_native_bf16():
    line = machine_description(AMX)
    assert line.startswith("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, native bf16 (AVX512-BF16, AMX), ")


def test_machine_without_bf16_flags_says_so():
    line = machine_description(AVX2)
    assert line.startswith("AMD EPYC 7B13, no native bf16, ")
    # a flag that only contains the name (avx512_bf16x) must not count: flags are whole words
    assert "no native bf16" in machine_description(AVX2.replace("fma", "avx512_bf16x"))


def test_unknown_device_and_dtype_are_one_line_errors():
    with pytest.raises(BenchError, match="unknown device"):
        resolve_device("tpu:0:x")
    with pytest.raises(BenchError, match="unknown dtype 'int3'"):
        resolve_dtype("int3", resolve_device("cpu"))
