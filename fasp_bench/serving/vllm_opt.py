"""`PrunedOPTForCausalLM` in vLLM: per-layer FFN widths and head counts, narrower V heads (see narrow_v.py),
added output biases. Everything else is vLLM's own OPT.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.models import opt as vllm_opt
from vllm.model_executor.models.utils import extract_layer_index

from .narrow_v import attend, narrow_v_attention, without_empty_qkv


class PrunedOPTAttention(nn.Module):
    def __init__(self, config, layer: int, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__()
        hidden = config.hidden_size
        self.head_dim = hidden // config.num_attention_heads
        self.n, self.dv = config.kv_heads[layer], config.v_head_dims[layer]
        bias = config.enable_bias
        self.out_proj = RowParallelLinear(self.n * self.dv, hidden, bias=bias or config.attn_output_bias,
                                          quant_config=quant_config, prefix=f"{prefix}.out_proj")
        if self.n * self.dv == 0:  # every head of this layer pruned: the output is out_proj's bias
            return
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, self.n, self.n, bias=bias, quant_config=quant_config,
                                          v_head_size=self.dv, prefix=f"{prefix}.qkv_proj")
        self.attn = narrow_v_attention(self.n, self.n, self.head_dim, self.dv, cache_config, quant_config,
                                       prefix=f"{prefix}.attn")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.n * self.dv == 0:
            return self.out_proj(hidden_states.new_zeros(hidden_states.shape[0], 0))[0]
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.n * self.head_dim, self.n * self.head_dim, self.n * self.dv], dim=-1)
        return self.out_proj(attend(self.attn, q, k, v, self.n, self.n, self.head_dim, self.dv))[0]


class PrunedOPTDecoderLayer(vllm_opt.OPTDecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = ""):
        layer = extract_layer_index(prefix)
        config = copy.copy(config)
        config.ffn_dim = config.ffn_widths[layer]
        super().__init__(config, cache_config, quant_config, prefix=prefix)
        self.self_attn = PrunedOPTAttention(config, layer, cache_config, quant_config, prefix=f"{prefix}.self_attn")
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
        return super().load_weights(without_empty_qkv(weights))
