"""vLLM general plugin (entry point group `vllm.general_plugins`): registers the project architectures.

vLLM calls `register` in every process it starts (front end, engine core, workers). Importing `pruning`
registers the `pruned_*` model types with transformers' AutoConfig there, which vLLM's config parsing needs.
Stock-shape checkpoints never reach this code: their config names the stock architecture.
"""

from __future__ import annotations

# A family is served by vLLM's model of its stock architecture (vllm_pruned.py), except:
# - where vLLM's attention derives the head size from hidden_size / heads, which a per-layer head count
#   breaks: served as another architecture with the config flags that make it this family's layer,
SERVED_AS = {"qwen2": ("LlamaForCausalLM", {"qkv_bias": True})}  # vLLM's LLaMA with q/k/v biases is Qwen2's layer
# - or given a model file of its own.
OWN_FILES = {"opt": "fasp_bench.serving.vllm_opt"}


def architectures() -> dict[str, str]:
    """Project architecture name in config.json -> "module:class" of its vLLM implementation, per family."""
    from pruning.arch import families
    from pruning.arch.base import project_classes

    found = {}
    for family in families():
        name = project_classes(family)[1].__name__
        found[name] = f"{OWN_FILES.get(family.name, 'fasp_bench.serving.vllm_pruned')}:{name}"
    return found


def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for architecture, target in architectures().items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, target)
