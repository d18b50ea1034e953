"""`PrunedLlamaForCausalLM` in vLLM: per-layer FFN widths, per-layer KV-head counts, narrower V heads
(see narrow_v.py), added output biases. Everything else is vLLM's own LLaMA.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from .narrow_v import attend, narrow_v_attention, without_empty_qkv


class PrunedLlamaAttention(nn.Module):
    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int,
                 max_position_embeddings: int = 8192, quant_config=None, bias: bool = False,
                 bias_o_proj: bool = False, cache_config=None, prefix: str = "", **_):
        super().__init__()
        layer = extract_layer_index(prefix)
        self.head_dim = config.head_dim or hidden_size // num_heads
        self.n_kv, self.dv = config.kv_heads[layer], config.v_head_dims[layer]
        self.n_q = self.n_kv * (num_heads // num_kv_heads)
        self.o_proj = RowParallelLinear(self.n_q * self.dv, hidden_size, quant_config=quant_config,
                                        bias=bias_o_proj or config.attn_output_bias, prefix=f"{prefix}.o_proj")
        if self.n_kv * self.dv == 0:  # every head of this layer pruned: the output is o_proj's bias
            return
        self.qkv_proj = QKVParallelLinear(hidden_size, self.head_dim, self.n_q, self.n_kv, bias=bias,
                                          quant_config=quant_config, v_head_size=self.dv, prefix=f"{prefix}.qkv_proj")
        self.rotary_emb = get_rope(self.head_dim, max_position=max_position_embeddings,
                                   rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)
        self.attn = narrow_v_attention(self.n_q, self.n_kv, self.head_dim, self.dv, cache_config, quant_config,
                                       prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.n_kv * self.dv == 0:
            out = hidden_states.new_zeros(hidden_states.shape[0], 0)
            return self.o_proj(out)[0]
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.n_q * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.dv], dim=-1)
        # vLLM's CPU rotary kernel crashes in bf16 on q/k views whose row stride is not the stock q+2kv width
        q, k = self.rotary_emb(positions, q.contiguous(), k.contiguous())
        return self.o_proj(attend(self.attn, q, k, v, self.n_q, self.n_kv, self.head_dim, self.dv))[0]


class PrunedLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None, **_):
        config = copy.copy(config or vllm_config.model_config.hf_config)
        layer = extract_layer_index(prefix)
        config.intermediate_size = config.ffn_widths[layer]  # the stacked gate/up loader reads this width
        super().__init__(vllm_config, prefix, config=config, attn_layer_type=PrunedLlamaAttention)
        if config.ffn_output_bias and self.mlp.down_proj.bias is None:
            self.mlp.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True,
                                                   quant_config=self.get_quant_config(vllm_config),
                                                   prefix=f"{prefix}.mlp.down_proj")


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PrunedLlamaDecoderLayer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(without_empty_qkv(weights))
