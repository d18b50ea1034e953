"""FLAP (An et al., AAAI 2024): fluctuation metric, adaptive structure, bias compensation.

- Metric (WIFV): sample variance of each consumer input channel over the calibration tokens times the
  squared norm of that consumer column. FLAP squares it once more for attention channels.
- Attention is pruned in heads. With GQA the unit is one KV head together with the query heads that
  read it (its q/k/v rows and the o_proj columns of those query heads): FLAP's MHA head is the g = 1
  case of this unit. A unit scores the mean of its channels' standardized metrics.
- Structure: AL-AM (default, as in the paper) standardizes the metric per module (each layer's
  attention, each layer's FFN) and removes units under one global threshold, so widths differ per
  layer and a layer may lose all its heads or neurons; UL-UM removes the same fraction everywhere.
- Bias compensation: a removed input channel is replaced by its calibration mean, folded into the
  consumer's bias (a bias is added where the architecture has none).
- Calibration follows FLAP's code: every block is scored on the dense model's activations before any
  block is cut.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import Coupling
from ..calibrate import InputStats
from ..errors import PruningError
from . import register
from .base import PruningMethod

STRUCTURES = {"AL-AM": "global", "UL-UM": "uniform"}


@register
class FLAP(PruningMethod):
    name = "flap"
    attention_unit = "head"
    propagation = "dense"

    def __init__(self, structure: str = "AL-AM", compensate: bool = True):
        if structure not in STRUCTURES:
            raise PruningError(f"unknown FLAP structure {structure!r}: choose {' or '.join(STRUCTURES)}")
        self.structure = structure
        self.allocation = STRUCTURES[structure]
        self.compensate = compensate

    def column_scores(self, coupling: Coupling, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
        wifv = stats.variance * weight.double().square().sum(0)
        return wifv.square() if coupling.name == "attn" else wifv

    def unit_scores(self, coupling: Coupling, column_scores: torch.Tensor) -> torch.Tensor:
        spread = column_scores.std().clamp_min(torch.finfo(torch.float64).tiny)
        standardized = (column_scores - column_scores.mean()) / spread
        return standardized[coupling.columns].mean(-1)

    def restore(self, consumer: nn.Linear, stats: InputStats, keep_columns: torch.Tensor, where: str = ""):
        weight = consumer.weight
        if not self.compensate:
            return weight[:, keep_columns], consumer.bias
        removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
        removed[keep_columns] = False
        shift = (weight[:, removed].double() @ stats.mean[removed]).to(weight.dtype)
        return weight[:, keep_columns], shift if consumer.bias is None else consumer.bias + shift

    def describe(self) -> dict:
        return {"structure": self.structure, "compensate": self.compensate, "metric": "WIFV"}
