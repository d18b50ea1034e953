"""End-to-end on the real Qwen2.5-Coder-0.5B (reassembled from its six PyPI part wheels, converted once, cached):
the only real model here with q/k/v biases, GQA 14:2 and no BOS."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2ForCausalLM

import pruning
from fasp_bench.data import bos_id, calibration_ids, wikitext2_test_text
from fasp_bench.models import ensure_embedded, load_model
from fasp_bench.perplexity import perplexity

pytestmark = pytest.mark.real_model
NAME = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="module")
def qwen():
    return load_model(NAME)


def test_converted_folder_holds_only_plain_tensors_of_the_models_parameter_count():
    folder = ensure_embedded(NAME)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["Qwen2ForCausalLM"]
    dtypes, numel, names = set(), 0, set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            for name in weights.keys():
                piece = weights.get_slice(name)
                dtypes.add(piece.get_dtype())
                numel += torch.Size(piece.get_shape()).numel()
                names.add(name)
    assert dtypes == {"F32"}  # no packed (uint8 / int) GGUF blocks survive
    with torch.device("meta"):  # the parameter count of the architecture the config describes
        skeleton = Qwen2ForCausalLM(AutoConfig.from_pretrained(folder))
    expected = dict(skeleton.named_parameters())
    assert names == set(expected) and numel == sum(p.numel() for p in expected.values())
    assert 629e6 < numel < 631e6 and "lm_head.weight" in names  # the 630M, untied head
    assert "Apache-2.0" in (folder / "SOURCE.md").read_text()


def test_qwen_05b_prunes_reloads_keeps_biases_scores_and_serves_like_transformers(qwen, data_root, tmp_path):
    model, tokenizer = qwen
    assert bos_id(tokenizer) is None  # Qwen adds no BOS
    config = model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (896, 14, 2)
    ids = calibration_ids(tokenizer, nsamples=4, seqlen=128, seed=0, root=data_root)
    result = pruning.prune(model, "fasp", 0.2, ids, progress=False)
    meta = result.metadata
    assert meta["sparsity_realised"] == pytest.approx(0.2, abs=0.005) and meta["family"] == "qwen2"
    out = pruning.save_pruned(result.model, tmp_path / "fasp", meta, tokenizer=tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["PrunedQwen2ForCausalLM"] and config["v_head_dims"][3] < 64
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    attention = reloaded.model.layers[3].self_attn
    assert attention.q_proj.bias.shape == (896,) and attention.k_proj.bias.shape == (128,)
    assert attention.v_proj.bias.shape == (2 * config["v_head_dims"][3],)  # V rows cut with their biases
    assert attention.o_proj.bias is None
    text = tokenizer(wikitext2_test_text(data_root)[:20_000], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(text[:, :64]).logits, result.model(text[:, :64]).logits, rtol=0, atol=0)
    scored = perplexity(reloaded, text, seqlen=128, max_windows=2, progress=False, bos=None)
    assert not scored["bos"] and 1 < scored["ppl"] < 10_000

    pytest.importorskip("vllm", reason="vLLM is installed by tox (python -m fasp_bench.serving.install)")
    from test_serving import transformers_greedy

    from fasp_bench.serving.bench import ServeProtocol, measure_in_subprocess

    protocol = ServeProtocol(prompts=2, input_len=24, output_len=12, repeats=1, dtype="float32")
    served = measure_in_subprocess(str(out), protocol, timeout_s=600, return_tokens=True)
    assert "error" not in served, served["error"]
    assert served["architecture"] == "PrunedQwen2ForCausalLM" and not served["bos"]
    assert served["tokens"] == transformers_greedy(out, protocol)
