"""Sparsity -> how many units each coupling of each layer loses.

Sparsity is the fraction of prunable parameters (attention + MLP weight matrices of all blocks) to
remove, the same definition for every method. Uniform allocation removes the same fraction r of every
coupling's units, with r chosen so that the removed parameters equal the request; per layer, the
couplings with coarse steps (whole heads, one V dimension in every KV head) are rounded down first
(FLAP's code floors its head count too) and the FFN neurons absorb the rest, so each layer lands
within half a neuron of its share.
"""

from __future__ import annotations

import math

import torch
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
        # the last coupling absorbs the rounding: a fine one with no equal-count groups (FFN neurons)
        ordered = sorted(couplings, key=lambda c: (c.groups == 1, -costs[c.name]))
        *coarse, finest = ordered
        # Coarse couplings round down, as FLAP's code does (int(ratio * num_heads) heads), unless the
        # finest cannot absorb the rest; then they round up.
        for rounding in (math.floor, math.ceil):
            layer_plan = {c.name: min(rounding(ratio * c.num_units / c.groups + 1e-9) * c.groups, c.num_units)
                          for c in coarse}
            rest = target - sum(layer_plan[c.name] * costs[c.name] for c in coarse)
            layer_plan[finest.name] = max(round(rest / costs[finest.name]), 0)
            if layer_plan[finest.name] <= finest.num_units:
                break
        layer_plan[finest.name] = min(layer_plan[finest.name], finest.num_units)
        plan.append(layer_plan)
    return plan


def global_removals(unit_scores: list[dict[str, torch.Tensor]], unit_costs: list[dict[str, int]],
                    sparsity: float, prunable: int) -> list[dict[str, int]]:
    """Remove the globally lowest-scoring units, across layers and couplings, until the removed
    parameters reach `sparsity * prunable`. A unit that would overshoot the budget by more than half
    of the cheapest unit is skipped, so methods still meet at equal size (within half a neuron).

    Scores must be comparable across layers and couplings (FLAP standardizes them per module).
    """
    scores, costs, owners = [], [], []
    for i, (layer_scores, layer_costs) in enumerate(zip(unit_scores, unit_costs)):
        for name, s in layer_scores.items():
            scores.append(s.double().cpu())
            costs += [layer_costs[name]] * s.numel()
            owners += [(i, name)] * s.numel()
    target = sparsity * prunable
    slack = 0.5 * min(costs, default=0)
    plan: list[dict[str, int]] = [dict.fromkeys(layer, 0) for layer in unit_scores]
    removed = 0
    for k in torch.cat(scores).argsort(stable=True).tolist() if scores else []:
        if removed >= target - slack:
            break
        if removed + costs[k] <= target + slack:
            i, name = owners[k]
            plan[i][name] += 1
            removed += costs[k]
    return plan
