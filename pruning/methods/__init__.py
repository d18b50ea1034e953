"""Pruning methods, one file each, registered by name: adding a method is adding a file."""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import PruningError
from .base import PruningMethod, keep_top_units

METHODS: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    METHODS[cls.name] = cls
    return cls


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def get_method(name: str, **options) -> PruningMethod:
    if name not in METHODS:
        raise PruningError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](**options)


__all__ = ["METHODS", "PruningMethod", "get_method", "keep_top_units", "register"]
