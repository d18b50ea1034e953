"""vLLM serving: project architectures load through the plugin and generate what transformers generates."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is installed by tox (python -m fasp_bench.serving.install)")

from fasp_bench.serving.bench import ServeProtocol, measure_in_subprocess, serve_models  # noqa: E402
from fasp_bench.serving.measure import prompt_token_ids  # noqa: E402
from fasp_bench.store import ResultsStore  # noqa: E402

PROTOCOL = ServeProtocol(prompts=3, input_len=16, output_len=8, repeats=1, dtype="float32")


@pytest.fixture(scope="module")
def served_checkpoints(tmp_path_factory, servable_model_dirs, data_root):
    """Tiny LLaMA (GQA) and OPT models pruned several ways."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pruning
    from fasp_bench.data import calibration_ids

    root = tmp_path_factory.mktemp("served")
    for arch, dense in servable_model_dirs.items():
        tokenizer = AutoTokenizer.from_pretrained(dense)
        calibration = calibration_ids(tokenizer, 4, 32, root=data_root)
        for method in ("fasp", "flap", "wanda-sp"):
            result = pruning.prune(AutoModelForCausalLM.from_pretrained(dense), method=method, sparsity=0.3,
                                   calibration=calibration)
            pruning.save_pruned(result.model, root / f"{arch}-{method}", result.metadata, tokenizer=tokenizer)
    return root


def transformers_greedy(path: Path, protocol: ServeProtocol) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    import pruning  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = []
    with torch.no_grad():
        for ids in prompt_token_ids(model.config.vocab_size, protocol.prompts, protocol.input_len, protocol.seed):
            x = torch.tensor([ids])
            for _ in range(protocol.output_len):
                x = torch.cat([x, model(x).logits[:, -1:].argmax(-1)], dim=1)
            tokens.append(x[0, protocol.input_len:].tolist())
    return tokens


@pytest.mark.parametrize("checkpoint, what", [("llama-flap", "per-layer FFN widths + added bias"),
                                              ("llama-fasp", "narrow V heads (GQA)"),
                                              ("opt-flap", "per-layer FFN widths and head counts")])
def test_project_architecture_matches_transformers_greedy(served_checkpoints, checkpoint, what):
    path = served_checkpoints / checkpoint
    config = json.loads((path / "config.json").read_text())
    architecture = "PrunedLlamaForCausalLM" if checkpoint.startswith("llama") else "PrunedOPTForCausalLM"
    assert config["architectures"] == [architecture]
    if checkpoint.endswith("flap"):
        assert len(set(config["ffn_widths"])) > 1 and config["ffn_output_bias"]
    else:
        assert config["v_head_dims"][0] < config["head_dim"]
    result = measure_in_subprocess(str(path), PROTOCOL, timeout_s=400, return_tokens=True)
    assert "error" not in result, result["error"]
    assert result["architecture"] == architecture
    assert result["tokens"] == transformers_greedy(path, PROTOCOL), what
    for key in ("output_tok_s", "total_tok_s", "ttft_s", "kv_cache_tokens", "peak_rss_bytes"):
        assert result[key] > 0, key


def test_stock_shape_checkpoint_serves_without_the_plugin(served_checkpoints, monkeypatch):
    path = served_checkpoints / "llama-wanda-sp"
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    monkeypatch.setenv("VLLM_PLUGINS", "no-plugin")  # vLLM loads only the plugins named here: none
    result = measure_in_subprocess(str(path), PROTOCOL, timeout_s=400, return_tokens=True)
    assert "error" not in result, result["error"]
    assert result["architecture"] == "LlamaForCausalLM"
    assert result["tokens"] == transformers_greedy(path, PROTOCOL)


def test_broken_checkpoints_are_recorded_errors_and_the_run_goes_on(served_checkpoints, tmp_path):
    truncated, mismatched = tmp_path / "truncated", tmp_path / "mismatched"
    for target in (truncated, mismatched):
        shutil.copytree(served_checkpoints / "llama-wanda-sp", target)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    config = json.loads((mismatched / "config.json").read_text())
    config["intermediate_size"] = 999  # the weights say otherwise: vLLM's loader fails in its worker
    (mismatched / "config.json").write_text(json.dumps(config))

    store = ResultsStore(tmp_path / "results.jsonl")
    rows = serve_models([str(truncated), str(mismatched)], store, PROTOCOL, timeout_s=400)
    assert [row["status"] for row in rows] == ["failed", "failed"]
    assert "cannot read" in rows[0]["error"] and "is the checkpoint complete" in rows[0]["error"]
    assert "\n" not in rows[1]["error"] and rows[1]["error"], rows[1]
    assert len(store.records()) == 2 and all("error" in r["result"] for r in store.records())
    assert os.path.getsize(store.path) > 0


@pytest.mark.real_model
def test_pruned_smollm2_serves_like_transformers(tmp_path, data_root):
    import pruning
    from fasp_bench.data import calibration_ids
    from fasp_bench.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    result = pruning.prune(model, method="fasp", sparsity=0.2, calibration=calibration_ids(tokenizer, 4, 128,
                                                                                             root=data_root))
    pruning.save_pruned(result.model, tmp_path / "fasp", result.metadata, tokenizer=tokenizer)
    protocol = ServeProtocol(prompts=4, input_len=32, output_len=16, repeats=1, dtype="float32")
    served = measure_in_subprocess(str(tmp_path / "fasp"), protocol, timeout_s=500, return_tokens=True)
    assert "error" not in served, served["error"]
    assert served["tokens"] == transformers_greedy(tmp_path / "fasp", protocol)
