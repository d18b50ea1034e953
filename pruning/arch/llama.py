"""LLaMA family (LLaMA, Mistral-style GQA, SmolLM2): adapter and the project architecture.

Coupled pairs: FFN `gate_proj` + `up_proj` rows / `down_proj` columns; attention `v_proj` rows /
`o_proj` columns. With GQA, V row (h, d) of KV head h feeds the O column of dimension d of every
query head in h's group: query head h*g + j reads KV head h (transformers' `repeat_kv` order).

`PrunedLlama*` holds checkpoints whose layers are not stock: per-layer FFN widths, per-layer KV-head
counts, V heads narrower than Q/K heads, output biases added by compensation. Its modules read their
widths from their linears' shapes, so cutting the linears is all surgery has to do.
"""

from __future__ import annotations

import copy

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaModel,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .base import ArchAdapter, Coupling, LayerShape


@strict
class PrunedLlamaConfig(LlamaConfig):
    model_type = "pruned_llama"
    ffn_widths: list[int] | None = None
    kv_heads: list[int] | None = None
    v_head_dims: list[int] | None = None
    attn_output_bias: bool = False
    ffn_output_bias: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers
        self.ffn_widths = list(self.ffn_widths or [self.intermediate_size] * n)
        self.kv_heads = list(self.kv_heads or [self.num_key_value_heads] * n)
        self.v_head_dims = list(self.v_head_dims or [self.head_dim] * n)


class PrunedLlamaAttention(LlamaAttention):
    """GQA attention with a per-layer KV-head count and V width; zero heads leave only o_proj's bias."""

    def __init__(self, config: PrunedLlamaConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        n_kv, dv, hidden = config.kv_heads[layer_idx], config.v_head_dims[layer_idx], config.hidden_size
        n_q = n_kv * self.num_key_value_groups
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden, n_q * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, n_kv * dv, bias=bias)
        self.o_proj = nn.Linear(n_q * dv, hidden, bias=bias or config.attn_output_bias)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        n_kv = self.k_proj.out_features // self.head_dim
        n_q = n_kv * self.num_key_value_groups
        dv = self.v_proj.out_features // n_kv if n_kv else 0
        q = self.q_proj(hidden_states).view(*input_shape, n_q, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(*input_shape, n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*input_shape, n_kv, dv).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:  # updated even when empty, so the cache keeps counting tokens
            k, v = past_key_values.update(k, v, self.layer_idx)
        if n_q * dv == 0:
            out = hidden_states.new_zeros(*input_shape, 0)
            return self.o_proj(out), None
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(
            self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, n_q * dv).contiguous()), weights


class PrunedLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: PrunedLlamaConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = PrunedLlamaAttention(config, layer_idx)
        mlp_config = copy.copy(config)
        mlp_config.intermediate_size = config.ffn_widths[layer_idx]
        self.mlp = LlamaMLP(mlp_config)
        if config.ffn_output_bias and self.mlp.down_proj.bias is None:
            self.mlp.down_proj = nn.Linear(config.ffn_widths[layer_idx], config.hidden_size, bias=True)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class PrunedLlamaModel(LlamaModel):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(PrunedLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        self.model = PrunedLlamaModel(config)
        self.post_init()


class LlamaAdapter(ArchAdapter):
    stock_model_types = ("llama",)
    attn_output = "self_attn.o_proj"
    ffn_output = "mlp.down_proj"
    ffn_width_key = "intermediate_size"
    stock_model_cls = LlamaForCausalLM
    project_model_cls = PrunedLlamaForCausalLM
    project_config_cls = PrunedLlamaConfig

    def layers(self, model):
        return model.model.layers

    def prunable_linears(self, layer):
        a, m = layer.self_attn, layer.mlp
        return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]

    def _attn_dims(self, layer) -> tuple[int, int, int, int]:
        a = layer.self_attn
        hd = a.head_dim
        n_kv = a.k_proj.out_features // hd
        dv = a.v_proj.out_features // n_kv if n_kv else 0
        return n_kv, a.num_key_value_groups, hd, dv

    def couplings(self, layer, attention_unit):
        width = layer.mlp.gate_proj.out_features
        neurons = torch.arange(width)[:, None]
        mlp = Coupling("mlp", {"mlp.gate_proj": neurons, "mlp.up_proj": neurons}, "mlp.down_proj", neurons)
        n_kv, g, hd, dv = self._attn_dims(layer)
        if n_kv * dv == 0:
            return [mlp]
        heads, members, dims = torch.arange(n_kv), torch.arange(g), torch.arange(dv)
        # o_proj column of (kv head h, query j in its group, V dimension d)
        o_cols = ((heads[:, None, None] * g + members[None, :, None]) * dv + dims[None, None, :])
        if attention_unit == "channel":
            units = torch.arange(n_kv * dv)[:, None]
            columns = o_cols.permute(0, 2, 1).reshape(n_kv * dv, g)
            attn = Coupling("attn", {"self_attn.v_proj": units}, "self_attn.o_proj", columns, groups=n_kv)
        elif attention_unit == "head":
            q_rows = (heads[:, None] * g + members[None, :])[:, :, None] * hd + torch.arange(hd)
            k_rows = heads[:, None] * hd + torch.arange(hd)
            v_rows = heads[:, None] * dv + dims
            producers = {"self_attn.q_proj": q_rows.reshape(n_kv, -1), "self_attn.k_proj": k_rows,
                         "self_attn.v_proj": v_rows}
            attn = Coupling("attn", producers, "self_attn.o_proj", o_cols.reshape(n_kv, -1))
        else:
            raise ValueError(f"unknown attention unit {attention_unit!r}")
        return [attn, mlp]

    def layer_shape(self, layer):
        n_kv, _, hd, dv = self._attn_dims(layer)
        return LayerShape(
            ffn_width=layer.mlp.gate_proj.out_features,
            kv_heads=n_kv,
            v_head_dim=dv if n_kv else hd,
            attn_output_bias=layer.self_attn.o_proj.bias is not None,
            ffn_output_bias=layer.mlp.down_proj.bias is not None,
        )

    def stock_shape(self, config):
        return LayerShape(config.intermediate_size, config.num_key_value_heads, config.head_dim,
                          bool(config.attention_bias), bool(config.mlp_bias))
