"""--round-to / --tp-multiple: widths that deploy, the size still met, the checkpoint still exact."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_family
from transformers import AutoModelForCausalLM

import pruning
from pruning.arch import Coupling
from pruning.budget import Alignment


def _kv_coupling(kv_heads: int) -> Coupling:
    columns = torch.arange(kv_heads)[:, None]
    return Coupling("attn", {"k": columns}, "o", columns, unit="kv_head")


def _vllm_splits(kv_heads: int, query_groups: int, tp: int) -> bool:
    """vLLM's own conditions (LlamaAttention / QKVParallelLinear) for a tensor-parallel size `tp`."""
    if kv_heads == 0:
        return True  # a layer without attention has nothing to split
    heads_ok = kv_heads * query_groups % tp == 0
    kv_ok = kv_heads % tp == 0 if kv_heads >= tp else tp % kv_heads == 0
    return heads_ok and kv_ok


@pytest.mark.parametrize("kv_heads, groups, tp", [(8, 4, 4), (8, 1, 2), (6, 2, 4), (3, 3, 2)])
def test_kv_head_counts_are_exactly_those_vllm_can_split(kv_heads, groups, tp):
    allowed = Alignment(tp_multiple=tp).removals(_kv_coupling(kv_heads), head_dim=64, query_groups=groups)
    kept = {kv_heads - r for r in allowed}
    oracle = {k for k in range(kv_heads + 1) if _vllm_splits(k, groups, tp)} | {kv_heads}  # unpruned is allowed
    assert kept == oracle


def test_bad_alignment_is_refused():
    with pytest.raises(pruning.PruningError, match="round_to must be a whole number"):
        Alignment(round_to=0)


def _removed_params(model) -> int:
    """Weights of every block's attention and MLP linears, counted from the model itself."""
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in name)


@pytest.mark.parametrize("method", sorted(pruning.METHODS))
def test_aligned_widths_meet_the_size_and_reload_exactly(method, calibration, probe, tmp_path):
    round_to, tp = 40, 2  # 40 does not divide the unaligned widths (192 neurons, 40 V dims at 30%)
    model = tiny_family("llama")
    hidden = model.config.hidden_size
    before = _removed_params(model)
    result = pruning.prune(model, method=method, sparsity=0.3, calibration=calibration, round_to=round_to,
                           tp_multiple=tp, progress=False)
    layers = result.metadata["layers"]
    stock_ffn, head_dim = model.config.intermediate_size, 64  # an untouched width may stay as it was
    assert all(w % round_to == 0 or w == stock_ffn for w in layers["ffn_widths"]), layers
    assert all(d % round_to == 0 or d == head_dim for d in layers["v_head_dims"]), layers
    assert all(_vllm_splits(k, 2, tp) for k in layers["kv_heads"]), layers
    assert result.metadata["alignment"] == {"round_to": round_to, "tp_multiple": tp}

    removed = before - _removed_params(result.model)
    # one aligned unit per layer, the largest of: round_to FFN neurons (gate, up, down), round_to V dimensions
    # in each of 2 KV heads (v rows, o columns of 2 query heads), one KV head with its 2 query heads of 64
    steps = (round_to * 3 * hidden, round_to * 2 * (hidden + 2 * hidden), 64 * hidden * (2 + 2 + 1 + 1))
    slack = len(layers["ffn_widths"]) * max(steps)
    assert abs(removed - 0.3 * before) <= slack, (removed, 0.3 * before, slack)

    pruning.save_pruned(result.model, tmp_path / "ck", result.metadata)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(probe).logits, result.model(probe).logits, rtol=0, atol=0)
