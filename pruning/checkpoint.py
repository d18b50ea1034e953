"""Pruned models as normal Hugging Face folders: safetensors + config + tokenizer + pruning.json.

Writes are atomic: everything goes to a hidden temporary folder beside the target, which is renamed
into place only when complete, so a crash never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import AutoModelForCausalLM, PreTrainedModel

from .errors import PruningError

METADATA_FILE = "pruning.json"


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing target unless asked to overwrite, and an unwritable parent: before any work."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise PruningError(f"output folder {out} already exists: pass --overwrite or choose another --out")
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise PruningError(f"cannot write under {probe}: choose a writable --out")
    return out


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out_dir`, on failure it is removed."""
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fingerprinted_files(folder: Path) -> list[Path]:
    """What fixes a model's outputs: config, tokenizer (how text is cut, whether windows start with BOS), weights."""
    tokenizer = [folder / name for name in ("tokenizer.json", "tokenizer_config.json") if (folder / name).is_file()]
    return [folder / "config.json", *tokenizer, *sorted(folder.glob("*.safetensors")), *sorted(folder.glob("*.bin"))]


def content_fingerprint(folder: str | os.PathLike) -> str:
    """Content hash of a model folder's fingerprinted files: the results-store identity of a model."""
    digest = hashlib.sha256()
    for file in fingerprinted_files(Path(folder)):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:20]


def file_signature(folder: str | os.PathLike) -> dict[str, list[int]]:
    """Name -> [size, mtime_ns] of the fingerprinted files: cheap to compare, changes when a file is rewritten."""
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in fingerprinted_files(Path(folder))}


def record_fingerprint(folder: str | os.PathLike) -> dict:
    """The fingerprint of a checkpoint being written, recorded in its pruning.json so no stage re-hashes it."""
    return {"sha256_20": content_fingerprint(folder), "files": file_signature(folder)}


def recorded_fingerprint(folder: str | os.PathLike) -> str | None:
    """The fingerprint pruning.json recorded, if the files are still the ones it was computed on."""
    try:
        recorded = (read_metadata(folder) or {}).get("fingerprint")
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or recorded.get("files") != file_signature(folder):
        return None
    return recorded.get("sha256_20")


def save_pruned(model: PreTrainedModel, out_dir: str | os.PathLike, metadata: dict, *, tokenizer=None,
                overwrite: bool = False, extra: Callable[[Path], None] | None = None) -> Path:
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        metadata = {**metadata, "fingerprint": record_fingerprint(tmp)}
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return Path(out_dir)


def read_metadata(path: str | os.PathLike) -> dict | None:
    file = Path(path) / METADATA_FILE
    return json.loads(file.read_text()) if file.exists() else None


def load_pruned(path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """Plain `from_pretrained`; the import of this package has registered the project architectures."""
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
