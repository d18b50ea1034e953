"""FLAP and Wanda-SP on the shared pipeline: compensation, structures, per-layer widths, empty layers."""

import pytest
import torch

import pruning
from pruning.arch import get_adapter
from pruning.calibrate import InputStats
from pruning.methods import get_method
from pruning.surgery import cut, kept_columns


def test_registry_names_every_method():
    assert {"fasp", "flap", "wanda-sp"} <= set(pruning.METHODS)
    with pytest.raises(pruning.PruningError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(pruning.PruningError, match="unknown FLAP structure"):
        get_method("flap", structure="XL")


def test_bias_compensation_is_exact_for_constant_channels():
    """FFN neurons whose output is constant over the tokens are removed with no change in the output."""
    from conftest import tiny_opt

    layer = tiny_opt().model.decoder.layers[0]
    layer.fc1.weight.data[:10] = 0
    layer.fc1.bias.data[:10] = torch.linspace(0.1, 1.0, 10)  # relu(constant) = constant, non-zero
    hidden = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(0))

    def ffn(x):
        return layer.fc2(layer.activation_fn(layer.fc1(x)))

    dense = ffn(hidden)
    stats = InputStats(with_gram=False)
    stats.update(layer.activation_fn(layer.fc1(hidden)))
    coupling = next(c for c in get_adapter(tiny_opt().config).couplings(layer, "head") if c.name == "mlp")
    flap = get_method("flap")
    scores = flap.unit_scores(coupling, flap.column_scores(coupling, layer.fc2.weight, stats))
    assert set(scores.argsort()[:10].tolist()) == set(range(10))  # zero variance -> lowest WIFV
    keep = torch.arange(10, coupling.num_units)
    weight, bias = flap.restore(layer.fc2, stats, kept_columns(coupling, keep))
    cut(layer, coupling, keep, weight, bias)
    assert layer.fc1.out_features == coupling.num_units - 10
    torch.testing.assert_close(ffn(hidden), dense, rtol=1e-5, atol=1e-5)


def test_compensation_adds_a_bias_where_there_was_none(calibration, probe, tmp_path):
    from conftest import tiny_llama

    result = pruning.prune(tiny_llama(), "flap", 0.3, calibration, progress=False)
    layer = result.model.model.layers[0]
    assert layer.mlp.down_proj.bias is not None and result.model.config.ffn_output_bias
    out = pruning.save_pruned(result.model, tmp_path / "ck", result.metadata)
    reloaded = pruning.load_pruned(out)
    torch.testing.assert_close(reloaded(probe).logits, result.model(probe).logits, rtol=0, atol=0)


def _uneven_llama():
    """Layers that differ: the second layer's FFN inputs are much larger, the third's much smaller."""
    from conftest import tiny_llama

    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.weight.data *= 8
    model.model.layers[2].mlp.up_proj.weight.data /= 8
    return model


def test_al_am_gives_unequal_widths_and_ul_um_equal(calibration):
    adaptive = pruning.prune(_uneven_llama(), "flap", 0.3, calibration, progress=False).metadata["layers"]
    uniform = pruning.prune(_uneven_llama(), "flap", 0.3, calibration, structure="UL-UM",
                            progress=False).metadata["layers"]
    assert len(set(adaptive["ffn_widths"])) > 1
    assert len(set(uniform["ffn_widths"])) == 1 and len(set(uniform["kv_heads"])) == 1


@pytest.mark.parametrize("arch", ["llama-gqa", "opt"])
def test_zero_head_and_zero_neuron_layers_run(arch, probe, tmp_path):
    from conftest import TINY_MODELS

    model = TINY_MODELS[arch]()
    adapter = get_adapter(model.config)
    pruned = adapter.to_project(model)
    layers = adapter.layers(pruned)
    empty = torch.zeros(0, dtype=torch.long)
    attn = next(c for c in adapter.couplings(layers[0], "head") if c.name == "attn")
    cut(layers[0], attn, empty, consumer_bias=torch.full((64,), 0.1))
    mlp = next(c for c in adapter.couplings(layers[1], "head") if c.name == "mlp")
    cut(layers[1], mlp, empty)
    pruned = adapter.finalize(pruned)
    assert pruned.config.kv_heads[0] == 0 and pruned.config.ffn_widths[1] == 0
    logits = pruned(probe).logits
    assert logits.isfinite().all()
    generated = pruned.generate(probe[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape[1] == probe.shape[1] + 4
    out = pruning.save_pruned(pruned, tmp_path / "ck", {})
    torch.testing.assert_close(pruning.load_pruned(out)(probe).logits, logits, rtol=0, atol=0)
