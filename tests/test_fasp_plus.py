"""FASP-plus on tiny models: dense-target restoration, held-out damping from calibration windows only, and
adaptive widths (size met, widths follow the layers)."""

import json

import pytest
import torch
from conftest import tiny_family

import pruning
from pruning import restoration


def _last_block_output(model, tokens):
    seen = {}
    layers = model.model.layers
    handle = layers[len(layers) - 1].register_forward_hook(
        lambda _m, _a, out: seen.setdefault("h", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return seen["h"]


def test_dense_target_ends_closer_to_the_dense_model_than_the_pruned_target(calibration):
    """With every block pruned in turn, refitting onto the dense model's outputs also corrects what earlier
    blocks carried in: the last block's output is closer to the dense one (on the calibration tokens the fit sees)."""
    dense = tiny_family("llama")
    reference = _last_block_output(dense, calibration)
    errors = {}
    for target in ("dense", "pruned"):
        result = pruning.prune(tiny_family("llama"), "fasp-plus", 0.3, calibration, progress=False, target=target,
                               intercept=False, damping="0.01", widths="uniform")
        errors[target] = (_last_block_output(result.model, calibration) - reference).norm().item()
    assert errors["dense"] < 0.9 * errors["pruned"], errors


def test_damping_is_chosen_from_calibration_windows_alone_and_recorded(calibration, monkeypatch):
    """Every choice sees the calibration tokens, split into two folds of whole windows, and nothing else."""
    seen = []
    choose = restoration.choose_damping

    def spy(weight, bias, stats, keep, *args, **kwargs):
        seen.append((stats.count, [stats.fold(k).count for k in range(stats.folds)]))
        return choose(weight, bias, stats, keep, *args, **kwargs)

    monkeypatch.setattr(restoration, "choose_damping", spy)
    model = tiny_family("llama")
    result = pruning.prune(model, "fasp-plus", 0.3, calibration, progress=False, widths="uniform")
    nsamples, seqlen = calibration.shape
    assert seen and all(s == (nsamples * seqlen, [nsamples // 2 * seqlen] * 2) for s in seen), seen
    chosen = result.metadata["method_decisions"]["damping"]
    layers = model.config.num_hidden_layers
    assert set(chosen) == {f"layers.{i}.{c}" for i in range(layers) for c in ("self_attn.o_proj", "mlp.down_proj")}
    assert set(chosen.values()) <= set(restoration.DAMPING_GRID)
    assert result.metadata["method_options"]["damping"] == "auto"


def test_prune_command_reads_no_evaluation_text(tiny_model_dirs, data_root, tmp_path, cli, monkeypatch):
    import fasp_bench.data

    def forbidden(*args, **kwargs):
        raise AssertionError("pruning read evaluation text")

    monkeypatch.setattr(fasp_bench.data, "perplexity_text", forbidden)
    monkeypatch.setattr(fasp_bench.data, "wikitext2_test_text", forbidden)
    monkeypatch.setattr(fasp_bench.data, "c4_eval_text", forbidden)
    out = tmp_path / "ck"
    code, _, err = cli("prune", "--model", tiny_model_dirs["llama-gqa"], "--method", "fasp-plus", "--sparsity", "0.2",
                       "--nsamples", "4", "--seqlen", "32", "--out", out, data=data_root)
    assert code == 0, err
    recorded = json.loads((out / "pruning.json").read_text())
    assert recorded["method"] == "fasp-plus" and recorded["method_decisions"]["damping"]


def _block_weights(model) -> int:
    return sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)


def test_adaptive_widths_meet_the_size_and_follow_the_layers(calibration):
    """A layer whose FFN output is 20x louder keeps more neurons than one 20x quieter; the whole still meets the
    requested size within one unit per layer, counted on the weights."""
    model = tiny_family("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(20)
        model.model.layers[2].mlp.down_proj.weight.mul_(0.05)
    before = _block_weights(model)
    result = pruning.prune(model, "fasp-plus", 0.3, calibration, progress=False)
    widths = result.metadata["layers"]["ffn_widths"]
    assert widths[0] > widths[2], widths
    after = _block_weights(result.model)
    config = model.config
    # the largest unit: one V dimension in each KV head (its v rows and the o columns of its query heads)
    group = config.num_attention_heads // config.num_key_value_heads
    v_unit = config.num_key_value_heads * config.hidden_size * (1 + group)
    assert abs((before - after) - 0.3 * before) <= config.num_hidden_layers * v_unit
    v_dims = result.metadata["layers"]["v_head_dims"]
    assert all(0 < d <= 64 for d in v_dims), v_dims


@pytest.mark.parametrize("spec, message", [("fasp-plus:damping=much", "'auto' or a number"),
                                           ("fasp-plus:target=teacher", "restoration target"),
                                           ("fasp-plus:widths=random", "unknown widths"),
                                           ("fasp-plus:widths=search,offspring=0", "offspring"),
                                           ("fasp-plus:widths=search,selection_tokens=4096/1024", "ascending"),
                                           ("fasp-plus:widths=search,generations=some", "is a number")])
def test_bad_options_are_refused_in_one_line(spec, message, tiny_model_dirs, data_root, tmp_path, cli):
    out = tmp_path / "ck"
    code, _, err = cli("prune", "--model", tiny_model_dirs["opt"], "--method", spec, "--sparsity", "0.2",
                       "--nsamples", "4", "--seqlen", "32", "--out", out, data=data_root)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_adaptive_widths_see_through_an_output_norm(calibration):
    """Gemma-3 normalizes each sublayer's output before the residual add, so scaling a layer's o_proj or
    down_proj changes nothing the model computes; the widths must not change either. Oracle: the same model
    with every consumer rescaled by a different power of ten per layer (the function stays the same)."""
    model, rescaled = tiny_family("gemma3"), tiny_family("gemma3")
    tokens = calibration[:2]
    with torch.no_grad():
        for m in (model, rescaled):  # random-init outputs are so small that the norms' eps would matter
            for layer in m.model.layers:
                layer.mlp.down_proj.weight.mul_(1e3)
                layer.self_attn.o_proj.weight.mul_(1e3)
        for i, layer in enumerate(rescaled.model.layers):
            layer.mlp.down_proj.weight.mul_(10.0 ** i)
            layer.self_attn.o_proj.weight.mul_(10.0 ** (2 - i))
        assert torch.allclose(rescaled(tokens).logits, model(tokens).logits, atol=1e-5)  # the oracle holds
    plans = [pruning.prune(m, "fasp-plus", 0.3, calibration, progress=False).metadata["layers"]
             for m in (model, rescaled)]
    assert plans[0] == plans[1]
    assert len(set(plans[0]["ffn_widths"])) > 1 or len(set(plans[0]["v_head_dims"])) > 1  # an adaptive plan
