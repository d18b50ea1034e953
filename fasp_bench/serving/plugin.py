"""vLLM general plugin (entry point group `vllm.general_plugins`): registers the project architectures.

vLLM calls `register` in every process it starts (front end, engine core, workers). Importing `pruning`
registers the `pruned_*` model types with transformers' AutoConfig there, which vLLM's config parsing needs.
Stock-shape checkpoints never reach this code: their config names the stock architecture.
"""

from __future__ import annotations

# Architecture name in config.json -> "module:class" of its vLLM implementation (one file per architecture).
ARCHITECTURES = {
    "PrunedLlamaForCausalLM": "fasp_bench.serving.vllm_llama:PrunedLlamaForCausalLM",
    "PrunedOPTForCausalLM": "fasp_bench.serving.vllm_opt:PrunedOPTForCausalLM",
}


def register() -> None:
    from vllm import ModelRegistry

    import pruning  # noqa: F401  (AutoConfig registration of pruned_llama / pruned_opt)

    supported = set(ModelRegistry.get_supported_archs())
    for architecture, target in ARCHITECTURES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, target)
