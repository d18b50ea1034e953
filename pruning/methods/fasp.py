"""FASP (Hu et al., 2025): Wanda-style column score and closed-form least-squares restoration.

Score of consumer column j: S_j = sum_i |W_ij| * ||X_j||_2. A unit (FFN neuron, or one V dimension of a
KV head) scores the sum over the consumer columns it feeds. After the kept columns S are chosen, the
consumer is refit so its output on the calibration inputs matches the dense output in least squares:
    W_S = W G[:, S] (G[S, S] + lambda I)^-1,   G = X^T X,   lambda = damping * mean(diag G[S, S]).
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import Coupling
from ..calibrate import InputStats
from . import register
from .base import PruningMethod


def restore_least_squares(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor,
                          damping: float = 0.01) -> torch.Tensor:
    """argmin_{W_S} ||X_S W_S^T - X W^T||^2 (ridge-damped), from the Gram matrix alone."""
    gram = gram.double()
    g_ss = gram[keep][:, keep]
    lam = damping * g_ss.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    g_ss = g_ss + lam * torch.eye(len(keep), dtype=gram.dtype, device=gram.device)
    rhs = gram[keep] @ weight.double().T  # G[S, :] W^T = (W G[:, S])^T, G symmetric
    chol, info = torch.linalg.cholesky_ex(g_ss)
    if info.item() == 0:
        solution = torch.cholesky_solve(rhs, chol)
    else:  # numerically singular even after damping: least-norm solution
        solution = torch.linalg.lstsq(g_ss, rhs).solution
    return solution.T.to(weight.dtype)


@register
class FASP(PruningMethod):
    name = "fasp"
    attention_unit = "channel"

    def __init__(self, restore: bool = True, damping: float = 0.01):
        self.restore_weights = restore
        self.damping = damping
        self.needs_gram = restore

    def column_scores(self, coupling: Coupling, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
        return weight.abs().sum(0).double() * stats.norm

    def restore(self, consumer: nn.Linear, stats: InputStats, keep_columns: torch.Tensor):
        if not self.restore_weights:
            return super().restore(consumer, stats, keep_columns)
        return restore_least_squares(consumer.weight, stats.gram, keep_columns, self.damping), consumer.bias

    def describe(self) -> dict:
        return {"restore": self.restore_weights, "damping": self.damping}
