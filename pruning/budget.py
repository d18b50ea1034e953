"""Sparsity -> how many units each coupling of each layer loses.

Sparsity is the fraction of prunable parameters (attention + MLP weight matrices of all blocks) to
remove, the same definition for every method. Uniform allocation removes the same fraction r of every
coupling's units, with r chosen so that the removed parameters equal the request; per layer, the
coarsest couplings (whole heads, V dimensions in every KV head) are rounded first and the finest
(FFN neurons) absorb the rounding, so each layer lands within half a neuron of its share.
"""

from __future__ import annotations

from torch import nn

from .arch import ArchAdapter, Coupling
from .errors import PruningError


def prunable_params(adapter: ArchAdapter, layers: nn.ModuleList) -> int:
    return sum(lin.weight.numel() for layer in layers for lin in adapter.prunable_linears(layer))


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() already skips tied duplicates


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise PruningError(f"sparsity {sparsity!r} is out of range: give a fraction in [0, 1), e.g. 0.2")
    return float(sparsity)


def uniform_removals(adapter: ArchAdapter, layers: nn.ModuleList, sparsity: float,
                     attention_unit: str) -> list[dict[str, int]]:
    """Per layer: coupling name -> number of units to remove."""
    plan = []
    for i, layer in enumerate(layers):
        couplings: list[Coupling] = adapter.couplings(layer, attention_unit)
        costs = {c.name: c.unit_cost(layer) for c in couplings}
        target = sparsity * sum(lin.weight.numel() for lin in adapter.prunable_linears(layer))
        removable = sum(costs[c.name] * c.num_units for c in couplings)
        if target > removable + 0.5 * min(costs.values()):
            raise PruningError(
                f"sparsity {sparsity} is more than layer {i} can lose with {attention_unit}-level attention "
                f"pruning (at most {removable / (target / sparsity):.3f}): ask for less"
            )
        ratio = min(target / removable, 1.0) if removable else 0.0
        ordered = sorted(couplings, key=lambda c: -costs[c.name])
        removed, layer_plan = 0, {}
        for c in ordered[:-1]:
            per_group = round(ratio * c.num_units / c.groups)
            layer_plan[c.name] = per_group * c.groups
            removed += layer_plan[c.name] * costs[c.name]
        finest = ordered[-1]
        layer_plan[finest.name] = min(max(round((target - removed) / costs[finest.name]), 0), finest.num_units)
        plan.append(layer_plan)
    return plan
