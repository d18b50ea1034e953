"""OPT: adapter and the project architecture.

Coupled pairs: FFN `fc1` rows (+ bias) / `fc2` columns; attention `v_proj` rows (+ bias) /
`out_proj` columns. OPT is multi-head attention: each V row feeds exactly one out_proj column.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import OPTConfig, OPTForCausalLM
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.opt.modeling_opt import (
    OPTAttention,
    OPTDecoder,
    OPTDecoderLayer,
    OPTModel,
    eager_attention_forward,
)

from .base import ArchAdapter, Coupling, LayerShape


@strict
class PrunedOPTConfig(OPTConfig):
    model_type = "pruned_opt"
    ffn_widths: list[int] | None = None
    kv_heads: list[int] | None = None
    v_head_dims: list[int] | None = None
    attn_output_bias: bool = False
    ffn_output_bias: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers
        self.ffn_widths = list(self.ffn_widths or [self.ffn_dim] * n)
        self.kv_heads = list(self.kv_heads or [self.num_attention_heads] * n)
        self.v_head_dims = list(self.v_head_dims or [self.hidden_size // self.num_attention_heads] * n)


class PrunedOPTAttention(OPTAttention):
    """OPT attention with a per-layer head count and V width; zero heads leave only out_proj's bias."""

    def __init__(self, config: PrunedOPTConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.embed_dim = config.hidden_size
        self.dropout = config.attention_dropout
        self.enable_bias = config.enable_bias
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        n, dv, bias = config.kv_heads[layer_idx], config.v_head_dims[layer_idx], config.enable_bias
        self.num_heads = n
        self.k_proj = nn.Linear(self.embed_dim, n * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(self.embed_dim, n * dv, bias=bias)
        self.q_proj = nn.Linear(self.embed_dim, n * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(n * dv, self.embed_dim, bias=bias or config.attn_output_bias)

    def forward(self, hidden_states, past_key_values=None, attention_mask=None, output_attentions=False, **kwargs):
        bsz, tgt_len, _ = hidden_states.size()
        n = self.k_proj.out_features // self.head_dim
        dv = self.v_proj.out_features // n if n else 0
        q = (self.q_proj(hidden_states) * self.scaling).view(bsz, tgt_len, n, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, tgt_len, n, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, tgt_len, n, dv).transpose(1, 2)
        if past_key_values is not None:  # updated even when empty, so the cache keeps counting tokens
            k, v = past_key_values.update(k, v, self.layer_idx)
        if n * dv == 0:
            return self.out_proj(hidden_states.new_zeros(bsz, tgt_len, 0)), None
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(
            self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.dropout, scaling=1.0, **kwargs
        )
        return self.out_proj(out.reshape(bsz, tgt_len, n * dv).contiguous()), weights


class PrunedOPTDecoderLayer(OPTDecoderLayer):
    def __init__(self, config: PrunedOPTConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.embed_dim = config.hidden_size
        self.self_attn = PrunedOPTAttention(config, layer_idx)
        self.do_layer_norm_before = config.do_layer_norm_before
        self.dropout = config.dropout
        self.activation_fn = ACT2FN[config.activation_function]
        affine = config.layer_norm_elementwise_affine
        self.self_attn_layer_norm = nn.LayerNorm(self.embed_dim, elementwise_affine=affine)
        width = config.ffn_widths[layer_idx]
        self.fc1 = nn.Linear(self.embed_dim, width, bias=config.enable_bias)
        self.fc2 = nn.Linear(width, self.embed_dim, bias=config.enable_bias or config.ffn_output_bias)
        self.final_layer_norm = nn.LayerNorm(self.embed_dim, elementwise_affine=affine)


class PrunedOPTDecoder(OPTDecoder):
    config_class = PrunedOPTConfig

    def __init__(self, config: PrunedOPTConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(PrunedOPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


class PrunedOPTModel(OPTModel):
    config_class = PrunedOPTConfig

    def __init__(self, config: PrunedOPTConfig):
        super().__init__(config)
        self.decoder = PrunedOPTDecoder(config)
        self.post_init()


class PrunedOPTForCausalLM(OPTForCausalLM):
    config_class = PrunedOPTConfig

    def __init__(self, config: PrunedOPTConfig):
        super().__init__(config)
        self.model = PrunedOPTModel(config)
        self.post_init()


class OPTAdapter(ArchAdapter):
    stock_model_types = ("opt",)
    attn_output = "self_attn.out_proj"
    ffn_output = "fc2"
    ffn_width_key = "ffn_dim"
    stock_model_cls = OPTForCausalLM
    project_model_cls = PrunedOPTForCausalLM
    project_config_cls = PrunedOPTConfig

    def layers(self, model):
        return model.model.decoder.layers

    def prunable_linears(self, layer):
        a = layer.self_attn
        return [a.q_proj, a.k_proj, a.v_proj, a.out_proj, layer.fc1, layer.fc2]

    def _attn_dims(self, layer) -> tuple[int, int, int]:
        hd = layer.self_attn.head_dim
        n = layer.self_attn.k_proj.out_features // hd
        return n, hd, (layer.self_attn.v_proj.out_features // n if n else 0)

    def couplings(self, layer, attention_unit):
        neurons = torch.arange(layer.fc1.out_features)[:, None]
        mlp = Coupling("mlp", {"fc1": neurons}, "fc2", neurons)
        n, hd, dv = self._attn_dims(layer)
        if n * dv == 0:
            return [mlp]
        if attention_unit == "channel":
            units = torch.arange(n * dv)[:, None]
            attn = Coupling("attn", {"self_attn.v_proj": units}, "self_attn.out_proj", units, groups=n)
        elif attention_unit == "head":
            qk_rows = torch.arange(n * hd).view(n, hd)
            v_rows = torch.arange(n * dv).view(n, dv)
            producers = {"self_attn.q_proj": qk_rows, "self_attn.k_proj": qk_rows, "self_attn.v_proj": v_rows}
            attn = Coupling("attn", producers, "self_attn.out_proj", v_rows)
        else:
            raise ValueError(f"unknown attention unit {attention_unit!r}")
        return [attn, mlp]

    def layer_shape(self, layer):
        n, hd, dv = self._attn_dims(layer)
        return LayerShape(
            ffn_width=layer.fc1.out_features,
            kv_heads=n,
            v_head_dim=dv if n else hd,
            attn_output_bias=layer.self_attn.out_proj.bias is not None,
            ffn_output_bias=layer.fc2.bias is not None,
        )

    def stock_shape(self, config):
        bias = bool(config.enable_bias)
        return LayerShape(config.ffn_dim, config.num_attention_heads,
                          config.hidden_size // config.num_attention_heads, bias, bias)
