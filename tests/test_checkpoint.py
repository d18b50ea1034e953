"""Pruned checkpoints save atomically and reload with plain from_pretrained, giving the same logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import pruning
from pruning.checkpoint import atomic_dir


@pytest.mark.parametrize("sparsity", [0.0, 0.25])
def test_save_reload_same_logits(tiny_model, calibration, probe, tmp_path, sparsity):
    result = pruning.prune(tiny_model, "fasp", sparsity, calibration, progress=False)
    out = pruning.save_pruned(result.model, tmp_path / "ck", result.metadata)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is type(result.model)
    torch.testing.assert_close(reloaded(probe).logits, result.model(probe).logits, rtol=0, atol=0)
    meta = json.loads((out / "pruning.json").read_text())
    assert meta["sparsity_requested"] == sparsity
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folders left behind


def test_narrow_v_names_the_project_architecture(calibration, tmp_path):
    from conftest import tiny_llama

    result = pruning.prune(tiny_llama(), "fasp", 0.3, calibration, progress=False)
    out = pruning.save_pruned(result.model, tmp_path / "ck", result.metadata)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["PrunedLlamaForCausalLM"]
    assert config["model_type"] == "pruned_llama"
    assert config["v_head_dims"] == result.metadata["layers"]["v_head_dims"]


def test_ffn_only_pruning_keeps_the_stock_architecture(calibration, probe, tmp_path):
    """A uniform FFN cut with V untouched is a stock checkpoint (what plain vLLM can serve)."""
    from conftest import tiny_llama

    model = tiny_llama()
    adapter = pruning.get_adapter(model.config)
    layer = adapter.layers(model)[0]
    mlp = next(c for c in adapter.couplings(layer, "channel") if c.name == "mlp")
    # sparsity small enough that the attention share rounds to zero V dimensions per head
    sparsity = 0.4 * mlp.unit_cost(layer) * 2 / sum(lin.weight.numel() for lin in adapter.prunable_linears(layer))
    result = pruning.prune(model, "fasp", sparsity, calibration, progress=False)
    assert type(result.model).__name__ == "LlamaForCausalLM"
    out = pruning.save_pruned(result.model, tmp_path / "ck", result.metadata)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "ck"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("crash mid-save")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_overwrite(tiny_model, tmp_path):
    (tmp_path / "ck").mkdir()
    with pytest.raises(pruning.PruningError, match="already exists"):
        pruning.save_pruned(tiny_model, tmp_path / "ck", {})
    pruning.save_pruned(tiny_model, tmp_path / "ck", {"k": 1}, overwrite=True)
    assert json.loads((tmp_path / "ck" / "pruning.json").read_text())["k"] == 1
