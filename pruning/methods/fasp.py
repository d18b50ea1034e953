"""FASP (Hu et al., 2025): Wanda-style column score and closed-form least-squares restoration.

Score of consumer column j: S_j = sum_i |W_ij| * ||X_j||_2. A unit (FFN neuron, or one V dimension of a
KV head) scores the sum over the consumer columns it feeds. After the kept columns S are chosen, the
consumer is refit so its output on the calibration inputs matches the dense output in least squares,
from the Gram matrix G = X^T X alone (`pruning.restoration`), with damping lambda = damping * mean(diag G[S, S]):

    toward="zero":      W_S = W G[:, S] (G[S, S] + lambda I)^-1                  (ridge: shrinks W_S to 0)
    toward="original":  W_S = (W G[:, S] + lambda W[:, S]) (G[S, S] + lambda I)^-1  (shrinks W_S to W[:, S])

Both are the exact least-squares optimum as lambda -> 0. The default damps toward the original weights:
on SmolLM2 the ridge form's shrinkage made restoration worse than none with 16 calibration windows and
barely better with 64 (see the README), while damping toward W[:, S] interpolates between the
least-squares fit and plain slicing.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import restoration
from ..arch import Coupling
from ..calibrate import InputStats
from ..errors import PruningError
from . import register
from .base import PruningMethod


@register
class FASP(PruningMethod):
    name = "fasp"
    attention_unit = "channel"

    def __init__(self, restore: bool = True, damping: float = 0.1, damping_toward: str = "original"):
        restoration.check_options(toward=damping_toward)
        if not damping >= 0:
            raise PruningError(f"damping {damping!r} must be >= 0 (a fraction of the mean Gram diagonal, e.g. 0.1)")
        self.restore_weights = restore
        self.damping = damping
        self.damping_toward = damping_toward
        self.needs_gram = restore

    def column_scores(self, coupling: Coupling, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
        return weight.abs().sum(0).double() * stats.norm

    def restore(self, consumer: nn.Linear, stats: InputStats, keep_columns: torch.Tensor, where: str = ""):
        if not self.restore_weights:
            return super().restore(consumer, stats, keep_columns, where)
        return restoration.restore(consumer.weight, consumer.bias, stats, keep_columns, self.damping,
                                   self.damping_toward)

    def describe(self) -> dict:
        return {"restore": self.restore_weights, "damping": self.damping, "damping_toward": self.damping_toward}
