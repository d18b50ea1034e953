"""Evaluation and calibration data, offline-first.

With `FASP_BENCH_DATA` (or `--data DIR`) the shipped files are read; without it the same sets are
loaded through `datasets` from the hub. C4 documents 0-499 of the shipped train shard are the
calibration pool; 500-999 are held out for evaluation ("c4-heldout"), so the two never overlap.
"""

from __future__ import annotations

import gzip
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
PERPLEXITY_SETS = ("wikitext2", "c4")


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
    generator = torch.Generator().manual_seed(seed)
    texts = c4_documents(root, CALIBRATION_DOCS)
    order = torch.randperm(len(texts), generator=generator).tolist()
    encoded = tokenizer([texts[i] for i in order], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream = torch.tensor([t for doc in encoded for t in (*doc, eos)], dtype=torch.long)
    if len(stream) <= seqlen:
        raise BenchError(f"calibration text has {len(stream)} tokens, fewer than --seqlen {seqlen}: lower --seqlen")
    bos = bos_id(tokenizer)
    text_len = seqlen - (bos is not None)  # a BOS model gets <bos> first in every window
    starts = torch.randint(0, len(stream) - text_len + 1, (nsamples,), generator=generator)
    windows = torch.stack([stream[s:s + text_len] for s in starts.tolist()])
    return windows if bos is None else torch.cat([torch.full((nsamples, 1), bos), windows], dim=1)


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
    """What a perplexity set resolves to: wikitext2, c4-heldout (offline) or c4-validation (hub)."""
    if name not in PERPLEXITY_SETS:
        raise BenchError(f"unknown perplexity set {name!r}: choose from {', '.join(PERPLEXITY_SETS)}")
    return {"wikitext2": "wikitext2", "c4": "c4-validation" if root is None else "c4-heldout"}[name]


def perplexity_text(name: str, root: Path | None) -> str:
    perplexity_dataset(name, root)
    return wikitext2_test_text(root) if name == "wikitext2" else c4_eval_text(root)
