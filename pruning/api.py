"""`prune(model, method=..., sparsity=..., calibration=...)`: the one entry point of the library."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from . import __version__
from .arch import ArchAdapter, Coupling, get_adapter
from .budget import Alignment, check_sparsity, global_plan, prunable_params, total_params, uniform_removals
from .calibrate import capture_block_inputs, collect_input_stats, run_block
from .errors import PruningError
from .methods import PruningMethod, get_method, keep_top_units
from .scoring import ScoredLayer, score_on_dense_activations
from .surgery import cut, kept_columns
from .width_search import search_widths


@dataclass
class PruneResult:
    model: PreTrainedModel  # streamed pruning: the skeleton (blocks on the meta device; the weights are on disk)
    metadata: dict = field(default_factory=dict)  # what pruning.json records
    # per layer: coupling name -> indices of the kept units (the layer's original numbering)
    kept_units: list[dict[str, torch.Tensor]] = field(default_factory=list)


def _cut_layer(pruner: PruningMethod, adapter: ArchAdapter, index: int, layer: torch.nn.Module,
               couplings: list[Coupling], scores: dict, removals: dict[str, int], stats: dict,
               ) -> dict[str, torch.Tensor]:
    """Choose, restore and cut every coupling of one layer that loses units; return the kept units."""
    kept = {}
    for c in couplings:
        if not removals.get(c.name):
            continue
        keep = keep_top_units(scores[c.name], removals[c.name], c.groups)
        weight, bias = pruner.restore(layer.get_submodule(c.consumer), stats[c.consumer], kept_columns(c, keep),
                                      where=f"layers.{index}.{c.consumer}")
        cut(layer, c, keep, weight, bias)
        kept[c.name] = keep
    adapter.conform(layer)
    return kept


def _check_calibration(calibration: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        raise PruningError("calibration must be a non-empty [nsamples, seqlen] tensor of token ids")
    return calibration.long()


class ResidentBlocks:
    """Blocks that stay in memory: each visits the compute device for its turn, then goes home."""

    def __init__(self, device: torch.device, home: torch.device):
        self.device, self.home = device, home

    def load(self, index: int, layer: torch.nn.Module) -> None:
        layer.to(self.device)

    def release(self, index: int, layer: torch.nn.Module, final: bool) -> None:
        """`final`: the block is cut and will not be loaded again."""
        layer.to(self.home)


def prune(
    model: PreTrainedModel,
    method: str = "fasp",
    sparsity: float = 0.2,
    calibration: torch.Tensor | None = None,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    offload_activations: bool = False,
    round_to: int = 1,
    tp_multiple: int = 1,
    progress: bool = True,
    **method_options,
) -> PruneResult:
    """Prune `model` so that `sparsity` of its prunable parameters are removed, physically.

    calibration: LongTensor [nsamples, seqlen] of token ids. device: where each block is processed
    (default: where the model is); only one block is moved there at a time. offload_activations: keep the
    calibration hidden states on the CPU between blocks. round_to, tp_multiple: widths that deploy (see
    `budget.Alignment`); the sparsity is still met within one aligned unit per layer. method_options: passed
    to the method, e.g. `restore=False` for FASP. For a checkpoint larger than memory, see `prune_pretrained`.
    """
    sparsity = check_sparsity(sparsity)
    pruner = get_method(method, **method_options)
    adapter = get_adapter(model.config)
    calibration = _check_calibration(calibration)
    alignment = Alignment(round_to, tp_multiple)
    started = time.perf_counter()
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    model = adapter.to_project(model.eval())
    return prune_blocks(model, adapter, pruner, sparsity, calibration, ResidentBlocks(device, home),
                        batch_size=batch_size, offload_activations=offload_activations, alignment=alignment,
                        progress=progress, started=started)


def prune_blocks(model: PreTrainedModel, adapter: ArchAdapter, pruner: PruningMethod, sparsity: float,
                 calibration: torch.Tensor, blocks, *, batch_size: int, offload_activations: bool,
                 alignment: Alignment, progress: bool, started: float) -> PruneResult:
    """The pruning loop over a model in its project architecture whose blocks `blocks` loads and releases
    one at a time (`ResidentBlocks` in memory, `streaming.ShardedBlocks` from and to safetensors shards)."""
    method = pruner.name
    device = blocks.device
    layers = adapter.layers(model)
    prunable_before, total_before = prunable_params(adapter, layers), total_params(model)
    dense_shapes = [adapter.layer_shape(layer) for layer in layers]
    kept_units: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    plan = (None if pruner.allocation == "global"
            else uniform_removals(adapter, layers, sparsity, pruner.attention_unit, alignment))
    search_record = None
    with torch.no_grad():
        if pruner.allocation == "search" and any(n for layer_plan in plan for n in layer_plan.values()):
            plan, search_record = search_widths(
                model, adapter, pruner, blocks, calibration, sparsity, alignment, batch_size=batch_size,
                storage=torch.device("cpu") if offload_activations else device, progress=progress,
                desc=f"{method} {sparsity:.0%}")
        if plan is not None and not any(n for layer_plan in plan for n in layer_plan.values()):
            for i, layer in enumerate(layers):  # nothing to remove: blocks pass through unchanged
                blocks.load(i, layer)
                blocks.release(i, layer, final=True)
        else:
            storage = torch.device("cpu") if offload_activations else device
            batches = calibration.split(batch_size)
            desc = f"{method} {sparsity:.0%}"
            scored: list[ScoredLayer] = []
            # a global plan needs every block's scores before any block is cut; "dense" propagation cuts with them
            if plan is None or pruner.propagation == "dense":
                inputs = capture_block_inputs(model, layers[0], batches, device, storage)
                scored = score_on_dense_activations(pruner, adapter, layers, blocks, inputs, progress,
                                                     desc if pruner.propagation == "dense" else f"{desc} plan")
                del inputs
            if plan is None:
                plan = global_plan(scored, adapter, alignment, sparsity, prunable_before)
            if pruner.propagation == "dense":
                for i, (layer, entry) in enumerate(zip(layers, scored)):
                    blocks.load(i, layer)
                    kept_units[i] = _cut_layer(pruner, adapter, i, layer, entry.couplings, entry.scores, plan[i],
                                               entry.stats)
                    blocks.release(i, layer, final=True)
            else:  # sequential: block k+1 is calibrated on the pruned block k's outputs
                inputs = capture_block_inputs(model, layers[0], batches, device, storage)
                dense_inputs = inputs.copy() if pruner.needs_dense_inputs else None
                for i, layer in enumerate(tqdm(layers, desc=desc, unit="block", disable=not progress)):
                    blocks.load(i, layer)
                    couplings = [c for c in adapter.couplings(layer, pruner.attention_unit) if plan[i].get(c.name)]
                    stats = collect_input_stats(layer, inputs, [c.consumer for c in couplings], pruner.needs_gram,
                                                dense_inputs=dense_inputs, folds=pruner.folds)
                    scores = {c.name: pruner.unit_scores(c, pruner.column_scores(
                        c, layer.get_submodule(c.consumer).weight, stats[c.consumer])) for c in couplings}
                    kept_units[i] = _cut_layer(pruner, adapter, i, layer, couplings, scores, plan[i], stats)
                    del stats, scores  # else this block's Gram matrices live on while the next block collects its own
                    run_block(layer, inputs)
                    blocks.release(i, layer, final=True)
                del inputs, dense_inputs

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
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "offload_activations": offload_activations,
        "alignment": alignment.describe(),
        "family": adapter.family.name,
        "architecture": type(model).__name__,
        "layers": _widths(shapes),
        "dense_layers": _widths(dense_shapes),
        **({"method_decisions": pruner.decisions()} if pruner.decisions() else {}),
        **({"width_search": search_record} if search_record else {}),
        "fasp_bench_version": __version__,
        "notes": _notes(pruner, method, stock_kv_heads, shapes),
    }
    return PruneResult(model, metadata, kept_units)


def _widths(shapes: list) -> dict[str, list[int]]:
    return {"ffn_widths": [s.ffn_width for s in shapes], "kv_heads": [s.kv_heads for s in shapes],
            "v_head_dims": [s.v_head_dim for s in shapes]}


def _notes(pruner: PruningMethod, method: str, stock_kv_heads: int, shapes: list) -> list[str]:
    """What a reader of pruning.json should know about how the size was met."""
    notes = []
    if pruner.attention_unit == "head" and stock_kv_heads == 1:
        emptied = sum(s.kv_heads == 0 for s in shapes)
        notes.append(f"the model has one KV head per layer, so a head unit is a layer's whole attention: {method} "
                     f"removed the attention of {emptied} of {len(shapes)} layers and met the requested size "
                     "through the FFN otherwise")
    return notes
