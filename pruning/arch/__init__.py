"""Architecture adapters, one file per family, found by the checkpoint's `model_type`.

Importing this package registers every project architecture with transformers' Auto classes, so a
pruned checkpoint loads with plain `AutoModelForCausalLM.from_pretrained` after `import pruning`.
"""

from __future__ import annotations

import importlib
import pkgutil

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..errors import PruningError
from .base import ArchAdapter, Coupling, LayerShape

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

ADAPTERS: dict[str, ArchAdapter] = {}
for _cls in ArchAdapter.__subclasses__():
    _adapter = _cls()
    _project_type = _cls.project_config_cls.model_type
    for _model_type in (*_cls.stock_model_types, _project_type):
        ADAPTERS[_model_type] = _adapter
    AutoConfig.register(_project_type, _cls.project_config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_cls.project_config_cls, _cls.project_model_cls, exist_ok=True)


def supported_model_types() -> list[str]:
    return sorted(t for t in ADAPTERS if not t.startswith("pruned_"))


def get_adapter(config: PretrainedConfig) -> ArchAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise PruningError(
            f"unsupported architecture {model_type!r}: fasp-bench prunes {', '.join(supported_model_types())} "
            "models (add an adapter file under pruning/arch/ for another family)"
        )
    return ADAPTERS[model_type]


__all__ = ["ADAPTERS", "ArchAdapter", "Coupling", "LayerShape", "get_adapter", "supported_model_types"]
