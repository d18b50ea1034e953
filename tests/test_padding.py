"""widen-v: the same function with V zero-padded to the head size in the weights, for measuring the engine's
padding of a narrow V."""

from __future__ import annotations

import torch
from conftest import tiny_family
from transformers import AutoModelForCausalLM, AutoTokenizer

import pruning


def test_widened_checkpoint_computes_what_the_narrow_one_does(cli, servable_model_dirs, calibration, tmp_path):
    dense = servable_model_dirs["llama"]
    result = pruning.prune(AutoModelForCausalLM.from_pretrained(dense), method="fasp", sparsity=0.3,
                           calibration=calibration, progress=False)
    assert min(result.model.config.v_head_dims) < 64
    tokenizer = AutoTokenizer.from_pretrained(dense)
    pruning.save_pruned(result.model, tmp_path / "narrow", result.metadata, tokenizer=tokenizer)
    code, out, err = cli("widen-v", tmp_path / "narrow", "--out", tmp_path / "wide")
    assert code == 0, err
    narrow, wide = (AutoModelForCausalLM.from_pretrained(tmp_path / name).eval() for name in ("narrow", "wide"))
    assert type(wide).__name__ == "LlamaForCausalLM"  # FASP's widths are uniform: V whole makes it stock
    assert wide.config.intermediate_size == narrow.config.ffn_widths[0]
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(wide(ids).logits, narrow(ids).logits, rtol=1e-5, atol=1e-5)


def test_qwen2_biases_are_widened_with_v(calibration):
    from fasp_bench.serving.padding import widen_v

    model = tiny_family("qwen2")
    pruned = pruning.prune(model, method="fasp", sparsity=0.3, calibration=calibration, progress=False).model
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = pruned(ids).logits
        wide = widen_v(pruned)
        torch.testing.assert_close(wide(ids).logits, before, rtol=1e-5, atol=1e-5)
    assert wide.model.layers[0].self_attn.v_proj.bias.shape[0] == wide.model.layers[0].self_attn.k_proj.bias.shape[0]


def test_a_checkpoint_without_narrow_v_is_refused(cli, servable_model_dirs, tmp_path):
    code, _, err = cli("widen-v", servable_model_dirs["llama"], "--out", tmp_path / "wide")
    assert code == 2 and err.count("\n") == 1 and "nothing to widen" in err
    assert not (tmp_path / "wide").exists()
