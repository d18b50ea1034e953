"""vLLM attention whose V heads are narrower than Q/K heads, shared by the project architectures.

`Attention(head_size_v=dv)` sizes the KV cache for the narrow V. vLLM's CPU attention backend assumes equal
K and V widths (it corrupts memory otherwise), so on CPU V is zero-padded to the head size before attention
and the output sliced back: the weights stay narrow, the KV-cache saving is not realised there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.attention import Attention
from vllm.platforms import current_platform


def pads_v(head_dim: int, dv: int) -> bool:
    return dv != head_dim and current_platform.is_cpu()


def narrow_v_attention(n_q: int, n_kv: int, head_dim: int, dv: int, cache_config, quant_config,
                       prefix: str) -> Attention:
    return Attention(n_q, head_dim, head_dim**-0.5, num_kv_heads=n_kv, cache_config=cache_config,
                     quant_config=quant_config, prefix=prefix, head_size_v=head_dim if pads_v(head_dim, dv) else dv)


def attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_q: int, n_kv: int,
           head_dim: int, dv: int) -> torch.Tensor:
    """attn(q, k, v) -> [tokens, n_q * dv], padding V where the backend needs equal widths."""
    if not pads_v(head_dim, dv):
        return attn(q, k, v)
    v = F.pad(v.reshape(-1, n_kv, dv), (0, head_dim - dv)).reshape(-1, n_kv * head_dim)
    out = attn(q, k, v)
    return out.reshape(-1, n_q, head_dim)[..., :dv].reshape(-1, n_q * dv)


_QKV = tuple(f"{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias"))


def without_empty_qkv(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A layer with no heads left has empty q/k/v tensors in the checkpoint and no qkv_proj in vLLM."""
    return ((name, w) for name, w in weights if w.numel() or not name.endswith(_QKV))
