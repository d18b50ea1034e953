"""OPT: FFN `fc1` rows (+ bias) / `fc2` columns; attention `v_proj` rows (+ bias) / `out_proj` columns.
Multi-head attention (each V row feeds one out_proj column); the attention keeps its head count in
`num_heads`, which follows the layer's width."""

from transformers import OPTForCausalLM

from . import register
from .base import Family

OPT = register(Family(name="opt", model_types=("opt",), stock_model=OPTForCausalLM, layers="model.decoder.layers",
                      o_proj="out_proj", ffn_producers=("fc1",), ffn_consumer="fc2", ffn_width_key="ffn_dim",
                      kv_heads_key=None, attn_output_bias_key="enable_bias", ffn_output_bias_key="enable_bias",
                      head_count_attrs=("num_heads",)))
