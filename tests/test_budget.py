"""Width allocation and unit selection against brute-force oracles: `keep_top_units` keeps each group's
best units, `global_removals` removes the lowest scores first and meets the budget, `uniform_removals`
gives every layer the same share of its own prunable weights."""

import math
import random

import pytest
import torch
from conftest import family_configs, tiny_family

import pruning
from pruning.arch import get_adapter
from pruning.budget import Alignment, global_removals, uniform_removals
from pruning.methods import base, keep_top_units


def _distinct_scores(n: int, seed: int) -> list[float]:
    """n distinct scores in random order, so the top set is unique and ties never decide."""
    rng = random.Random(seed)
    return [v / 7.0 for v in rng.sample(range(-10 * n, 10 * n), n)]


# --- keep_top_units ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups, per_group, remove_per_group",
                         [(1, 9, 0), (1, 9, 4), (1, 9, 9), (2, 16, 5), (3, 6, 6), (4, 5, 2), (8, 3, 1)])
def test_keep_top_units_keeps_the_best_of_each_group(groups, per_group, remove_per_group):
    values = _distinct_scores(groups * per_group, seed=groups * 100 + per_group)
    kept = keep_top_units(torch.tensor(values, dtype=torch.float32), remove_per_group * groups, groups)
    oracle = []
    for g in range(groups):
        members = range(g * per_group, (g + 1) * per_group)
        oracle += sorted(members, key=lambda i: values[i], reverse=True)[:per_group - remove_per_group]
    assert kept.dtype == torch.long
    assert kept.tolist() == sorted(oracle)


def test_keep_top_units_keeps_equal_counts_where_the_global_top_would_not():
    """Group 0 holds every high score: a global top-k would empty group 1, the per-group top-k cannot."""
    scores = torch.tensor([10.0, 11.0, 12.0, 13.0, 0.1, 0.3, 0.2, 0.0], dtype=torch.float64)
    assert keep_top_units(scores, 4, groups=2).tolist() == [2, 3, 5, 6]
    assert keep_top_units(scores, 4, groups=1).tolist() == [0, 1, 2, 3]


def test_keep_top_units_is_exported_by_the_methods_package():
    assert keep_top_units is base.keep_top_units


# --- global_removals ----------------------------------------------------------------------------------------
def _synthetic(layer_sizes: list[dict[str, int]], seed: int) -> list[dict[str, torch.Tensor]]:
    flat = _distinct_scores(sum(n for layer in layer_sizes for n in layer.values()), seed)
    out, at = [], 0
    for layer in layer_sizes:
        out.append({})
        for name, n in layer.items():
            out[-1][name] = torch.tensor(flat[at:at + n], dtype=torch.float64)
            at += n
    return out


def _greedy(scores, costs, target: float) -> list[dict[str, int]]:
    """Brute force: walk every unit from the lowest score up; take it unless it overshoots the target by more
    than half the cheapest unit; stop once within that half."""
    units = sorted((float(s), i, name, costs[i][name]) for i, layer in enumerate(scores)
                   for name, tensor in layer.items() for s in tensor.tolist())
    slack = 0.5 * min(c for _, _, _, c in units)
    plan = [dict.fromkeys(layer, 0) for layer in scores]
    removed = 0
    for _, i, name, cost in units:
        if removed >= target - slack:
            break
        if removed + cost <= target + slack:
            plan[i][name] += 1
            removed += cost
    return plan


def _removed_params(plan, costs) -> int:
    return sum(n * costs[i][name] for i, layer in enumerate(plan) for name, n in layer.items())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fraction", [0.05, 0.23, 0.5, 0.81])
def test_global_removals_with_equal_costs_remove_exactly_the_lowest_scores(seed, fraction):
    """One cost for every unit: the plan removes exactly the k globally lowest-scoring units, k the nearest
    whole number of units to the budget, wherever they sit."""
    sizes = [{"attn": 6, "mlp": 20}, {"attn": 6, "mlp": 20}, {"attn": 6, "mlp": 20}]
    scores = _synthetic(sizes, seed)
    costs = [{"attn": 10, "mlp": 10} for _ in sizes]
    prunable = 10 * 78
    target = fraction * prunable
    k = round(target / 10)
    assert abs(target / 10 - k) < 0.5  # not a half: the nearest count is unique
    ranked = sorted((float(s), i, name) for i, layer in enumerate(scores) for name, t in layer.items()
                    for s in t.tolist())
    expected = [dict.fromkeys(layer, 0) for layer in sizes]
    for _, i, name in ranked[:k]:
        expected[i][name] += 1
    assert global_removals(scores, costs, fraction, prunable) == expected


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.55])
def test_global_removals_with_mixed_costs_meet_the_budget_lowest_first(seed, fraction):
    """Heads that cost 12 neurons, layers of different sizes: the plan equals a brute-force greedy, removes
    the budget within half the cheapest unit, and never keeps a unit scoring below a removed one unless the
    kept unit was too expensive to fit."""
    sizes = [{"attn": 4, "mlp": 40}, {"attn": 2, "mlp": 24}, {"attn": 4, "mlp": 32}]
    costs = [{"attn": 36, "mlp": 3}, {"attn": 36, "mlp": 3}, {"attn": 60, "mlp": 5}]
    scores = _synthetic(sizes, 10 + seed)
    prunable = sum(n * costs[i][name] for i, layer in enumerate(sizes) for name, n in layer.items())
    plan = global_removals(scores, costs, fraction, prunable)
    assert plan == _greedy(scores, costs, fraction * prunable)
    assert abs(_removed_params(plan, costs) - fraction * prunable) <= 0.5 * 3

    # what the plan removes from each coupling: its lowest-scoring units (keep_top_units keeps the rest)
    removed, kept = [], []
    for i, layer in enumerate(scores):
        for name, s in layer.items():
            order = s.argsort().tolist()
            removed += [(s[j].item(), costs[i][name]) for j in order[:plan[i][name]]]
            kept += [(s[j].item(), costs[i][name]) for j in order[plan[i][name]:]]
    for kept_score, kept_cost in kept:
        for removed_score, removed_cost in removed:
            assert kept_score > removed_score or kept_cost > removed_cost


def test_global_removals_of_nothing_and_of_an_empty_model():
    scores = _synthetic([{"attn": 3, "mlp": 5}], 0)
    assert global_removals(scores, [{"attn": 7, "mlp": 2}], 0.0, 31) == [{"attn": 0, "mlp": 0}]
    assert global_removals([], [], 0.3, 0) == []


# --- uniform_removals ---------------------------------------------------------------------------------------
def _unit_costs(config, unit: str) -> dict[str, int]:
    """Weights one unit removes, from the config's shapes alone: an FFN neuron is a row of every FFN producer
    (gate and up; OPT: fc1) and a column of the consumer; a V dimension is a v_proj row and the o_proj column
    of every query head reading its KV head; a KV head is its query heads' q rows, its k and v rows and o
    columns."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    g = heads // kv
    producers = 1 if config.model_type == "opt" else 2
    attn = hidden * (1 + g) if unit == "channel" else hidden * head_dim * (g + 1 + 1 + g)
    return {"attn": attn, "mlp": (producers + 1) * hidden}


def _layer_weights(layer) -> int:
    """Every matrix of a block (its linears; norms are vectors)."""
    return sum(p.numel() for p in layer.parameters() if p.dim() == 2)


def _shape(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    ffn = getattr(config, "intermediate_size", None) or config.ffn_dim
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv, head_dim, ffn


@pytest.mark.parametrize("family", sorted(family_configs()))
@pytest.mark.parametrize("unit", ["channel", "head"])
@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.4, 0.6])
def test_uniform_removals_give_every_layer_its_share(family, unit, sparsity):
    """Each layer loses `sparsity` of its own matrices within half an FFN neuron, attention in whole steps
    (one V dimension in every KV head, or whole KV heads) rounded down, the FFN absorbing the rest."""
    model = tiny_family(family)
    config = model.config
    adapter = get_adapter(config)
    layers = adapter.layers(model)
    plan = uniform_removals(adapter, layers, sparsity, unit)
    costs = _unit_costs(config, unit)
    kv, head_dim, ffn = _shape(config)
    attn_units, attn_step = (kv * head_dim, kv) if unit == "channel" else (kv, 1)
    assert len(plan) == len(layers)
    for layer, layer_plan in zip(layers, plan):
        assert set(layer_plan) == {"attn", "mlp"}
        assert layer_plan == plan[0]  # identical layers, identical plans
        target = sparsity * _layer_weights(layer)
        assert abs(_removed_params([layer_plan], [costs]) - target) <= 0.5 * costs["mlp"]
        assert layer_plan["attn"] % attn_step == 0 and 0 <= layer_plan["attn"] <= attn_units
        assert 0 <= layer_plan["mlp"] <= ffn
        # attention's share: the same fraction of its removable units, rounded down to a whole step
        whole = 0 if unit == "head" else kv * (config.num_attention_heads // kv + 1) * head_dim * config.hidden_size
        ratio = target / (_layer_weights(layer) - whole)
        floored = math.floor(ratio * attn_units / attn_step + 1e-9) * attn_step
        if target - floored * costs["attn"] <= (ffn + 0.5) * costs["mlp"]:  # the FFN can absorb the rest
            assert layer_plan["attn"] == floored


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_uniform_removals_with_alignment_keep_aligned_widths(family):
    """round_to 32: every kept FFN width and V head width is a multiple of 32 (or untouched), and each layer
    still lands within half an aligned step of 32 neurons of its share."""
    model = tiny_family(family)
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    kv, head_dim, ffn = _shape(model.config)
    costs = _unit_costs(model.config, "channel")
    for sparsity in (0.13, 0.37):
        plan = uniform_removals(adapter, layers, sparsity, "channel", Alignment(round_to=32))
        for layer, layer_plan in zip(layers, plan):
            assert (ffn - layer_plan["mlp"]) % 32 == 0
            assert (head_dim - layer_plan["attn"] // kv) % 32 == 0 and layer_plan["attn"] % kv == 0
            target = sparsity * _layer_weights(layer)
            assert abs(_removed_params([layer_plan], [costs]) - target) <= 0.5 * 32 * costs["mlp"]


def test_uniform_removals_refuse_more_than_a_layer_can_lose():
    """With channel units Q and K stay whole: a Llama block of the tiny config can lose at most 80% of its
    matrices (q 256x256 and k 128x256 of 491,520 weights stay), so 85% is refused, 78% is not."""
    model = tiny_family("llama")
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    qk = 256 * 256 + 128 * 256
    assert 1 - qk / _layer_weights(layers[0]) == pytest.approx(0.8)
    with pytest.raises(pruning.PruningError, match="ask for less"):
        uniform_removals(adapter, layers, 0.85, "channel")
    plan = uniform_removals(adapter, layers, 0.78, "channel")
    assert plan[0]["mlp"] <= 384 and plan[0]["attn"] <= 128
