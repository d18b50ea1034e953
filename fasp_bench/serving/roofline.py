"""What pruning can at best buy when a model is served, from its config and dtype alone.

A decode step is memory-bound: it reads every matmul weight once (the block linears and the LM head) and the
KV cache of every sequence in the batch. A prefill is compute-bound: its cost is the FLOPs of the block linears
over every prompt token, the attention's two matmuls (causal, so about half the square) and the LM head for the
last token of each sequence (vLLM computes logits only where a token is sampled). The limit of a pruned
model's speed-up is the dense cost over its own; the share of the limit it realises is
(speed-up - 1) / (limit - 1), undefined for an unpruned model (limit 1).

Biases, norms and the embedding rows a step looks up are left out: they are under 0.1% of the bytes of
every model here. The KV cache is counted at the checkpoint's widths (narrow V as FASP leaves it); `padded_v`
counts it as an engine that stores V at the head size holds it (vLLM's CPU attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import PretrainedConfig

import pruning

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}



@dataclass(frozen=True)
class LayerCost:
    linear_params: int  # q, k, v, o and the FFN's linears
    query_heads: int
    kv_heads: int
    head_dim: int  # Q and K width per head
    v_head_dim: int
    window: int | None  # sliding-window attention: the most tokens a query sees

    def kv_width(self, padded_v: bool) -> int:
        """Cached values per token: K and V of every KV head."""
        return self.kv_heads * (self.head_dim + (self.head_dim if padded_v else self.v_head_dim))


@dataclass(frozen=True)
class ServingCost:
    layers: tuple[LayerCost, ...]
    head_params: int  # the LM head (the embedding table when tied)
    dtype_bytes: int

    @property
    def weight_bytes(self) -> int:
        """Matmul weights one decode step reads."""
        return (sum(layer.linear_params for layer in self.layers) + self.head_params) * self.dtype_bytes

    def kv_bytes_per_token(self, padded_v: bool = False) -> int:
        """K and V of one token in every layer (a layer with no KV head keeps no cache)."""
        return self.dtype_bytes * sum(layer.kv_width(padded_v) for layer in self.layers)

    def decode_bytes(self, batch: int, context: float, padded_v: bool = False) -> float:
        """Bytes one decode step reads with `batch` sequences of `context` tokens each in the cache."""
        kv = sum(layer.kv_width(padded_v) * _seen(context, layer.window) for layer in self.layers)
        return self.weight_bytes + batch * kv * self.dtype_bytes

    def prefill_flops(self, batch: int, prompt_len: int) -> float:
        """Matmul FLOPs of prefilling `batch` prompts of `prompt_len` tokens and sampling one token each."""
        per_sequence = 2 * self.head_params
        for layer in self.layers:
            pairs = sum(_seen(t, layer.window) for t in range(1, prompt_len + 1))  # (query, key) pairs, causal
            per_sequence += 2 * prompt_len * layer.linear_params
            per_sequence += 2 * pairs * layer.query_heads * (layer.head_dim + layer.v_head_dim)  # QK^T, then PV
        return batch * per_sequence


def _seen(context: float, window: int | None) -> float:
    return min(context, window) if window else context


def serving_cost(config: PretrainedConfig, dtype: str) -> ServingCost:
    """The serving cost of the model `config` describes (stock or pruned), with weights and cache in `dtype`."""
    adapter = pruning.get_adapter(config)
    family, hd, groups = adapter.family, adapter.head_dim, adapter.groups
    hidden = config.hidden_size
    window = getattr(config, "sliding_window", None)
    every = "sliding_attention" if window and getattr(config, "use_sliding_window", True) else "full_attention"
    types = getattr(config, "layer_types", None) or [every] * config.num_hidden_layers  # Mistral: every layer
    layers = []
    for shape, kind in zip(adapter.config_shapes(config), types, strict=True):
        n_kv, dv, q_heads = shape.kv_heads, shape.v_head_dim, shape.kv_heads * groups
        attention = hidden * (q_heads * hd + n_kv * hd + n_kv * dv) + q_heads * dv * hidden
        ffn = (len(family.ffn_producers) + 1) * hidden * shape.ffn_width
        layers.append(LayerCost(attention + ffn, q_heads, n_kv, hd, dv,
                                window if kind == "sliding_attention" else None))
    head_width = getattr(config, "word_embed_proj_dim", None) or hidden  # OPT projects before its head
    return ServingCost(tuple(layers), config.vocab_size * head_width, DTYPE_BYTES[dtype])


def limit(dense: float, pruned: float) -> float:
    """The most a pruned model can be faster: the dense model's cost over its own."""
    return dense / pruned


def share(speedup: float, limit: float) -> float | None:
    """The fraction of the possible gain realised; None where nothing was pruned (limit 1) or nothing measured."""
    if speedup is None or limit is None or math.isnan(speedup) or abs(limit - 1) < 1e-9:
        return None
    return (speedup - 1) / (limit - 1)
