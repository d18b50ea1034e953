"""LLaMA (Llama-2, Llama-3.x with `rope_scaling`, SmolLM2): the family the other decoder-only ones vary.

FFN `gate_proj` + `up_proj` rows / `down_proj` columns; attention `v_proj` rows / `o_proj` columns;
GQA. `attention_bias` puts biases on q/k/v/o, `mlp_bias` on the FFN.
"""

from transformers import LlamaForCausalLM

from . import register
from .base import Family

LLAMA = register(Family(name="llama", model_types=("llama",), stock_model=LlamaForCausalLM))
