"""The serving limits: bytes a decode step reads and prefill FLOPs, from the config, against the weight shapes."""

from __future__ import annotations

import pytest
from conftest import family_configs, tiny_family
from torch import nn
from transformers import LlamaConfig

import pruning
from fasp_bench.serving.roofline import serving_cost, share


def _matmul_weights(model: nn.Module) -> int:
    """Parameters of every linear a decode step multiplies by: the blocks' linears and the LM head."""
    adapter = pruning.get_adapter(model.config)
    blocks = sum(m.weight.numel() for layer in adapter.layers(model) for m in layer.modules()
                 if isinstance(m, nn.Linear))
    return blocks + model.get_output_embeddings().weight.numel()


@pytest.mark.parametrize("family", sorted(family_configs()))
def test_weight_bytes_equal_the_linears_of_the_model_the_config_builds(family, calibration):
    dense = tiny_family(family)
    assert serving_cost(dense.config, "bfloat16").weight_bytes == 2 * _matmul_weights(dense)
    pruned = pruning.prune(dense, method="fasp", sparsity=0.3, calibration=calibration, progress=False).model
    cost = serving_cost(pruned.config, "float32")
    assert cost.weight_bytes == 4 * _matmul_weights(pruned)
    assert cost.weight_bytes < serving_cost(dense.config, "float32").weight_bytes


def _two_layer_config(**extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=2, tie_word_embeddings=True, **extra)


def test_decode_bytes_and_prefill_flops_by_hand():
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8, gate/up/down 3 x 8x12 = 64+32+32+64+288 = 480; head 100x8 = 800
    cost = serving_cost(_two_layer_config(), "bfloat16")
    assert cost.weight_bytes == 2 * (2 * 480 + 800)
    # KV per token: 2 layers x 2 KV heads x (K 2 + V 2) values x 2 bytes = 32 bytes
    assert cost.kv_bytes_per_token() == 32
    assert cost.decode_bytes(batch=3, context=10) == 2 * (2 * 480 + 800) + 3 * 10 * 32
    # prefill of 2 prompts of 3 tokens: linears 2*3*480 per layer; attention: 1+2+3 = 6 causal (q, k) pairs,
    # 4 query heads, QK^T over 2 dims and PV over 2 dims: 2*6*4*(2+2) per layer; head for the last token 2*800
    per_prompt = 2 * (2 * 3 * 480 + 2 * 6 * 4 * 4) + 2 * 800
    assert cost.prefill_flops(batch=2, prompt_len=3) == 2 * per_prompt


def test_a_sliding_window_caps_what_a_layer_caches_and_attends():
    windowed = serving_cost(_two_layer_config(sliding_window=2, layer_types=["sliding_attention", "full_attention"]),
                            "float32")
    full = serving_cost(_two_layer_config(), "float32")
    # layer 0 sees at most 2 tokens: at context 10 it reads 2 tokens' K/V (2 heads x 4 values x 4 bytes = 32 each)
    assert full.decode_bytes(1, 10) - windowed.decode_bytes(1, 10) == (10 - 2) * 32
    # causal pairs of 3 tokens with a window of 2: 1 + 2 + 2 = 5 instead of 6, one pair of 4 heads x 4 dims less
    assert full.prefill_flops(1, 3) - windowed.prefill_flops(1, 3) == 2 * 1 * 4 * 4


def test_narrow_v_saves_cache_only_where_the_engine_stores_it_narrow(calibration):
    dense = tiny_family("llama")
    pruned = pruning.prune(dense, method="fasp", sparsity=0.3, calibration=calibration, progress=False).model
    dims = pruned.config.v_head_dims
    assert min(dims) < 64, "FASP at 30% narrows V"
    cost, base = serving_cost(pruned.config, "float32"), serving_cost(dense.config, "float32")
    kv = sum(n * (64 + dv) for n, dv in zip(pruned.config.kv_heads, dims, strict=True))
    assert cost.kv_bytes_per_token() == 4 * kv < base.kv_bytes_per_token()
    assert cost.kv_bytes_per_token(padded_v=True) == base.kv_bytes_per_token()


def test_share_of_the_limit():
    assert share(1.1, 1.2) == pytest.approx(0.5)
    assert share(1.05, 1.0) is None  # nothing pruned: no limit to share
    assert share(float("nan"), 1.3) is None


def test_config_shapes_of_a_pruned_config_are_its_lists(calibration):
    pruned = pruning.prune(tiny_family("qwen2"), method="flap", sparsity=0.3, calibration=calibration,
                           progress=False).model
    adapter = pruning.get_adapter(pruned.config)
    assert adapter.config_shapes(pruned.config) == [adapter.layer_shape(layer) for layer in adapter.layers(pruned)]
