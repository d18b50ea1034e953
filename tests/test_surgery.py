"""Surgery removes exactly what masking would zero; sparsity means the same thing for every layer."""

import copy

import pytest
import torch

import pruning
from pruning.arch import get_adapter


def block_matrices(model) -> int:
    """Prunable parameters counted from the model's own tensors: every matrix inside a decoder block (the
    attention's q/k/v/o and the FFN's linears; norms are vectors, and biases are not prunable parameters)."""
    return sum(p.numel() for name, p in model.named_parameters() if ".layers." in name and p.dim() == 2)


def neuron_cost(model) -> int:
    """Weights one FFN neuron owns, from the dense shapes: a row of each producer (gate and up; OPT: fc1) and a
    column of the consumer, i.e. every block matrix with the FFN width as a dimension, divided by that width."""
    config = model.config
    width = getattr(config, "intermediate_size", None) or config.ffn_dim
    owning = [p for name, p in model.named_parameters() if ".layers.0." in name and p.dim() == 2 and width in p.shape]
    return sum(p.numel() for p in owning) // width


def _masked_dense(model, kept_units, attention_unit):
    """The dense model with the producer rows of every removed unit zeroed (biases too), and the parameters
    that a physical cut of the same units removes: those rows and biases, and the consumer columns."""
    masked = copy.deepcopy(model)
    adapter = get_adapter(masked.config)
    removed_params = 0
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
                removed_params += idx.numel() * linear.in_features
                if linear.bias is not None:
                    linear.bias.data[idx] = 0
                    removed_params += idx.numel()
            consumer = layer.get_submodule(coupling.consumer)
            removed_params += coupling.columns[removed].numel() * consumer.out_features
            if coupling.unit == "kv_head" and removed.all():  # no head left: the Q/K norms (Gemma-3, Qwen3) go too
                attention, _, _ = coupling.consumer.rpartition(".")
                linears = {path.rpartition(".")[2] for path in [*coupling.producers, coupling.consumer]}
                removed_params += sum(p.numel() for name, p in layer.get_submodule(attention).named_parameters()
                                      if name.partition(".")[0] not in linears)
    return masked, removed_params


# Masking equals surgery wherever the consumer is only sliced: FASP without restoration (V dimensions),
# Wanda-SP and FLAP without compensation (whole KV heads with their query heads; 70% makes Wanda-SP cut
# heads in every family, Gemma-3's single KV head included, FLAP at 60% cuts heads and widths per layer).
MASKABLE = [("fasp", {"restore": False}, "channel", 0.1), ("fasp", {"restore": False}, "channel", 0.35),
            ("wanda-sp", {}, "head", 0.7), ("flap", {"compensate": False}, "head", 0.6)]


@pytest.mark.parametrize("method, options, unit, sparsity", MASKABLE)
def test_surgery_equals_masking(tiny_model, calibration, probe, method, options, unit, sparsity):
    dense_logits = tiny_model(probe).logits
    dense_total = sum(p.numel() for p in tiny_model.parameters())
    dense_matrices = block_matrices(tiny_model)
    result = pruning.prune(tiny_model, method, sparsity, calibration, progress=False, **options)
    assert torch.equal(tiny_model(probe).logits, dense_logits), "pruning must not modify the input model"
    assert any("attn" in kept for kept in result.kept_units), "the attention lost no unit: nothing to compare"
    masked, removed = _masked_dense(tiny_model, result.kept_units, unit)
    torch.testing.assert_close(result.model(probe).logits, masked(probe).logits, rtol=1e-5, atol=1e-5)
    # and the pruned matrices really are smaller, by exactly the masked rows and columns
    assert removed > 0
    pruned_total = sum(p.numel() for p in result.model.parameters())
    assert pruned_total == dense_total - removed
    assert result.metadata["total_params"] == {"before": dense_total, "after": dense_total - removed}
    assert result.metadata["prunable_params"]["after"] == block_matrices(result.model) < dense_matrices


def test_sparsity_zero_gives_the_dense_model(tiny_model, calibration, probe):
    result = pruning.prune(tiny_model, "fasp", 0.0, calibration, progress=False)
    assert type(result.model) is type(tiny_model)
    assert torch.equal(result.model(probe).logits, tiny_model(probe).logits)


@pytest.mark.parametrize("sparsity", [0.05, 0.2, 0.3, 0.5])
def test_realised_sparsity_within_one_neuron_per_layer(tiny_model, calibration, sparsity):
    """Counted on the models themselves: the removed block matrices are the request within one FFN neuron per
    layer, and pruning.json reports exactly those counts."""
    before, neuron = block_matrices(tiny_model), neuron_cost(tiny_model)
    result = pruning.prune(tiny_model, "fasp", sparsity, calibration, progress=False)
    after = block_matrices(result.model)
    assert abs((before - after) - sparsity * before) <= tiny_model.config.num_hidden_layers * neuron
    assert result.metadata["prunable_params"] == {"before": before, "after": after}
    assert result.metadata["sparsity_realised"] == pytest.approx(1 - after / before, rel=1e-12)


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
