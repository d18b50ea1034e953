"""Qwen3: LLaMA's layout plus per-head `q_norm`/`k_norm` over head_dim (Q and K stay whole, so they stay valid)."""

from dataclasses import replace

from transformers import Qwen3ForCausalLM

from . import register
from .llama import LLAMA

QWEN3 = register(replace(LLAMA, name="qwen3", model_types=("qwen3",), stock_model=Qwen3ForCausalLM,
                         ffn_output_bias_key=None, qk_norms=("self_attn.q_norm", "self_attn.k_norm")))
