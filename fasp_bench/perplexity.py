"""Perplexity, SparseGPT/Wanda protocol: the text tokenised once, non-overlapping windows of `seqlen`
tokens, token-level NLL averaged over every predicted token, then exp. For a model trained with a BOS, every
window is <bos> + `seqlen - 1` text tokens, so every window is scored as the model expects to start.
Each window's mean NLL is returned too: the report's intervals and paired comparisons resample windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def ppl_windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                bos: int | None = None) -> torch.Tensor:
    """The scored windows [windows, seqlen]: consecutive text, each after a <bos> where the model has one."""
    ids = token_ids.flatten()
    text_len = seqlen - (bos is not None)
    windows = ids.numel() // text_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    chunks = ids[: windows * text_len].view(windows, text_len)
    if bos is not None:
        chunks = torch.cat([torch.full((windows, 1), bos, dtype=chunks.dtype), chunks], dim=1)
    return chunks


def summary(window_nll: list[float], seqlen: int, bos: bool) -> dict:
    """Perplexity from per-window mean NLLs: every window predicts the same number of tokens, so the token mean
    is the mean of the window means."""
    nll = math.fsum(window_nll) / len(window_nll)
    return {"ppl": math.exp(nll), "nll": nll, "windows": len(window_nll),
            "predicted_tokens": len(window_nll) * (seqlen - 1), "seqlen": seqlen, "bos": bos,
            "window_nll": window_nll}


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               batch_size: int = 4, progress: bool = True, desc: str = "ppl", bos: int | None = None) -> dict:
    chunks = ppl_windows(token_ids, seqlen, max_windows, bos)
    device = next(model.parameters()).device
    window_nll = []
    for batch in tqdm(chunks.split(batch_size), desc=desc, unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        # one window at a time: each row's logits are contiguous, so no (batch, vocab, seq) copy is made
        window_nll.extend(F.cross_entropy(row[:-1].float(), ids[1:]).item() for row, ids in zip(logits, batch))
    return summary(window_nll, seqlen, bos is not None)
