"""What a pruning method is: a column score, a unit score, and what to do with the consumer afterwards.

Everything else (calibration, width allocation, selection, cutting) is shared, so a method file holds
only what makes the method itself.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import Coupling
from ..calibrate import InputStats


class PruningMethod:
    name: str = ""
    attention_unit: str = "channel"  # "channel": V dimensions in every KV head; "head": whole KV groups
    needs_gram: bool = False
    # "pruned": block k+1 is calibrated on the pruned block k's outputs; "dense": on the dense outputs,
    # every block scored before any is cut (what a global allocation needs)
    propagation: str = "pruned"
    allocation: str = "uniform"  # "uniform": the same fraction everywhere; "global": one threshold
    needs_dense_inputs: bool = False  # statistics pair each consumer input with its dense-model input
    folds: int = 1  # calibration statistics kept per fold of windows (held-out choices)
    relative_allocation: bool = False  # a global plan's statistics weigh tokens by the residual norm

    def column_scores(self, coupling: Coupling, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
        """Importance of each consumer input column, shape [in_features]."""
        raise NotImplementedError

    def unit_scores(self, coupling: Coupling, column_scores: torch.Tensor) -> torch.Tensor:
        """Importance of each unit: the sum over the consumer columns it feeds."""
        return column_scores[coupling.columns].sum(-1)

    def restore(self, consumer: nn.Linear, stats: InputStats, keep_columns: torch.Tensor, where: str = "",
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The consumer's new weight on `keep_columns` and its bias. Default: plain slicing.
        `where` names the consumer (layers.i.path) for what the method records in `decisions`."""
        return consumer.weight[:, keep_columns], consumer.bias

    def allocation_scores(self, coupling: Coupling, unit_scores: torch.Tensor, consumer: nn.Linear,
                          stats: InputStats, unit_cost: int) -> torch.Tensor:
        """Unit scores comparable across layers and couplings, for a global plan (the lowest go first).
        Default: the unit scores themselves (FLAP standardizes them per module)."""
        return unit_scores

    def describe(self) -> dict:
        """Method options recorded in pruning.json."""
        return {}

    def decisions(self) -> dict:
        """What the method chose while pruning (e.g. per-consumer damping), recorded in pruning.json."""
        return {}


def keep_top_units(scores: torch.Tensor, n_remove: int, groups: int) -> torch.Tensor:
    """Indices of the kept units, sorted: the top ones of each group, each group keeping the same count."""
    per_group = scores.numel() // groups
    n_keep = per_group - n_remove // groups
    top = scores.view(groups, per_group).topk(n_keep, dim=1).indices
    offsets = torch.arange(groups, device=scores.device)[:, None] * per_group
    return (top + offsets).flatten().sort().values
