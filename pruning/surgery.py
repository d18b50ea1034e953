"""Physically removes rows and columns: the saved matrices are smaller, never masked or zeroed."""

from __future__ import annotations

import torch
from torch import nn

from .arch import Coupling


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return layer


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def kept_rows(coupling: Coupling, producer: str, keep: torch.Tensor) -> torch.Tensor:
    return coupling.producers[producer][keep].flatten().sort().values


def kept_columns(coupling: Coupling, keep: torch.Tensor) -> torch.Tensor:
    """Sorted, so the consumer's input layout stays head-major with dimensions in their old order."""
    return coupling.columns[keep].flatten().sort().values


def cut(layer: nn.Module, coupling: Coupling, keep: torch.Tensor,
        consumer_weight: torch.Tensor | None = None, consumer_bias: torch.Tensor | None = None) -> None:
    """Keep only units `keep` of `coupling`: producer rows (and their biases) and consumer columns go.

    `consumer_weight`/`consumer_bias` replace the consumer's sliced weight and bias when a method
    restored or compensated them; the weight must have exactly the kept columns, in `kept_columns` order.
    """
    for path in coupling.producers:
        producer = layer.get_submodule(path)
        rows = kept_rows(coupling, path, keep).to(producer.weight.device)
        bias = producer.bias[rows] if producer.bias is not None else None
        _replace(layer, path, _linear(producer.weight[rows], bias))
    consumer = layer.get_submodule(coupling.consumer)
    if consumer_weight is None:
        consumer_weight = consumer.weight[:, kept_columns(coupling, keep).to(consumer.weight.device)]
    if consumer_bias is None:
        consumer_bias = consumer.bias
    dtype = consumer.weight.dtype
    bias = None if consumer_bias is None else consumer_bias.to(dtype)
    _replace(layer, coupling.consumer, _linear(consumer_weight.to(dtype), bias))
