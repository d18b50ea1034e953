"""Streamed pruning (one block in memory, shards in and out) against in-memory pruning as the oracle."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import family_configs, tiny_family
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import pruning
from pruning.checkpoint import content_fingerprint
from pruning.streaming import INDEX_FILE


def _tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _sharded(name: str, tmp_path):
    model = tiny_family(name)
    source = tmp_path / f"{name}-source"
    model.save_pretrained(source, max_shard_size="300KB")  # several shards, blocks split across files
    assert (source / INDEX_FILE).is_file()
    return model, source


FAMILIES = ("llama", "gemma3", "opt")
CASES = [(name, method, 0.3, {}) for name in FAMILIES for method in sorted(pruning.METHODS)]
# the dense target streams the uncut block inputs beside the pruned ones
CASES += [(name, "fasp-plus", 0.3, {"target": "dense"}) for name in FAMILIES]
# FLAP at 50% on the tiny LLaMA removes a head in layer 0 only: its o_proj gains a bias after the other
# blocks' shards are written, so those are rewritten with zero biases
CASES.append(("llama", "flap", 0.5, {}))


@pytest.mark.parametrize("name, method, sparsity, options", CASES)
def test_streamed_checkpoint_equals_in_memory_pruning(name, method, sparsity, options, calibration, probe, tmp_path):
    model, source = _sharded(name, tmp_path)
    in_memory = pruning.prune(model, method=method, sparsity=sparsity, calibration=calibration, progress=False,
                              **options)
    pruning.save_pruned(in_memory.model, tmp_path / "memory", in_memory.metadata)
    streamed = pruning.prune_pretrained(source, tmp_path / "streamed", method=method, sparsity=sparsity,
                                        calibration=calibration, progress=False, **options)
    if sparsity == 0.5:
        assert sorted(set(streamed.metadata["layers"]["kv_heads"])) == [1, 2]  # the case this entry is for

    expected, got = _tensors(tmp_path / "memory"), _tensors(tmp_path / "streamed")
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].shape == tensor.shape and got[key].dtype == tensor.dtype, key
        torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config == json.loads((tmp_path / "memory" / "config.json").read_text())
    assert streamed.metadata["layers"] == in_memory.metadata["layers"]
    assert streamed.metadata["fingerprint"]["sha256_20"] == content_fingerprint(tmp_path / "streamed")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(probe).logits, in_memory.model(probe).logits, rtol=1e-4, atol=1e-5)


def test_offloaded_activations_change_nothing(calibration, tmp_path):
    _, source = _sharded("llama", tmp_path)
    for folder, offload in (("kept", False), ("offloaded", True)):
        pruning.prune_pretrained(source, tmp_path / folder, method="fasp", sparsity=0.3, calibration=calibration,
                                 offload_activations=offload, progress=False)
    kept, offloaded = _tensors(tmp_path / "kept"), _tensors(tmp_path / "offloaded")
    assert all(torch.equal(kept[k], offloaded[k]) for k in kept)


def test_a_missing_tensor_is_a_one_line_error_and_leaves_nothing(calibration, tmp_path):
    model = tiny_family("llama")
    source = tmp_path / "source"
    state = model.state_dict()
    del state["model.layers.1.mlp.down_proj.weight"]
    model.save_pretrained(source, state_dict=state)
    with pytest.raises(pruning.PruningError, match=r"lacks tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        pruning.prune_pretrained(source, tmp_path / "out", method="fasp", sparsity=0.2, calibration=calibration,
                                 progress=False)
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


# Peak from VmHWM, not ru_maxrss: Linux carries the parent's peak RSS across fork+exec into ru_maxrss, so a
# test process holding a model would make every child look as big.
MEMORY_PROBE = textwrap.dedent("""
    import json, re, sys, torch
    import pruning
    def status(field):
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    source, out, streamed = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    calibration = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    torch.ones(1) @ torch.ones(1)  # load the kernels before the baseline
    before = status("VmRSS")
    if streamed:
        pruning.prune_pretrained(source, out, method="wanda-sp", sparsity=0.2, calibration=calibration,
                                 progress=False)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(source)
        pruning.prune(model, method="wanda-sp", sparsity=0.2, calibration=calibration, progress=False)
    print(json.dumps({"growth": status("VmHWM") - before}))
""")


def test_streamed_pruning_never_holds_the_whole_model(tmp_path):
    """A ~320 MB model (12 blocks of ~27 MB): streamed, peak host memory grows by less than half of it;
    in memory (the control, so the probe can see growth) it grows by most of the model."""
    config = family_configs()["llama"]
    config.update({"hidden_size": 512, "intermediate_size": 4096, "num_hidden_layers": 12, "vocab_size": 512})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path / "source", max_shard_size="50MB")
    del model
    growth = {}
    for streamed in (True, False):
        proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "source"),
                               str(tmp_path / f"out{streamed}"), "1" if streamed else "0"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        growth[streamed] = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    assert growth[True] < 0.5 * model_bytes, (growth, model_bytes)
    assert growth[False] > 0.75 * model_bytes, (growth, model_bytes)
