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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Alignment:
    """Widths that deploy: every FFN width a multiple of lcm(round_to, tp_multiple) (GEMM tiles, and vLLM's
    column-parallel split), every V head width a multiple of min(round_to, head size), and every KV-head count
    one a tensor-parallel size of `tp_multiple` can split (vLLM: heads % tp == 0, or tp % heads == 0 with the
    KV heads replicated and the query heads still divisible). A layer may also keep its original width."""

    round_to: int = 1
    tp_multiple: int = 1

    def __post_init__(self):
        for name, value in (("round_to", self.round_to), ("tp_multiple", self.tp_multiple)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PruningError(f"{name} must be a whole number >= 1 (got {value!r})")

    def removals(self, coupling: Coupling, head_dim: int, query_groups: int) -> list[int]:
        """The numbers of units `coupling` may lose, ascending."""
        n, groups = coupling.num_units, coupling.groups
        if coupling.unit == "kv_head":
            tp = self.tp_multiple
            kept = [k for k in range(n + 1)
                    if k in (0, n) or k % tp == 0 or (tp % k == 0 and k * query_groups % tp == 0)]
            return sorted(n - k for k in kept)
        per_group = n // groups
        step = min(self.round_to, head_dim) if coupling.unit == "v_dim" else math.lcm(self.round_to, self.tp_multiple)
        kept = [k for k in range(per_group + 1) if k % step == 0 or k == per_group]
        return sorted((per_group - k) * groups for k in kept)

    def describe(self) -> dict:
        return {"round_to": self.round_to, "tp_multiple": self.tp_multiple}


def _floor(allowed: list[int], value: float) -> int:
    return max((a for a in allowed if a <= value + 1e-9), default=allowed[0])


def _ceil(allowed: list[int], value: float) -> int:
    return min((a for a in allowed if a >= value - 1e-9), default=allowed[-1])


def nearest(allowed: list[int], value: float) -> int:
    return min(allowed, key=lambda a: (abs(a - value), a))


def uniform_removals(adapter: ArchAdapter, layers: nn.ModuleList, sparsity: float, attention_unit: str,
                     alignment: Alignment = Alignment()) -> list[dict[str, int]]:
    """Per layer: coupling name -> number of units to remove."""
    plan = []
    for i, layer in enumerate(layers):
        couplings: list[Coupling] = adapter.couplings(layer, attention_unit)
        costs = {c.name: c.unit_cost(layer) for c in couplings}
        allowed = {c.name: alignment.removals(c, adapter.head_dim, adapter.groups) for c in couplings}
        target = sparsity * sum(lin.weight.numel() for lin in adapter.prunable_linears(layer))
        removable = sum(costs[c.name] * c.num_units for c in couplings)
        if target > removable + 0.5 * min(costs.values()):
            raise PruningError(
                f"sparsity {sparsity} is more than layer {i} can lose with {attention_unit}-level attention "
                f"pruning (at most {removable / (target / sparsity):.3f}): ask for less"
            )
        ratio = min(target / removable, 1.0) if removable else 0.0
        # the last coupling absorbs the rounding: a fine one with no equal-count groups (FFN neurons)
        ordered = sorted(couplings, key=lambda c: (c.groups == 1 and c.unit == "neuron", -costs[c.name]))
        *coarse, finest = ordered
        # Coarse couplings round down, as FLAP's code does (int(ratio * num_heads) heads), unless the
        # finest cannot absorb the rest; then they round up.
        for rounding in (_floor, _ceil):
            layer_plan = {c.name: rounding(allowed[c.name], ratio * c.num_units) for c in coarse}
            rest = target - sum(layer_plan[c.name] * costs[c.name] for c in coarse)
            if rest / costs[finest.name] <= finest.num_units + 0.5:
                break
        layer_plan[finest.name] = nearest(allowed[finest.name], rest / costs[finest.name])
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


def partial_removals(coupling: Coupling, adapter: ArchAdapter, alignment: Alignment) -> list[int]:
    """The aligned removal counts of `coupling` that leave a layer's attention in place: V keeps at least one
    dimension per head (a layer's attention goes only with whole heads)."""
    allowed = alignment.removals(coupling, adapter.head_dim, adapter.groups)
    return [n for n in allowed if n < coupling.num_units] if coupling.unit == "v_dim" else allowed


def global_plan(scored: list, adapter: ArchAdapter, alignment: Alignment, sparsity: float,
                prunable: int) -> list[dict[str, int]]:
    """One threshold on the allocation scores of every layer (`scoring.ScoredLayer`s), each count then snapped
    to its nearest aligned one (within one aligned unit per layer; equal counts per KV head)."""
    plan = global_removals([e.allocation for e in scored], [e.costs for e in scored], sparsity, prunable)
    return [{c.name: nearest(partial_removals(c, adapter, alignment), plan[i][c.name]) for c in e.couplings}
            for i, e in enumerate(scored)]
