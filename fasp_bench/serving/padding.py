"""What the engine's padding of a narrow V costs: the same checkpoint with V widened back to the head size.

vLLM's CPU attention stores K and V at one width, so a checkpoint whose V heads are narrower than Q/K is
served with V zero-padded per head at run time (`vllm_pruned.py`). Widening V in the weights instead (zero
rows in `v_proj`, zero columns in `o_proj`) gives a model that computes exactly the same function with stock
attention shapes; serving both and comparing measures what the narrow V saves, net of its padding.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

import pruning


def widen_v(model: PreTrainedModel) -> PreTrainedModel:
    """The model with every narrow V head zero-padded to the head size in the weights (same outputs)."""
    adapter = pruning.get_adapter(model.config)
    _, _, v_path, o_path = adapter.attention_paths()
    hd = adapter.head_dim
    for layer in adapter.layers(model):
        n_kv, dv = adapter.attention_dims(layer)
        if n_kv == 0 or dv == hd:
            continue
        v, o = layer.get_submodule(v_path), layer.get_submodule(o_path)
        wide_v = nn.Linear(v.in_features, n_kv * hd, bias=v.bias is not None, dtype=v.weight.dtype)
        with torch.no_grad():
            wide_v.weight.zero_().view(n_kv, hd, -1)[:, :dv] = v.weight.view(n_kv, dv, -1)
            if v.bias is not None:
                wide_v.bias.zero_().view(n_kv, hd)[:, :dv] = v.bias.view(n_kv, dv)
        heads = o.in_features // dv
        wide_o = nn.Linear(heads * hd, o.out_features, bias=o.bias is not None, dtype=o.weight.dtype)
        with torch.no_grad():
            wide_o.weight.zero_().view(o.out_features, heads, hd)[:, :, :dv] = o.weight.view(o.out_features, heads, dv)
            if o.bias is not None:
                wide_o.bias.copy_(o.bias)
        for path, module in ((v_path, wide_v), (o_path, wide_o)):
            parent, _, name = path.rpartition(".")
            setattr(layer.get_submodule(parent), name, module)
    return adapter.finalize(model)
