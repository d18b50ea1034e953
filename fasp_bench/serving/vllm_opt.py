"""`PrunedOPTForCausalLM` in vLLM. OPT's own attention derives the head size from hidden_size / heads, which a
per-layer head count breaks, so the attention is built here; narrow V, added biases and layers with no heads
use the same pieces as every other family (vllm_pruned.py). Everything else is vLLM's own OPT.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.models import opt as vllm_opt
from vllm.model_executor.models.utils import extract_layer_index

from .vllm_pruned import NarrowVRowLinear, NoHeadsAttention, PaddedVQKVLinear, without_empty_attention


class PrunedOPTAttention(nn.Module):
    def __init__(self, config, layer: int, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__()
        hidden = config.hidden_size
        head_dim = hidden // config.num_attention_heads
        n, dv, bias = config.kv_heads[layer], config.v_head_dims[layer], config.enable_bias
        out_bias = bias or config.attn_output_bias
        narrow = dv != head_dim
        qkv_cls, out_cls = (PaddedVQKVLinear, NarrowVRowLinear) if narrow else (QKVParallelLinear, RowParallelLinear)
        self.qkv_proj = qkv_cls(hidden, head_dim, n, n, bias=bias, quant_config=quant_config, v_head_size=dv,
                                prefix=f"{prefix}.qkv_proj")
        self.out_proj = out_cls(n * dv, hidden, bias=out_bias, quant_config=quant_config, prefix=f"{prefix}.out_proj")
        if narrow:
            self.out_proj.head_dim, self.out_proj.width = head_dim, dv
        self.attn = Attention(n, head_dim, head_dim**-0.5, num_kv_heads=n, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.chunk(3, dim=-1)  # V is padded to the head size: three equal parts
        return self.out_proj(self.attn(q, k, v))[0]


class PrunedOPTDecoderLayer(vllm_opt.OPTDecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = ""):
        layer = extract_layer_index(prefix)
        config = copy.copy(config)
        config.ffn_dim = config.ffn_widths[layer]
        super().__init__(config, cache_config, quant_config, prefix=prefix)
        if config.kv_heads[layer] == 0:
            self.self_attn = NoHeadsAttention(config.hidden_size, config.enable_bias or config.attn_output_bias,
                                              self.fc1.weight.dtype, output_name="out_proj")
        else:
            self.self_attn = PrunedOPTAttention(config, layer, cache_config, quant_config,
                                                prefix=f"{prefix}.self_attn")
        if config.ffn_output_bias and self.fc2.bias is None:
            self.fc2 = RowParallelLinear(config.ffn_dim, config.hidden_size, bias=True, quant_config=quant_config,
                                         prefix=f"{prefix}.fc2")


@contextmanager
def _pruned_layers():
    """vLLM's OPTDecoder builds its layers by the module-level name; point it at the pruned layer meanwhile.

    The stock layer's own attention is never built: building it would register a second attention
    under the same layer name.
    """
    stock_layer, stock_attention = vllm_opt.OPTDecoderLayer, vllm_opt.OPTAttention
    vllm_opt.OPTDecoderLayer = PrunedOPTDecoderLayer
    vllm_opt.OPTAttention = _NoAttention
    try:
        yield
    finally:
        vllm_opt.OPTDecoderLayer, vllm_opt.OPTAttention = stock_layer, stock_attention


class _NoAttention(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()


class PrunedOPTForCausalLM(vllm_opt.OPTForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        with _pruned_layers():
            super().__init__(vllm_config=vllm_config, prefix=prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(without_empty_attention(weights))
