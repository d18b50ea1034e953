"""Every block scored on the dense model's activations: what a global plan, a dense-propagation cut and the
width search's database start from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .arch import ArchAdapter, Coupling
from .calibrate import BlockInputs, InputStats, collect_input_stats
from .methods import PruningMethod


@dataclass
class ScoredLayer:
    """One layer scored on the dense model's activations (per coupling name)."""

    couplings: list[Coupling]
    scores: dict[str, torch.Tensor]  # unit scores: which units a cut keeps
    allocation: dict[str, torch.Tensor]  # comparable across layers: how many a global plan removes
    costs: dict[str, int]  # parameters removed with one unit
    stats: dict[str, InputStats]  # per consumer


def score_on_dense_activations(pruner: PruningMethod, adapter: ArchAdapter, layers, blocks, inputs: BlockInputs,
                               progress: bool, desc: str, with_gram: bool | None = None,
                               each: Callable[[int, torch.nn.Module, ScoredLayer], None] | None = None,
                               ) -> list[ScoredLayer]:
    """Every block scored on the dense model's activations. The statistics keep the Gram only where the cut
    will use them (or as `with_gram` says). `each(i, layer, scored)` runs while block i is loaded; then the
    block's statistics are dropped, so only one block's Gram matrices are ever held."""
    if with_gram is None:
        with_gram = pruner.needs_gram and pruner.propagation == "dense"
    scored = []
    for i, layer in enumerate(tqdm(layers, desc=desc, unit="block", disable=not progress)):
        blocks.load(i, layer)
        couplings = adapter.couplings(layer, pruner.attention_unit)
        stats = collect_input_stats(layer, inputs, [c.consumer for c in couplings], with_gram, advance=True,
                                    folds=pruner.folds,
                                    relative=pruner.relative_allocation, output_norms=dict(adapter.family.output_norms))
        scores, allocation, costs = {}, {}, {c.name: c.unit_cost(layer) for c in couplings}
        for c in couplings:
            consumer = layer.get_submodule(c.consumer)
            scores[c.name] = pruner.unit_scores(c, pruner.column_scores(c, consumer.weight, stats[c.consumer]))
            allocation[c.name] = pruner.allocation_scores(c, scores[c.name], consumer, stats[c.consumer],
                                                          costs[c.name])
        entry = ScoredLayer(couplings, scores, allocation, costs, stats)
        if each is not None:
            each(i, layer, entry)
            entry.stats = {}
        scored.append(entry)
        blocks.release(i, layer, final=False)
    return scored
