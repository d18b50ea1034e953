"""Per-layer widths by evolutionary search against the dense model (EvoPress's and DarwinLM's recipe, FASP's cut).

- Levels. One level is P parameters, P = request / (layers * LEVELS_PER_LAYER): a module (one coupling of one
  layer) at level l loses the aligned unit count nearest to l * P / unit cost, and the levels of all modules sum
  to layers * LEVELS_PER_LAYER. A mutation moves one level from one module to another, so every candidate has the
  requested size within the snapping (half an aligned unit per module).
- Database. One pass over the dense model: each block's input statistics, the method's unit scores, and for every
  level of each module the consumer restored onto the kept columns by the method itself, written to one
  safetensors file per block (then the block's Gram is dropped: memory is one block's statistics and one model).
- Fitness. KL(dense || candidate) of the next-token distributions, mean over tokens: the candidate is stitched
  block by block from the database (its consumers on their kept columns, the cut columns zero, which computes
  what the cut block computes) and the model's own head turns the last hidden states into logits.
- Search. The parent starts as the better of the uniform and the adaptive (energy-criterion) widths. Each
  generation, `offspring` children make 1..MAX_MOVES level moves each; all are scored on the first selection
  step's tokens, the best quarter go on to the next step's, and the best of the last step replaces the parent if
  it beats it there. The tokens are the calibration windows' own (a prefix of them): nothing else is read.
The plan found is then cut by the usual sequential pass, so restoration still sees the pruned model's inputs.
"""

from __future__ import annotations

import copy
import math
import random
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchAdapter
from .budget import Alignment, global_plan, nearest, partial_removals, prunable_params, uniform_removals
from .calibrate import capture_block_inputs, run_block
from .errors import PruningError
from .methods import PruningMethod, get_method, keep_top_units
from .scoring import ScoredLayer, score_on_dense_activations
from .surgery import cut, kept_columns

LEVELS_PER_LAYER = 12  # a level is 1/12 of a layer's share of the request: SmolLM2 at 20%, 34 FFN neurons
LEVEL_CAP = 2.0  # a module loses at most 2 layer shares: bounds the database (and the adaptive plan's extremes)
MAX_MOVES = 6
SURVIVING = 4  # each selection step keeps the best 1/SURVIVING of its candidates for the next
SEED = 0


@dataclass(frozen=True)
class Module:
    """One coupling of one layer, as the search sees it."""

    layer: int
    name: str  # coupling name
    cost: int  # parameters per unit
    allowed: tuple[int, ...]  # aligned removal counts
    top: int  # highest level


class Levels:
    """The level grid: level l of a module -> the number of units it loses."""

    def __init__(self, modules: list[Module], level_params: float, total: int):
        self.modules, self.level_params, self.total = modules, level_params, total

    def removal(self, m: int, level: int) -> int:
        module = self.modules[m]
        return nearest(list(module.allowed), level * self.level_params / module.cost)

    def plan(self, levels: tuple[int, ...], layers: int) -> list[dict[str, int]]:
        plan: list[dict[str, int]] = [{} for _ in range(layers)]
        for m, (module, level) in enumerate(zip(self.modules, levels)):
            plan[module.layer][module.name] = self.removal(m, level)
        return plan

    def from_plan(self, plan: list[dict[str, int]]) -> tuple[int, ...]:
        """The levels nearest a plan of removal counts, summing to the total (rounding repaired where it least
        changes a module)."""
        exact = [plan[m.layer].get(m.name, 0) * m.cost / self.level_params for m in self.modules]
        levels = [min(max(round(x), 0), m.top) for x, m in zip(exact, self.modules)]
        while sum(levels) != self.total:
            step = 1 if sum(levels) < self.total else -1
            room = [k for k, m in enumerate(self.modules) if 0 <= levels[k] + step <= m.top]
            k = max(room, key=lambda k: step * (exact[k] - levels[k]))
            levels[k] += step
        return tuple(levels)

    def mutate(self, levels: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
        child = list(levels)
        for _ in range(rng.randint(1, MAX_MOVES)):
            givers = [k for k, level in enumerate(child) if level > 0]
            takers = [k for k, level in enumerate(child) if level < self.modules[k].top]
            giver = rng.choice(givers)
            taker = rng.choice([k for k in takers if k != giver] or [giver])
            child[giver] -= 1
            child[taker] += 1
        return tuple(child)


def level_grid(adapter: ArchAdapter, layers: nn.ModuleList, attention_unit: str, sparsity: float,
               alignment: Alignment) -> Levels:
    n_levels = len(layers) * LEVELS_PER_LAYER
    level_params = sparsity * prunable_params(adapter, layers) / n_levels
    modules = []
    for i, layer in enumerate(layers):
        for c in adapter.couplings(layer, attention_unit):
            cost, allowed = c.unit_cost(layer), tuple(partial_removals(c, adapter, alignment))
            top = min(int(max(allowed) * cost / level_params), math.floor(LEVEL_CAP * LEVELS_PER_LAYER))
            modules.append(Module(i, c.name, cost, allowed, top))
    if sum(m.top for m in modules) < n_levels:
        raise PruningError(f"sparsity {sparsity} is more than the width search can place with at most "
                           f"{LEVEL_CAP} layer shares per module: ask for less, or use widths=adaptive")
    return Levels(modules, level_params, n_levels)


class Database:
    """Every level's restored consumer of one block, one safetensors file per block."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, layer: int) -> Path:
        return self.folder / f"block{layer:05d}.safetensors"

    def write(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(self.path(layer)))

    @contextmanager
    def stitched(self, block: nn.Module, layer: int, couplings: dict, removals: dict[str, int], device):
        """Block `layer` with each consumer swapped for its restored weights at `removals` (cut columns zero)."""
        saved = []
        with safe_open(str(self.path(layer)), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            for name, n in removals.items():
                if not n:
                    continue
                consumer = block.get_submodule(couplings[name].consumer)
                saved.append((consumer, consumer.weight, consumer.bias))
                weight = consumer.weight.new_zeros(consumer.weight.shape)
                columns = kept_columns(couplings[name], f.get_tensor(f"{name}.{n}.units")).to(weight.device)
                weight[:, columns] = f.get_tensor(f"{name}.{n}.weight").to(weight.dtype)
                consumer.weight = nn.Parameter(weight, requires_grad=False)
                if f"{name}.{n}.bias" in keys:
                    consumer.bias = nn.Parameter(f.get_tensor(f"{name}.{n}.bias").to(weight.dtype), requires_grad=False)
        try:
            yield block
        finally:
            for consumer, weight, bias in saved:
                consumer.weight, consumer.bias = weight, bias


class _Emit(nn.Module):
    """Stands in for all decoder blocks: returns given hidden states, so the model's own head code (final norm,
    lm_head, soft-capping) turns a stitched candidate's last hidden states into logits."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.hidden


class WidthSearch:
    """Database, fitness and (1+lambda) search over one model in its project architecture."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, pruner: PruningMethod, blocks,
                 calibration: torch.Tensor, sparsity: float, alignment: Alignment, *, batch_size: int,
                 storage: torch.device, progress: bool, folder: Path):
        self.model, self.adapter, self.pruner, self.blocks = model, adapter, pruner, blocks
        self.layers = adapter.layers(model)
        self.calibration, self.sparsity, self.alignment = calibration, sparsity, alignment
        self.batch_size, self.storage, self.progress = batch_size, storage, progress
        self.database = Database(folder)
        self.levels = level_grid(adapter, self.layers, pruner.attention_unit, sparsity, alignment)
        self.uniform = uniform_removals(adapter, self.layers, sparsity, pruner.attention_unit, alignment)
        self.couplings = [{c.name: c for c in adapter.couplings(layer, pruner.attention_unit)} for layer in self.layers]
        self.evaluated: list[tuple[int, ...]] = []  # every candidate whose fitness was computed, in order
        self._dense: dict[tuple[int, int], list[torch.Tensor]] = {}  # windows -> the dense last hidden states

    def build_database(self, desc: str) -> list[ScoredLayer]:
        """One pass over the dense model; returns the blocks' scores (for the adaptive start)."""
        restorer = get_method(self.pruner.name, **self.pruner.describe())  # its own choices stay its own
        by_layer: dict[int, list[int]] = {}
        for m, module in enumerate(self.levels.modules):
            by_layer.setdefault(module.layer, []).append(m)

        def write(i: int, layer: nn.Module, entry: ScoredLayer) -> None:
            tensors = {}
            for m in by_layer.get(i, []):
                c = self.couplings[i][self.levels.modules[m].name]
                consumer = layer.get_submodule(c.consumer)
                # the uniform share first: FASP-plus's held-out damping is chosen there, then kept for every level
                share = self.uniform[i].get(c.name, 0)
                removals = {self.levels.removal(m, lv) for lv in range(1, self.levels.modules[m].top + 1)} - {0}
                for n in sorted(removals, key=lambda n: (abs(n - share), n)):
                    keep = keep_top_units(entry.scores[c.name], n, c.groups)
                    weight, bias = restorer.restore(consumer, entry.stats[c.consumer], kept_columns(c, keep),
                                                    where=f"layers.{i}.{c.consumer}")
                    tensors[f"{c.name}.{n}.weight"], tensors[f"{c.name}.{n}.units"] = weight, keep
                    if bias is not None:
                        tensors[f"{c.name}.{n}.bias"] = bias
            self.database.write(i, tensors)

        inputs = capture_block_inputs(self.model, self.layers[0], self.calibration.split(self.batch_size),
                                      self.blocks.device, self.storage)
        return score_on_dense_activations(self.pruner, self.adapter, self.layers, self.blocks, inputs, self.progress,
                                          desc, with_gram=True, each=write)

    def _windows(self, tokens: int) -> int:
        return min(max(1, round(tokens / self.calibration.shape[1])), self.calibration.shape[0])

    def fitness(self, candidates: list[tuple[int, ...]], windows: int, first: int = 0) -> list[float]:
        """KL(dense || candidate), mean over the tokens of calibration windows first .. windows - 1."""
        self.evaluated += candidates
        ids = self.calibration[first:windows].split(self.batch_size)
        inputs = capture_block_inputs(self.model, self.layers[0], ids, self.blocks.device, self.storage)
        streams = [inputs.copy() for _ in candidates]
        key = (first, windows)
        dense = None if key in self._dense else inputs.copy()
        plans = [self.levels.plan(c, len(self.layers)) for c in candidates]
        for i, layer in enumerate(self.layers):
            self.blocks.load(i, layer)
            if dense is not None:
                run_block(layer, dense)
            for plan, stream in zip(plans, streams):
                with self.database.stitched(layer, i, self.couplings[i], plan[i], self.blocks.device):
                    run_block(layer, stream)
            self.blocks.release(i, layer, final=False)
        if dense is not None:
            self._dense[key] = dense.hidden
        return self._kl(ids, self._dense[key], [s.hidden for s in streams])

    def _kl(self, ids, dense: list[torch.Tensor], streams: list[list[torch.Tensor]]) -> list[float]:
        totals, tokens = [0.0] * len(streams), 0
        for b, batch in enumerate(ids):
            for w in range(batch.shape[0]):  # one window's logits at a time: [seqlen, vocab] in float32
                window = batch[w:w + 1]
                reference = self._log_probs(window, dense[b][w:w + 1])
                for k, stream in enumerate(streams):
                    log_q = self._log_probs(window, stream[b][w:w + 1])
                    totals[k] += F.kl_div(log_q, reference, log_target=True, reduction="sum").item()
                tokens += window.numel()
        return [t / tokens for t in totals]

    def _log_probs(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        parent, _, leaf = self.adapter.family.layers.rpartition(".")
        owner = self.model.get_submodule(parent)
        layers = getattr(owner, leaf)
        setattr(owner, leaf, nn.ModuleList([_Emit(hidden.to(self.blocks.device))]))
        try:
            device = self.model.get_input_embeddings().weight.device
            logits = self.model(input_ids=ids.to(device), use_cache=False).logits
        finally:
            setattr(owner, leaf, layers)
        return logits.float().log_softmax(-1).flatten(0, -2)

    def stitch(self, levels: tuple[int, ...]) -> nn.Module:
        """A physically cut copy of the (resident) model at `levels`, from the database's weights."""
        model = copy.deepcopy(self.model)
        plan = self.levels.plan(levels, len(self.layers))
        for i, layer in enumerate(self.adapter.layers(model)):
            with safe_open(str(self.database.path(i)), framework="pt") as f:
                keys = set(f.keys())
                for name, n in plan[i].items():
                    if not n:
                        continue
                    bias = f.get_tensor(f"{name}.{n}.bias") if f"{name}.{n}.bias" in keys else None
                    cut(layer, self.couplings[i][name], f.get_tensor(f"{name}.{n}.units"),
                        f.get_tensor(f"{name}.{n}.weight"), bias)
            self.adapter.conform(layer)
        return model

    def run(self, generations: int, offspring: int, tokens: tuple[int, ...], desc: str,
            ) -> tuple[list[dict[str, int]], dict]:
        started = time.perf_counter()
        scored = self.build_database(f"{desc} database")
        built = time.perf_counter()
        steps = [self._windows(t) for t in tokens]
        last = steps[-1]
        starts = {"uniform": self.levels.from_plan(self.uniform),
                  "adaptive": self.levels.from_plan(global_plan(scored, self.adapter, self.alignment, self.sparsity,
                                                                prunable_params(self.adapter, self.layers)))}
        start_kl = dict(zip(starts, self.fitness(list(starts.values()), last)))
        start = min(start_kl, key=start_kl.get)
        parent, parent_kl = starts[start], start_kl[start]
        rng = random.Random(SEED)
        trace = []
        bar = tqdm(range(generations), desc=f"{desc} search", unit="gen", disable=not self.progress)
        for generation in bar:
            pool = list(dict.fromkeys(self.levels.mutate(parent, rng) for _ in range(offspring)))
            used, scored_on, kl_of = 0, 0, dict.fromkeys(pool, 0.0)
            for s, windows in enumerate(steps):
                # a step's windows extend the last step's (a prefix of one draw, every window seqlen tokens):
                # only the new ones are scored, and the means combine by window count
                new = self.fitness(pool, windows, scored_on) if windows > scored_on else [0.0] * len(pool)
                for c, value in zip(pool, new):
                    kl_of[c] = (kl_of[c] * scored_on + value * (windows - scored_on)) / windows
                used += len(pool) * (windows - scored_on) * self.calibration.shape[1]
                scored_on = windows
                kl = [kl_of[c] for c in pool]
                ranked = [c for _, c in sorted(zip(kl, pool), key=lambda pair: pair[0])]
                if s < len(steps) - 1:
                    pool = ranked[:max(1, len(ranked) // SURVIVING)]
            if min(kl) < parent_kl:
                parent, parent_kl = ranked[0], min(kl)
            trace.append({"generation": generation + 1, "best_kl": parent_kl, "tokens": used})
            bar.set_postfix(kl=f"{parent_kl:.4f}")
        record = {
            "start": start, "start_kl": start_kl, "best_kl": parent_kl,
            "levels_per_layer": LEVELS_PER_LAYER, "level_params": self.levels.level_params,
            "generations": generations, "offspring": offspring,
            "selection_tokens": [w * self.calibration.shape[1] for w in steps],
            "evaluations": len(self.evaluated), "trace": trace,
            "database_bytes": sum(f.stat().st_size for f in self.database.folder.iterdir()),
            "seconds": {"database": built - started, "search": time.perf_counter() - built},
        }
        return self.levels.plan(parent, len(self.layers)), record


def search_widths(model: nn.Module, adapter: ArchAdapter, pruner: PruningMethod, blocks, calibration: torch.Tensor,
                  sparsity: float, alignment: Alignment, *, batch_size: int, storage: torch.device, progress: bool,
                  desc: str) -> tuple[list[dict[str, int]], dict]:
    """The plan (per layer: coupling -> units to remove) the search chose, and its record for pruning.json.
    The database lives in a temporary folder (TMPDIR) for the search's duration."""
    with tempfile.TemporaryDirectory(prefix="fasp-width-search-") as folder:
        search = WidthSearch(model, adapter, pruner, blocks, calibration, sparsity, alignment, batch_size=batch_size,
                             storage=storage, progress=progress, folder=Path(folder))
        return search.run(pruner.generations, pruner.offspring, pruner.selection_tokens, desc)
