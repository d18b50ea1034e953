"""What an architecture adapter says: where the coupled producer rows and consumer columns live.

A *coupling* is a set of units (an FFN neuron, a V dimension, a whole KV head with its query heads)
that can be removed together without touching anything else: each unit owns some rows of each
producer linear and some input columns of one consumer linear.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class Coupling:
    """Units removable together. Index tensors are relative to one decoder layer."""

    name: str  # "mlp" or "attn"
    producers: dict[str, torch.Tensor]  # module path -> LongTensor [units, rows_per_unit]
    consumer: str  # module path of the linear whose input columns are cut
    columns: torch.Tensor  # LongTensor [units, columns_per_unit] of consumer input columns
    groups: int = 1  # units form `groups` equal contiguous blocks that must keep equal counts

    @property
    def num_units(self) -> int:
        return self.columns.shape[0]

    def unit_cost(self, layer: nn.Module) -> int:
        """Weight parameters removed with one unit (biases are not prunable parameters)."""
        cost = 0
        for path, rows in self.producers.items():
            cost += rows.shape[1] * layer.get_submodule(path).in_features
        return cost + self.columns.shape[1] * layer.get_submodule(self.consumer).out_features


@dataclass(frozen=True)
class LayerShape:
    """The per-layer widths a checkpoint must record to be rebuilt."""

    ffn_width: int
    kv_heads: int
    v_head_dim: int
    attn_output_bias: bool
    ffn_output_bias: bool


class ArchAdapter:
    """Base for one architecture family. Subclasses fill in the class attributes and the methods."""

    stock_model_types: tuple[str, ...] = ()
    ffn_width_key: str  # the stock config's FFN width field
    attn_output: str  # path of the attention output linear inside a block
    ffn_output: str  # path of the FFN output linear inside a block
    stock_model_cls: type[PreTrainedModel]
    project_model_cls: type[PreTrainedModel]
    project_config_cls: type[PretrainedConfig]

    # --- where things live -------------------------------------------------------------------
    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        raise NotImplementedError

    def prunable_linears(self, layer: nn.Module) -> list[nn.Linear]:
        """Attention + MLP linears of one block: the denominator of sparsity."""
        raise NotImplementedError

    def couplings(self, layer: nn.Module, attention_unit: str) -> list[Coupling]:
        """`attention_unit` is "channel" (one V dimension in every KV head) or "head" (a KV group)."""
        raise NotImplementedError

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        raise NotImplementedError

    def stock_shape(self, config: PretrainedConfig) -> LayerShape:
        raise NotImplementedError

    # --- generic conversions between the stock and the project architecture ------------------
    def stock_config(self, config: PretrainedConfig, shape: LayerShape) -> PretrainedConfig:
        """A stock config whose every layer has `shape` (which `is_stock_compatible` allowed)."""
        fields = _plain_fields(config)
        fields[self.ffn_width_key] = shape.ffn_width
        return self.stock_model_cls.config_class(**fields)

    def project_config(self, config: PretrainedConfig, shapes: list[LayerShape]) -> PretrainedConfig:
        fields = _plain_fields(config)
        fields.update(
            ffn_widths=[s.ffn_width for s in shapes],
            kv_heads=[s.kv_heads for s in shapes],
            v_head_dims=[s.v_head_dim for s in shapes],
            attn_output_bias=any(s.attn_output_bias for s in shapes),
            ffn_output_bias=any(s.ffn_output_bias for s in shapes),
        )
        return self.project_config_cls(**fields)

    def is_stock_compatible(self, config: PretrainedConfig, shapes: list[LayerShape]) -> bool:
        stock = self.stock_shape(config)
        first = shapes[0]
        return all(s == first for s in shapes) and (
            first.kv_heads,
            first.v_head_dim,
            first.attn_output_bias,
            first.ffn_output_bias,
        ) == (stock.kv_heads, stock.v_head_dim, stock.attn_output_bias, stock.ffn_output_bias)

    def to_project(self, model: PreTrainedModel) -> PreTrainedModel:
        """The same weights in the project architecture, whose modules follow their linears' shapes."""
        if isinstance(model, self.project_model_cls):
            return model
        shapes = [self.layer_shape(layer) for layer in self.layers(model)]
        return rebuild(model, self.project_model_cls, self.project_config(model.config, shapes))

    def finalize(self, model: PreTrainedModel) -> PreTrainedModel:
        """After surgery: the stock class where every layer kept stock shapes, else the project one.

        An output bias added to some layers (compensation) is added, as zeros, to all, since the
        project config records output biases per model, not per layer.
        """
        layers = self.layers(model)
        for path in (self.attn_output, self.ffn_output):
            if any(layer.get_submodule(path).bias is not None for layer in layers):
                for layer in layers:
                    add_zero_bias(layer.get_submodule(path))
        shapes = [self.layer_shape(layer) for layer in layers]
        base = model.config
        if self.is_stock_compatible(base, shapes):
            stock_cfg = self.stock_config(base, shapes[0])
            return rebuild(model, self.stock_model_cls, stock_cfg)
        return rebuild(model, self.project_model_cls, self.project_config(base, shapes))


PROJECT_CONFIG_KEYS = ("ffn_widths", "kv_heads", "v_head_dims", "attn_output_bias", "ffn_output_bias")


def _plain_fields(config: PretrainedConfig) -> dict:
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "quantization_config", "dtype"):
        fields.pop(key, None)
    for key in PROJECT_CONFIG_KEYS:
        fields.pop(key, None)
    return fields


def add_zero_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        weight = linear.weight
        linear.bias = nn.Parameter(weight.new_zeros(weight.shape[0]), requires_grad=weight.requires_grad)


def rebuild(model: PreTrainedModel, cls: type[PreTrainedModel], config: PretrainedConfig) -> PreTrainedModel:
    """Re-home `model`'s tensors in a `cls` skeleton built on the meta device: no copy, no re-init."""
    config = copy.deepcopy(config)
    config._attn_implementation = model.config._attn_implementation
    config.dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        new = cls(config)
    new.load_state_dict(model.state_dict(), strict=True, assign=True)
    # Non-persistent buffers (rotary frequencies) are not in the state dict.
    old_buffers = dict(model.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            new.get_submodule(owner).register_buffer(leaf, old_buffers[name], persistent=False)
    new.tie_weights()
    new.generation_config = model.generation_config
    new.eval()
    return new
