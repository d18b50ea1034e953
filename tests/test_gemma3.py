"""End-to-end on the real Gemma-3-270M (reassembled from its PyPI part wheels, converted once and cached)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import pruning
from fasp_bench.data import bos_id, calibration_ids, wikitext2_test_text
from fasp_bench.models import ensure_embedded, load_model
from fasp_bench.perplexity import perplexity

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3-270m")


def test_embedded_gemma3_keeps_its_licence_and_its_bos(gemma):
    model, tokenizer = gemma
    folder = ensure_embedded("gemma3-270m")
    assert "Gemma Terms of Use" in (folder / "GEMMA_TERMS.html").read_text(encoding="utf-8")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gemma3_text"
    assert model.config.num_key_value_heads == 1 and model.config.num_hidden_layers == 18
    assert bos_id(tokenizer) == 2 == tokenizer("Paris").input_ids[0]


@pytest.mark.parametrize("method", ["fasp", "flap", "wanda-sp"])
def test_gemma3_prunes_at_20_percent_reloads_and_scores(gemma, method, data_root, tmp_path):
    model, tokenizer = gemma
    ids = calibration_ids(tokenizer, nsamples=4, seqlen=128, seed=0, root=data_root)
    assert (ids[:, 0] == 2).all()
    result = pruning.prune(model, method, 0.2, ids, progress=False)
    meta = result.metadata
    assert meta["sparsity_realised"] == pytest.approx(0.2, abs=0.01) and meta["family"] == "gemma3"
    if method != "fasp":  # one KV head: the head methods meet the size through the FFN, and say so
        assert meta["notes"] and "one KV head" in meta["notes"][0]
    out = pruning.save_pruned(result.model, tmp_path / method, meta, tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    text = tokenizer(wikitext2_test_text(data_root)[:20_000], add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(text[:, :64]).logits, result.model(text[:, :64]).logits, rtol=0, atol=0)
    scored = perplexity(reloaded, text, seqlen=128, max_windows=2, progress=False, bos=2)
    assert scored["bos"] and 1 < scored["ppl"] < 10_000
