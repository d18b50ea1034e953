"""`prune(model, method=..., sparsity=..., calibration=...)`: the one entry point of the library."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from . import __version__
from .arch import ArchAdapter, Coupling, get_adapter
from .budget import check_sparsity, global_removals, prunable_params, total_params, uniform_removals
from .calibrate import capture_block_inputs, collect_input_stats, run_block
from .errors import PruningError
from .methods import PruningMethod, get_method, keep_top_units
from .surgery import cut, kept_columns


@dataclass
class PruneResult:
    model: PreTrainedModel
    metadata: dict = field(default_factory=dict)  # what pruning.json records
    # per layer: coupling name -> indices of the kept units (the layer's original numbering)
    kept_units: list[dict[str, torch.Tensor]] = field(default_factory=list)


def _cut_layer(pruner: PruningMethod, adapter: ArchAdapter, layer: torch.nn.Module, couplings: list[Coupling],
               scores: dict, removals: dict[str, int], stats: dict) -> dict[str, torch.Tensor]:
    """Choose, restore and cut every coupling of one layer that loses units; return the kept units."""
    kept = {}
    for c in couplings:
        if not removals.get(c.name):
            continue
        keep = keep_top_units(scores[c.name], removals[c.name], c.groups)
        weight, bias = pruner.restore(layer.get_submodule(c.consumer), stats[c.consumer], kept_columns(c, keep))
        cut(layer, c, keep, weight, bias)
        kept[c.name] = keep
    adapter.conform(layer)
    return kept


def _check_calibration(calibration: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        raise PruningError("calibration must be a non-empty [nsamples, seqlen] tensor of token ids")
    return calibration.long()


def prune(
    model: PreTrainedModel,
    method: str = "fasp",
    sparsity: float = 0.2,
    calibration: torch.Tensor | None = None,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    **method_options,
) -> PruneResult:
    """Prune `model` so that `sparsity` of its prunable parameters are removed, physically.

    calibration: LongTensor [nsamples, seqlen] of token ids. device: where each block is processed
    (default: where the model is); only one block is moved there at a time.
    method_options: passed to the method, e.g. `restore=False` for FASP.
    """
    sparsity = check_sparsity(sparsity)
    pruner = get_method(method, **method_options)
    adapter = get_adapter(model.config)
    calibration = _check_calibration(calibration)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    started = time.perf_counter()

    model = adapter.to_project(model.eval())
    layers = adapter.layers(model)
    prunable_before, total_before = prunable_params(adapter, layers), total_params(model)
    kept_units: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    plan = None if pruner.allocation == "global" else uniform_removals(adapter, layers, sparsity, pruner.attention_unit)
    if plan is None or any(n for layer_plan in plan for n in layer_plan.values()):
        with torch.no_grad():
            inputs = capture_block_inputs(model, layers[0], calibration.split(batch_size), device)
            # "dense" propagation: the next block sees this block's dense output, and every block is
            # scored before any is cut (a global plan needs all scores)
            dense = pruner.propagation == "dense"
            scored: list[tuple[list[Coupling], dict, dict]] = []
            for i, layer in enumerate(tqdm(layers, desc=f"{method} {sparsity:.0%}", unit="block",
                                           disable=not progress)):
                layer.to(device)
                couplings = [c for c in adapter.couplings(layer, pruner.attention_unit)
                             if plan is None or plan[i].get(c.name)]
                stats = collect_input_stats(layer, inputs, [c.consumer for c in couplings], pruner.needs_gram,
                                            advance=dense)
                scores = {c.name: pruner.unit_scores(c, pruner.column_scores(
                    c, layer.get_submodule(c.consumer).weight, stats[c.consumer])) for c in couplings}
                if dense:
                    scored.append((couplings, scores, stats))
                else:
                    kept_units[i] = _cut_layer(pruner, adapter, layer, couplings, scores, plan[i], stats)
                    run_block(layer, inputs)
                layer.to(home)
            del inputs
            if scored:
                if plan is None:
                    costs = [{c.name: c.unit_cost(layer) for c in couplings}
                             for layer, (couplings, _, _) in zip(layers, scored)]
                    plan = global_removals([s for _, s, _ in scored], costs, sparsity, prunable_before)
                for i, (layer, (couplings, scores, stats)) in enumerate(zip(layers, scored)):
                    layer.to(device)
                    kept_units[i] = _cut_layer(pruner, adapter, layer, couplings, scores, plan[i], stats)
                    layer.to(home)

    stock_kv_heads = adapter.stock_shape(model.config).kv_heads
    model = adapter.finalize(model)
    layers = adapter.layers(model)
    prunable_after, total_after = prunable_params(adapter, layers), total_params(model)
    shapes = [adapter.layer_shape(layer) for layer in layers]
    metadata = {
        "method": method,
        "method_options": pruner.describe(),
        "sparsity_requested": sparsity,
        "sparsity_realised": 1 - prunable_after / prunable_before,
        "model_sparsity_realised": 1 - total_after / total_before,
        "prunable_params": {"before": prunable_before, "after": prunable_after},
        "total_params": {"before": total_before, "after": total_after},
        "calibration": {"nsamples": calibration.shape[0], "seqlen": calibration.shape[1]},
        "prune_seconds": time.perf_counter() - started,
        "family": adapter.family.name,
        "architecture": type(model).__name__,
        "layers": {
            "ffn_widths": [s.ffn_width for s in shapes],
            "kv_heads": [s.kv_heads for s in shapes],
            "v_head_dims": [s.v_head_dim for s in shapes],
        },
        "fasp_bench_version": __version__,
        "notes": _notes(pruner, method, stock_kv_heads, shapes),
    }
    return PruneResult(model, metadata, kept_units)


def _notes(pruner: PruningMethod, method: str, stock_kv_heads: int, shapes: list) -> list[str]:
    """What a reader of pruning.json should know about how the size was met."""
    notes = []
    if pruner.attention_unit == "head" and stock_kv_heads == 1:
        emptied = sum(s.kv_heads == 0 for s in shapes)
        notes.append(f"the model has one KV head per layer, so a head unit is a layer's whole attention: {method} "
                     f"removed the attention of {emptied} of {len(shapes)} layers and met the requested size "
                     "through the FFN otherwise")
    return notes
