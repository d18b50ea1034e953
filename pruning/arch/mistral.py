"""Mistral: LLaMA's layout with no biases (sliding windows are the stock forward's business)."""

from dataclasses import replace

from transformers import MistralForCausalLM

from . import register
from .llama import LLAMA

MISTRAL = register(replace(LLAMA, name="mistral", model_types=("mistral",), stock_model=MistralForCausalLM,
                           attn_output_bias_key=None, ffn_output_bias_key=None))
