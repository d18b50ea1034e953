"""Qwen2 / Qwen2.5: LLaMA's layout; q/k/v always carry biases (read from the modules), o_proj never."""

from dataclasses import replace

from transformers import Qwen2ForCausalLM

from . import register
from .llama import LLAMA

QWEN2 = register(replace(LLAMA, name="qwen2", model_types=("qwen2",), stock_model=Qwen2ForCausalLM,
                         attn_output_bias_key=None, ffn_output_bias_key=None))
