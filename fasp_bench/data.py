"""Evaluation and calibration data, offline-first.

With `FASP_BENCH_DATA` (or `--data DIR`) the shipped files are read; without it the same sets are
loaded through `datasets` from the hub. C4 documents 0-499 of the shipped train shard are the
calibration pool; 500-999 are held out for evaluation ("c4-heldout"), so the two never overlap.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import BenchError

DATA_ENV = "FASP_BENCH_DATA"
C4_SHARD = "c4/c4-train.00000-of-01024.first1000.jsonl.gz"
WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"
CALIBRATION_DOCS = range(0, 500)
HELDOUT_DOCS = range(500, 1000)
C4_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_WINDOWS = 256  # SparseGPT's C4 protocol scores the first 256 * seqlen tokens
PERPLEXITY_SETS = ("wikitext2", "c4", "c4-calval")  # c4-calval: calibration-side validation, not a test set


def data_dir(flag: str | None = None) -> Path | None:
    """The offline data folder (`--data` beats `FASP_BENCH_DATA`), or None to use the hub."""
    value = flag or os.environ.get(DATA_ENV)
    if not value:
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        source = "--data" if flag else DATA_ENV
        raise BenchError(f"data directory {root} (from {source}) does not exist: point {DATA_ENV} or --data "
                         "at the folder that holds c4/ and wikitext-2-raw/")
    return root


def data_file(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise BenchError(f"missing data file {path}: {DATA_ENV} (or --data) must point at a folder with {relative}")
    return path


def c4_documents(root: Path | None, docs: range) -> list[str]:
    """Texts of documents `docs` of C4 en train shard 0."""
    if root is None:
        from datasets import load_dataset

        shard = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                             split="train")
        return list(shard.select(docs)["text"])
    with gzip.open(data_file(root, C4_SHARD), "rt", encoding="utf-8") as lines:
        texts = [json.loads(line)["text"] for _, line in zip(range(docs.stop), lines)]
    if len(texts) < docs.stop:
        raise BenchError(f"{root / C4_SHARD} has only {len(texts)} documents, {docs.stop} needed: re-stage the data")
    return texts[docs.start:docs.stop]


def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer's convention is to start every sequence with it (Llama, Gemma), else None.

    Calibration windows, perplexity windows, lm-eval requests and serving prompts then all start with it: a
    model trained with a BOS degenerates without one (Gemma-3: WikiText-2 ppl 61.6 instead of 23.2).
    """
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None


def calibration_ids(tokenizer, nsamples: int, seqlen: int, seed: int = 0, root: Path | None = None,
                    ) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens from C4 documents 0-499, as LongTensor [nsamples, seqlen].

    The documents are shuffled with `seed`, joined with EOS into one token stream, and windows start at
    seeded random offsets. (GPTQ/Wanda draw random documents longer than seqlen from the 356k-document
    shard; with 500 documents only 18 exceed 2048 SmolLM2 tokens, so windows may cross documents here.)
    """
    if nsamples < 1 or seqlen < 2:
        raise BenchError(f"calibration needs nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    stream, starts, text_len = _calibration_draw(tokenizer, nsamples, seqlen, seed, root)
    windows = torch.stack([stream[s:s + text_len] for s in starts.tolist()])
    bos = bos_id(tokenizer)
    return windows if bos is None else torch.cat([torch.full((nsamples, 1), bos), windows], dim=1)


def _calibration_draw(tokenizer, nsamples: int, seqlen: int, seed: int, root: Path | None,
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The calibration token stream, the window starts of a draw of `nsamples`, and the text tokens per window.
    A draw of n windows is the first n of any larger draw with the same seed."""
    generator = torch.Generator().manual_seed(seed)
    texts = c4_documents(root, CALIBRATION_DOCS)
    order = torch.randperm(len(texts), generator=generator).tolist()
    encoded = tokenizer([texts[i] for i in order], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream = torch.tensor([t for doc in encoded for t in (*doc, eos)], dtype=torch.long)
    if len(stream) <= seqlen:
        raise BenchError(f"calibration text has {len(stream)} tokens, fewer than --seqlen {seqlen}: lower --seqlen")
    text_len = seqlen - (bos_id(tokenizer) is not None)  # a BOS model gets <bos> first in every window
    return stream, torch.randint(0, len(stream) - text_len + 1, (nsamples,), generator=generator), text_len


# The calibration-side validation set avoids every calibration draw of up to this many windows.
VALIDATION_AVOIDS = 128


def _calibration_validation_layout(tokenizer, seqlen: int, seed: int, root: Path | None,
                                   ) -> tuple[torch.Tensor, list[int], int]:
    """The calibration token stream, the starts of the c4-calval windows in it, and their text length."""
    stream, starts, text_len = _calibration_draw(tokenizer, VALIDATION_AVOIDS, seqlen, seed, root)
    covered = torch.zeros(len(stream) + 1, dtype=torch.int32)
    for start in starts.tolist():
        covered[start] += 1
        covered[start + text_len] -= 1
    free = covered.cumsum(0)[:-1] == 0
    windows, pos = [], 0
    while pos + text_len <= len(stream):
        blocked = (~free[pos:pos + text_len]).nonzero()
        if len(blocked):
            pos += int(blocked[-1]) + 1
        else:
            windows.append(pos)
            pos += text_len
    return stream, windows, text_len


def calibration_validation_ids(tokenizer, seqlen: int, seed: int = 0, root: Path | None = None) -> torch.Tensor:
    """Text tokens of the calibration documents (C4 docs 0-499) that no calibration draw of up to 128 windows
    of `seqlen` with `seed` touches, as consecutive windows of `seqlen` (less one for a BOS model) laid end to
    end: perplexity on them ("c4-calval") chooses settings without looking at any test set."""
    stream, windows, text_len = _calibration_validation_layout(tokenizer, seqlen, seed, root)
    if not windows:
        raise BenchError(f"no calibration-side validation window of {seqlen} tokens is left: lower --seqlen")
    return torch.cat([stream[w:w + text_len] for w in windows])


def training_ids(tokenizer, seqlen: int, validation_seqlen: int, seed: int = 0, root: Path | None = None,
                 ) -> torch.Tensor:
    """Every calibration-side token that c4-calval (at `validation_seqlen`, `seed`) does not hold, as windows of
    `seqlen` [n, seqlen] (a BOS model's start with <bos>) in a seeded order: recovery training text. The gaps
    between c4-calval windows are cut into windows; a remainder shorter than a window is left out."""
    stream, windows, val_len = _calibration_validation_layout(tokenizer, validation_seqlen, seed, root)
    bos = bos_id(tokenizer)
    text_len = seqlen - (bos is not None)
    if text_len < 1:
        raise BenchError(f"a recovery window of {seqlen} tokens holds no text: raise --seqlen")
    gaps = zip([0] + [w + val_len for w in windows], windows + [len(stream)])
    starts = [s for lo, hi in gaps for s in range(lo, hi - text_len + 1, text_len)]
    if not starts:
        raise BenchError(f"no calibration-side text is left outside c4-calval for windows of {seqlen}: lower --seqlen")
    order = torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed)).tolist()
    out = torch.stack([stream[starts[i]:starts[i] + text_len] for i in order])
    return out if bos is None else torch.cat([torch.full((len(out), 1), bos), out], dim=1)


def calibration_record(tokenizer, nsamples: int, seqlen: int, seed: int, root: Path | None) -> dict:
    """What pruning.json records about the calibration windows `calibration_ids` returns."""
    return {"dataset": f"c4-train docs {CALIBRATION_DOCS.start}-{CALIBRATION_DOCS.stop - 1} "
                       + ("(shipped shard)" if root is not None else "(hub)"),
            "documents": [CALIBRATION_DOCS.start, CALIBRATION_DOCS.stop], "nsamples": nsamples, "seqlen": seqlen,
            "seed": seed, "bos": "<bos> first in every window" if bos_id(tokenizer) is not None else "none"}


def wikitext2_test_text(root: Path | None) -> str:
    """The WikiText-2 raw test split joined with "\\n\\n" (the SparseGPT/Wanda perplexity text)."""
    if root is None:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    else:
        raw = data_file(root, WIKITEXT2_TEST).read_text(encoding="utf-8")
        # The hub rows: blank lines (a single space) are "", text lines keep their newline.
        rows = ["" if line.strip() == "" else line + "\n" for line in raw.split("\n")[:-1]]
    return "\n\n".join(rows)



def c4_eval_text(root: Path | None) -> str:
    """C4 perplexity text, documents joined with " " as SparseGPT does.

    Hub: the first 1100 documents of validation shard 0 ("c4-validation"). Offline: documents 500-999 of
    the shipped train shard ("c4-heldout"), which calibration (documents 0-499) never sees.
    """
    if root is None:
        from datasets import load_dataset

        shard = load_dataset("allenai/c4", data_files={"validation": C4_VALIDATION}, split="validation")
        return " ".join(shard.select(range(1100))["text"])
    return " ".join(c4_documents(root, HELDOUT_DOCS))


def perplexity_dataset(name: str, root: Path | None) -> str:
    """What a perplexity set resolves to: wikitext2, c4-heldout (offline) or c4-validation (hub), c4-calval."""
    if name not in PERPLEXITY_SETS:
        raise BenchError(f"unknown perplexity set {name!r}: choose from {', '.join(PERPLEXITY_SETS)}")
    return {"wikitext2": "wikitext2", "c4": "c4-validation" if root is None else "c4-heldout",
            "c4-calval": "c4-calval"}[name]


def perplexity_text(name: str, root: Path | None) -> str:
    perplexity_dataset(name, root)
    return wikitext2_test_text(root) if name == "wikitext2" else c4_eval_text(root)


# Token ids per (set, tokenizer files, seqlen, data, seed), kept for the process: every checkpoint of a run carries
# its dense model's tokenizer, and tokenizing the whole WikiText-2 test text takes seconds per model.
_PERPLEXITY_IDS: dict[tuple, torch.Tensor] = {}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt")


def tokenizer_identity(tokenizer) -> str | None:
    """A digest of the files that decide how a tokenizer loaded from a folder splits text; None when it was not
    loaded from a folder (nothing to compare another tokenizer with)."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    files = [folder / name for name in _TOKENIZER_FILES if (folder / name).is_file()] if folder.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def perplexity_ids(name: str, tokenizer, seqlen: int, root: Path | None, seed: int = 0) -> torch.Tensor:
    """The token ids a perplexity set is scored on, [1, n]: a test text tokenized once, or c4-calval's windows."""
    identity = tokenizer_identity(tokenizer)
    key = (perplexity_dataset(name, root), identity, seqlen, str(root), seed)
    if identity is not None and key in _PERPLEXITY_IDS:
        return _PERPLEXITY_IDS[key].clone()
    if key[0] == "c4-calval":
        ids = calibration_validation_ids(tokenizer, seqlen, seed, root)[None]
    else:
        ids = tokenizer(perplexity_text(name, root), add_special_tokens=False, return_tensors="pt").input_ids
    if identity is not None:
        _PERPLEXITY_IDS[key] = ids.clone()
    return ids
