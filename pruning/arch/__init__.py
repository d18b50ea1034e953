"""Architecture families, one small file each, registered by `model_type` (like the methods' `@register`).

A family is data (`base.Family`: where things are); couplings, costs, shapes and the project architecture
are derived from it in `base.py`. A family that is a variant of another is a `dataclasses.replace` of it.
Registering a family also registers its project architecture (`pruned_<model_type>`) with transformers'
Auto classes, so a pruned checkpoint loads with plain `AutoModelForCausalLM.from_pretrained` after
`import pruning` (no remote code).
"""

from __future__ import annotations

import importlib
import pkgutil

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..errors import PruningError
from .base import ArchAdapter, Coupling, Family, LayerShape, project_classes

FAMILIES: dict[str, Family] = {}  # model_type (stock and project) -> family


def register(family: Family) -> Family:
    for model_type in (*family.model_types, family.project_model_type):
        FAMILIES[model_type] = family
    config_cls, model_cls = project_classes(family)
    AutoConfig.register(family.project_model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    return family


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def supported_model_types() -> list[str]:
    """The stock `model_type`s fasp-bench prunes."""
    return sorted(t for t, family in FAMILIES.items() if t in family.model_types)


def families() -> list[Family]:
    return sorted({f.name: f for f in FAMILIES.values()}.values(), key=lambda f: f.name)


def get_adapter(config: PretrainedConfig) -> ArchAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise PruningError(
            f"unsupported architecture {model_type!r}: fasp-bench prunes model types "
            f"{', '.join(supported_model_types())} (add a family file under pruning/arch/ for another)"
        )
    return ArchAdapter(FAMILIES[model_type], config)


__all__ = ["FAMILIES", "ArchAdapter", "Coupling", "Family", "LayerShape", "families", "get_adapter", "register",
           "supported_model_types"]
