"""Surgery removes exactly what masking would zero; sparsity means the same thing for every layer."""

import copy

import pytest
import torch

import pruning
from pruning.arch import get_adapter
from pruning.budget import prunable_params


def _masked_dense(model, kept_units, attention_unit):
    """The dense model with the producer rows of every removed unit zeroed (biases too)."""
    masked = copy.deepcopy(model)
    adapter = get_adapter(masked.config)
    for layer, kept in zip(adapter.layers(masked), kept_units):
        for coupling in adapter.couplings(layer, attention_unit):
            if coupling.name not in kept:
                continue
            removed = torch.ones(coupling.num_units, dtype=torch.bool)
            removed[kept[coupling.name]] = False
            for path, rows in coupling.producers.items():
                linear = layer.get_submodule(path)
                idx = rows[removed].flatten()
                linear.weight.data[idx] = 0
                if linear.bias is not None:
                    linear.bias.data[idx] = 0
    return masked


@pytest.mark.parametrize("sparsity", [0.1, 0.35])
def test_surgery_equals_masking(tiny_model, calibration, probe, sparsity):
    dense_logits = tiny_model(probe).logits
    result = pruning.prune(tiny_model, "fasp", sparsity, calibration, restore=False, progress=False)
    assert torch.equal(tiny_model(probe).logits, dense_logits), "pruning must not modify the input model"
    masked = _masked_dense(tiny_model, result.kept_units, "channel")
    torch.testing.assert_close(result.model(probe).logits, masked(probe).logits, rtol=1e-5, atol=1e-5)
    # and the pruned matrices really are smaller
    assert result.metadata["prunable_params"]["after"] < result.metadata["prunable_params"]["before"]
    assert result.metadata["total_params"]["after"] == sum(p.numel() for p in result.model.parameters())


def test_sparsity_zero_gives_the_dense_model(tiny_model, calibration, probe):
    result = pruning.prune(tiny_model, "fasp", 0.0, calibration, progress=False)
    assert type(result.model) is type(tiny_model)
    assert torch.equal(result.model(probe).logits, tiny_model(probe).logits)


@pytest.mark.parametrize("sparsity", [0.05, 0.2, 0.3, 0.5])
def test_realised_sparsity_within_one_neuron_per_layer(tiny_model, calibration, sparsity):
    adapter = get_adapter(tiny_model.config)
    layers = adapter.layers(tiny_model)
    before = prunable_params(adapter, layers)
    neuron = max(c.unit_cost(layers[0]) for c in adapter.couplings(layers[0], "channel") if c.name == "mlp")
    result = pruning.prune(tiny_model, "fasp", sparsity, calibration, progress=False)
    removed = before - result.metadata["prunable_params"]["after"]
    assert abs(removed - sparsity * before) <= len(layers) * neuron
    assert result.metadata["sparsity_realised"] == pytest.approx(removed / before)


def test_gqa_keeps_one_v_width_per_layer_and_cuts_every_query_head(calibration, probe):
    from conftest import tiny_llama

    model = tiny_llama(gqa=True)
    result = pruning.prune(model, "fasp", 0.3, calibration, progress=False)
    for layer, width in zip(result.model.model.layers, result.metadata["layers"]["v_head_dims"]):
        attn = layer.self_attn
        assert width < 16
        assert attn.v_proj.out_features == 2 * width  # 2 KV heads
        assert attn.o_proj.in_features == 4 * width  # 4 query heads read them
    assert result.model(probe).logits.isfinite().all()


def test_generation_runs_with_narrow_v_heads(calibration, probe):
    from conftest import tiny_llama

    pruned = pruning.prune(tiny_llama(), "fasp", 0.3, calibration, progress=False).model
    out = pruned.generate(probe[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    # greedy decoding with the KV cache equals recomputing the full sequence each step
    ids = probe[:1]
    for _ in range(6):
        ids = torch.cat([ids, pruned(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)
