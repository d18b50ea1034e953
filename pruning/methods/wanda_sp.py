"""Wanda-SP, the structured Wanda baseline as FLAP's paper and code define it.

Column score mean_i |W_ij| * ||X_j||_2 on the consumer; attention pruned in heads (with GQA a KV head
with its query heads), a head scoring the sum over its columns; the same ratio in every layer;
no compensation. Calibration is sequential, each block on the pruned block before it.
"""

from __future__ import annotations

import torch

from ..arch import Coupling
from ..calibrate import InputStats
from . import register
from .base import PruningMethod


@register
class WandaSP(PruningMethod):
    name = "wanda-sp"
    attention_unit = "head"

    def column_scores(self, coupling: Coupling, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
        return (weight.abs().double() * stats.norm).mean(0)
