"""Gemma-3 text model (`Gemma3ForCausalLM`, model_type gemma3_text): LLaMA's linear layout with gated GELU,
per-head q/k norms, pre/post feed-forward norms (the post-attention and post-FFN norms sit between a consumer's
output and the residual add), sliding-window and global layers and scaled embeddings,
all of which the stock forward keeps doing. Small sizes have one KV head: a head unit is then the whole
attention of a layer."""

from dataclasses import replace

from transformers import Gemma3ForCausalLM

from . import register
from .llama import LLAMA

GEMMA3 = register(replace(LLAMA, name="gemma3", model_types=("gemma3_text",), stock_model=Gemma3ForCausalLM,
                          ffn_output_bias_key=None, qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
                          output_norms=(("self_attn.o_proj", "post_attention_layernorm"),
                                        ("mlp.down_proj", "post_feedforward_layernorm"))))
