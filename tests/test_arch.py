"""Every registered family: the adapter contract, surgery against masking, reload, equal-size methods."""

import copy
import json

import pytest
import torch
from conftest import family_configs, tiny_family
from transformers import AutoModelForCausalLM, GPT2Config

import pruning
from pruning.arch import FAMILIES, families, get_adapter, supported_model_types
from pruning.surgery import cut

METHODS = [("fasp", {}), ("fasp-plus", {}), ("fasp-plus", {"target": "dense"}), ("flap", {}),
           ("flap", {"structure": "UL-UM"}), ("wanda-sp", {})]


def test_every_registered_family_has_a_tiny_model():
    assert sorted(family_configs()) == [f.name for f in families()]
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt"} == set(supported_model_types())


@pytest.mark.parametrize("unit", ["channel", "head"])
def test_adapter_contract(tiny_model, unit):
    """Producer rows partition each producer's outputs, consumer columns partition the consumer's inputs,
    and unit costs add up to the prunable parameters (Q and K stay whole with channel units)."""
    adapter = get_adapter(tiny_model.config)
    for layer in adapter.layers(tiny_model):
        couplings = adapter.couplings(layer, unit)
        for c in couplings:
            for path, rows in c.producers.items():
                assert torch.equal(rows.flatten().sort().values, torch.arange(layer.get_submodule(path).out_features))
            consumer = layer.get_submodule(c.consumer)
            assert torch.equal(c.columns.flatten().sort().values, torch.arange(consumer.in_features))
        q, k, _, _ = adapter.attention_paths()
        whole = 0 if unit == "head" else sum(layer.get_submodule(p).weight.numel() for p in (q, k))
        removable = sum(c.unit_cost(layer) * c.num_units for c in couplings)
        assert removable + whole == sum(lin.weight.numel() for lin in adapter.prunable_linears(layer))
        for norm in adapter.family.qk_norms:  # shared over heads: valid whatever heads are kept
            assert layer.get_submodule(norm).weight.shape == (adapter.head_dim,)


def _masked(model, kept: list[dict[str, torch.Tensor]], unit: str):
    """The dense model with every removed unit's producer rows (and biases) zeroed."""
    masked = copy.deepcopy(model)
    adapter = get_adapter(masked.config)
    for layer, layer_kept in zip(adapter.layers(masked), kept):
        for c in adapter.couplings(layer, unit):
            removed = torch.ones(c.num_units, dtype=torch.bool)
            removed[layer_kept[c.name]] = False
            for path, rows in c.producers.items():
                linear = layer.get_submodule(path)
                linear.weight.data[rows[removed].flatten()] = 0
                if linear.bias is not None:
                    linear.bias.data[rows[removed].flatten()] = 0
    return masked


@pytest.mark.parametrize("unit", ["channel", "head"])
def test_surgery_equals_masking(tiny_model, probe, unit, tmp_path):
    """Random kept sets per layer and coupling (equal counts per KV head for channels; one layer loses
    every head, one every neuron): the cut model equals the masked dense one, and reloads as it is."""
    generator = torch.Generator().manual_seed(3)
    adapter = get_adapter(tiny_model.config)
    pruned = adapter.to_project(copy.deepcopy(tiny_model))
    kept = []
    for i, layer in enumerate(adapter.layers(pruned)):
        layer_kept = {}
        for c in adapter.couplings(layer, unit):
            per_group = c.num_units // c.groups
            n_keep = 0 if (i, c.name) in ((0, "attn"), (1, "mlp")) else max(1, per_group * 2 // 3)
            chosen = [torch.randperm(per_group, generator=generator)[:n_keep] + g * per_group for g in range(c.groups)]
            keep = torch.cat(chosen).sort().values
            cut(layer, c, keep)
            layer_kept[c.name] = keep
        adapter.conform(layer)
        kept.append(layer_kept)
    pruned = adapter.finalize(pruned)
    expected = _masked(tiny_model, kept, unit)(probe).logits
    torch.testing.assert_close(pruned(probe).logits, expected, rtol=1e-5, atol=1e-5)
    emptied = pruned.config.kv_heads[0] if unit == "head" else pruned.config.v_head_dims[0]
    assert emptied == 0 and pruned.config.ffn_widths[1] == 0
    out = pruning.save_pruned(pruned, tmp_path / "ck", {})
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(probe).logits, pruned(probe).logits,
                               rtol=0, atol=0)
    generated = pruned.generate(probe[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    ids = probe[:1]
    for _ in range(4):  # cached decoding equals recomputing the whole sequence, also with an empty layer
        ids = torch.cat([ids, pruned(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


def _block_matrices(model) -> int:
    """Prunable parameters counted from the model's own tensors: every matrix inside a decoder block."""
    return sum(p.numel() for name, p in model.named_parameters() if ".layers." in name and p.dim() == 2)


def _unit_costs(config, unit: str) -> dict[str, int]:
    """Weights one step of each coupling removes, from the dense shapes: an FFN neuron (a row of each producer,
    gate and up or OPT's fc1, and a consumer column); one V dimension in every KV head (its v rows and the o
    columns of every query head); one KV head (its query heads' q rows, its k and v rows, their o columns)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    producers = 1 if config.model_type == "opt" else 2
    attn = kv * hidden + heads * hidden if unit == "channel" else hidden * head_dim * 2 * (heads // kv + 1)
    return {"attn": attn, "mlp": (producers + 1) * hidden}


@pytest.mark.parametrize("method, options", METHODS)
@pytest.mark.parametrize("sparsity", [0.2, 0.45])
def test_methods_meet_the_size_and_reload(tiny_model, calibration, probe, tmp_path, method, options, sparsity):
    """Realised sparsity, counted on the models, within one unit per layer (the largest step: a KV head, or one
    V dimension in every KV head) and as pruning.json reports it; the checkpoint reloads with the same logits, as the
    family's stock class where shapes stayed stock and as its project class otherwise."""
    adapter = get_adapter(tiny_model.config)
    before = _block_matrices(tiny_model)
    result = pruning.prune(tiny_model, method, sparsity, calibration, progress=False, **options)
    after = _block_matrices(result.model)
    largest = max(_unit_costs(tiny_model.config, "channel" if method.startswith("fasp") else "head").values())
    assert abs((before - after) - sparsity * before) <= tiny_model.config.num_hidden_layers * largest
    assert result.metadata["prunable_params"] == {"before": before, "after": after}
    assert result.metadata["family"] == adapter.family.name
    out = pruning.save_pruned(result.model, tmp_path / "ck", result.metadata)
    config = json.loads((out / "config.json").read_text())
    stock = adapter.family.stock_model
    if config["architectures"] == [stock.__name__]:
        assert config["model_type"] in adapter.family.model_types
    else:
        assert config["architectures"] == [f"Pruned{stock.__name__}"]
        assert config["model_type"] == adapter.family.project_model_type
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == config["architectures"][0]
    torch.testing.assert_close(reloaded(probe).logits, result.model(probe).logits, rtol=0, atol=0)


def test_uniform_ffn_cut_keeps_the_family_stock_class(calibration):
    """Wanda-SP below one head's share cuts only FFN neurons: a Mistral stays a Mistral, a Qwen3 a Qwen3."""
    for name in ("mistral", "qwen3", "gemma3"):
        result = pruning.prune(tiny_family(name), "wanda-sp", 0.1, calibration, progress=False)
        assert type(result.model) is get_adapter(result.model.config).family.stock_model


def test_one_kv_head_meets_the_size_through_the_ffn_and_says_so(calibration):
    """Gemma-3 sizes with one KV head: a head unit is the whole attention; uniform methods keep it and cut more FFN."""
    model = tiny_family("gemma3")
    assert model.config.num_key_value_heads == 1
    result = pruning.prune(model, "wanda-sp", 0.3, calibration, progress=False)
    meta = result.metadata
    assert meta["sparsity_realised"] == pytest.approx(0.3, abs=0.01)
    assert meta["layers"]["kv_heads"] == [1, 1, 1]
    assert any("one KV head" in note for note in meta["notes"])


def test_unknown_family_lists_the_registry():
    with pytest.raises(pruning.PruningError) as err:
        get_adapter(GPT2Config())
    message = str(err.value)
    assert "'gpt2'" in message and "\n" not in message
    for model_type in FAMILIES:
        if not model_type.startswith("pruned_"):
            assert model_type in message
