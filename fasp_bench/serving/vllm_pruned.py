"""The project architectures in vLLM: one mechanism for every LLaMA-like family.

vLLM's own model of the family is built while each decoder layer sees a per-layer view of the config
(its FFN width, KV-head count and query-head count), so vLLM's code sizes every layer's linears and its
attention (KV cache included) itself. Each layer is then fitted to what the checkpoint holds:

- V narrower than Q/K: `qkv_proj` loads the narrow V rows and pads each V head back to the head size on
  its output, and `o_proj` keeps each head's first `dv` inputs, so the family's attention code runs as
  is. On a CPU the KV cache then holds padded V (vLLM's CPU attention stores K and V at one width), so
  FASP's V saving is not realised in it. On a CUDA GPU the attention is rebuilt on vLLM's different-K/V-width
  backend (`TRITON_ATTN_DIFFKV`) at the model's widest V, so the cache and the attention work shrink with V
  (`NarrowVAttention`; `FASP_BENCH_PAD_V=1` keeps the padded path, to measure what it costs);
- output biases a method added (FLAP's compensation): o_proj / down_proj get a bias (vLLM would drop a
  checkpoint bias that has no parameter silently);
- a layer with no KV head left: its attention is the o_proj bias alone, with no KV cache.

Stock-shape checkpoints never reach this code: their config names the stock architecture.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.models import utils as vllm_utils
from vllm.model_executor.models.utils import PPMissingLayer, extract_layer_index

from pruning.arch import Family, families
from pruning.arch.base import config_head_dim, project_classes

from .plugin import OWN_FILES, SERVED_AS


class PaddedVQKVLinear(QKVParallelLinear):
    """q/k/v with V narrower than the head size: V is zero-padded per head on the output."""

    def forward(self, x: torch.Tensor):
        out, bias = super().forward(x)
        hd, dv, n_kv = self.head_size, self.v_head_size, self.num_kv_heads
        q, k, v = out.split([self.num_heads * hd, n_kv * hd, n_kv * dv], dim=-1)
        v = F.pad(v.unflatten(-1, (n_kv, dv)), (0, hd - dv)).flatten(-2)
        return torch.cat([q, k, v], dim=-1), bias


class NarrowVRowLinear(RowParallelLinear):
    """o_proj after padded-V attention: keeps each head's first `width` (real V) dimensions."""

    head_dim: int
    width: int

    def forward(self, x: torch.Tensor):
        return super().forward(x.unflatten(-1, (-1, self.head_dim))[..., : self.width].flatten(-2))


class NarrowVAttention(nn.Module):
    """Attention whose KV cache holds V at `v_width` < head size (vLLM's different-K/V-width backend).

    The family's code splits q/k/v at the head size (V comes padded from `PaddedVQKVLinear`): V is cut to
    `v_width` per head before attending and caching, and the output padded back for `NarrowVRowLinear`.
    A layer whose own V is narrower than `v_width` carries zeros up to it (the backend has one V width).
    """

    def __init__(self, inner: nn.Module, head_size: int, v_width: int):
        super().__init__()
        self.attn, self.head_size, self.v_width = inner, head_size, v_width

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        hd, dv = self.head_size, self.v_width
        value = value.unflatten(-1, (-1, hd))[..., :dv].flatten(-2).contiguous()
        out = self.attn(query, key, value)
        return F.pad(out.unflatten(-1, (-1, dv)), (0, hd - dv)).flatten(-2)


def native_v_width(config, cuda: bool) -> int | None:
    """The V width the KV cache stores when the engine can hold V narrower than K: the widest V of the
    layers with heads, where that is below the head size; None where V is padded to the head size (a CPU,
    `FASP_BENCH_PAD_V=1`, or no narrow V)."""
    if not cuda or os.environ.get("FASP_BENCH_PAD_V") == "1":
        return None
    head_dim = config_head_dim(config)
    widths = [dv for dv, n_kv in zip(config.v_head_dims, config.kv_heads) if n_kv > 0]
    return max(widths) if widths and max(widths) < head_dim else None


def _native_v_attention(old: nn.Module, v_width: int, vllm_config) -> NarrowVAttention:
    """`old` (vLLM's Attention of the layer) rebuilt on the different-K/V-width backend at `v_width`."""
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backends.triton_attn_diffkv import TritonAttentionDiffKVBackend

    TritonAttentionDiffKVBackend.set_head_size_v(v_width)  # one V width per backend class, hence the widest
    vllm_config.compilation_config.static_forward_context.pop(old.layer_name)  # the new layer takes its name
    inner = Attention(old.num_heads, old.head_size, old.impl.scale, num_kv_heads=old.num_kv_heads,
                      cache_config=vllm_config.cache_config, quant_config=old.quant_config,
                      per_layer_sliding_window=old.sliding_window, attn_type=old.attn_type,
                      prefix=old.layer_name, attn_backend=TritonAttentionDiffKVBackend, head_size_v=v_width)
    return NarrowVAttention(inner, old.head_size, v_width)


class NoHeadsAttention(nn.Module):
    """Every head of the layer pruned: the attention output is the output linear's bias (zeros without one)."""

    def __init__(self, hidden_size: int, bias: bool, dtype: torch.dtype, output_name: str = "o_proj"):
        super().__init__()
        self.hidden_size, self.output_name = hidden_size, output_name
        output = nn.Module()  # named as in the checkpoint, so its bias loads
        output.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype), requires_grad=False) if bias else None
        setattr(self, output_name, output)

    def forward(self, hidden_states: torch.Tensor, **_) -> torch.Tensor:
        out = hidden_states.new_zeros(hidden_states.shape[0], self.hidden_size)
        bias = getattr(self, self.output_name).bias
        return out if bias is None else out + bias


@contextmanager
def _layer_view(config, family: Family, layer: int) -> Iterator[None]:
    """Config fields as layer `layer` of the checkpoint has them, restored afterwards."""
    head_dim = config_head_dim(config)
    groups = config.num_attention_heads // config.num_key_value_heads
    n_kv = max(config.kv_heads[layer], 1)  # a layer with no heads is built with one, then emptied
    view = {family.ffn_width_key: config.ffn_widths[layer], "num_key_value_heads": n_kv,
            "num_attention_heads": n_kv * groups, "head_dim": head_dim}
    saved = {key: getattr(config, key, None) for key in view}
    for key, value in view.items():
        setattr(config, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


@contextmanager
def _per_layer_construction(config, family: Family) -> Iterator[None]:
    """vLLM's model files build their layers with `make_layers(n, layer_fn, prefix)`, looked up in their own
    module at call time: wrap it so that each layer_fn call sees its layer's view of the config."""
    original = vllm_utils.make_layers

    def make_layers(num_hidden_layers, layer_fn, prefix):
        def build(prefix: str):
            with _layer_view(config, family, extract_layer_index(prefix)):
                return layer_fn(prefix=prefix)

        return original(num_hidden_layers, build, prefix)

    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("vllm.model_executor.models.") and getattr(m, "make_layers", None) is original]
    for module in modules:
        module.make_layers = make_layers
    try:
        yield
    finally:
        for module in modules:
            module.make_layers = original


def _row_linear(old: RowParallelLinear, input_size: int, bias: bool, cls=RowParallelLinear) -> RowParallelLinear:
    return cls(input_size, old.output_size, bias=bias, quant_config=old.quant_config, prefix=old.prefix)


def _fit_layer(layer: nn.Module, config, index: int, vllm_config, v_width: int | None) -> None:
    """Narrow V, added output biases and empty attention, as layer `index` of the checkpoint has them;
    `v_width`: the width the KV cache stores V at, where the engine can (`native_v_width`)."""
    attention, mlp = layer.self_attn, layer.mlp
    n_kv, dv = config.kv_heads[index], config.v_head_dims[index]
    if n_kv == 0:
        vllm_config.compilation_config.static_forward_context.pop(attention.attn.layer_name)
        layer.self_attn = NoHeadsAttention(config.hidden_size, config.attn_output_bias,
                                           attention.o_proj.weight.dtype)
    else:
        o_bias = attention.o_proj.bias is not None or config.attn_output_bias
        qkv = attention.qkv_proj
        if dv != qkv.head_size:
            attention.qkv_proj = PaddedVQKVLinear(qkv.hidden_size, qkv.head_size, qkv.total_num_heads,
                                                  qkv.total_num_kv_heads, bias=qkv.bias is not None,
                                                  quant_config=qkv.quant_config, prefix=qkv.prefix, v_head_size=dv)
            attention.o_proj = _row_linear(attention.o_proj, qkv.total_num_heads * dv, o_bias, NarrowVRowLinear)
            attention.o_proj.head_dim, attention.o_proj.width = qkv.head_size, dv
            if v_width is not None:
                attention.attn = _native_v_attention(attention.attn, v_width, vllm_config)
        elif o_bias and attention.o_proj.bias is None:
            attention.o_proj = _row_linear(attention.o_proj, attention.o_proj.input_size, True)
    if config.ffn_output_bias and mlp.down_proj.bias is None:
        mlp.down_proj = _row_linear(mlp.down_proj, mlp.down_proj.input_size, True)


def without_empty_attention(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A layer with no heads left has empty q/k/v/o weights in the checkpoint and no such modules here."""
    return ((name, w) for name, w in weights if w.numel() or ".self_attn." not in name)


def pruned_model_class(family: Family) -> type[nn.Module]:
    """vLLM's model of the family's stock architecture (or of the one it is served as), fitted per layer."""
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    architecture, flags = SERVED_AS.get(family.name, (family.stock_model.__name__, {}))
    entry = ModelRegistry.models[architecture]
    base = getattr(importlib.import_module(entry.module_name), entry.class_name)

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        for key, value in flags.items():
            setattr(config, key, value)
        with _per_layer_construction(config, family):
            base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        v_width = native_v_width(config, current_platform.is_cuda())
        for index, layer in enumerate(self.model.layers):
            if not isinstance(layer, PPMissingLayer):
                _fit_layer(layer, config, index, vllm_config, v_width)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return base.load_weights(self, without_empty_attention(weights))

    name = project_classes(family)[1].__name__
    return type(name, (base,), {"__init__": __init__, "load_weights": load_weights, "__module__": __name__,
                                "__qualname__": name})


# One class per family, at module level: vLLM's registry imports "module:Class" in a subprocess.
for _family in families():
    if _family.name not in OWN_FILES:
        _cls = pruned_model_class(_family)
        globals()[_cls.__name__] = _cls
