"""Pruning methods, one file each, registered by name: adding a method is adding a file."""

from __future__ import annotations

import importlib
import inspect
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


def method_options(name: str) -> dict[str, object]:
    """A method's options and their defaults (its constructor's keyword arguments)."""
    if name not in METHODS:
        raise PruningError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}")
    params = list(inspect.signature(METHODS[name].__init__).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind is p.POSITIONAL_OR_KEYWORD}


def get_method(name: str, **options) -> PruningMethod:
    known = method_options(name)
    for option in options:
        if option not in known:
            raise _unknown_option(name, option, known)
    return METHODS[name](**options)


def _unknown_option(name: str, option: str, known: dict) -> PruningError:
    return PruningError(f"unknown option {option!r} of method {name}: "
                        + (f"its options are {', '.join(known)}" if known else "it takes no options"))


def _option_value(name: str, option: str, text: str, default: object) -> object:
    """`text` read as the type of the option's default."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            raise PruningError(f"option {option} of method {name} is true or false, not {text!r}")
        return text.lower() == "true"
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise PruningError(f"option {option} of method {name} is a number, not {text!r}") from None
    return text


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """`name` or `name:option=value,option=value` -> (name, options); options equal to the default are dropped,
    so every spelling of one configuration has one canonical form (`method_spec`)."""
    name, colon, rest = spec.partition(":")
    name = name.strip()
    known = method_options(name)
    if colon and not rest.strip():
        raise PruningError(f"malformed method spec {spec!r}: nothing after ':' (write e.g. fasp:restore=false)")
    options = {}
    for item in (part.strip() for part in rest.split(",")) if colon else ():
        option, equals, text = item.partition("=")
        option = option.strip().replace("-", "_")
        if not equals or not option or not text.strip():
            raise PruningError(f"malformed method spec {spec!r}: write name:option=value[,option=value], "
                               "e.g. fasp:restore=false")
        if option not in known:
            raise _unknown_option(name, option, known)
        value = _option_value(name, option, text.strip(), known[option])
        if value != known[option]:
            options[option] = value
    get_method(name, **options)  # the method's own validation of values
    return name, options


def method_spec(name: str, options: dict) -> str:
    """The canonical spec of a configuration: options sorted, booleans lower-case."""
    if not options:
        return name
    text = (str(v).lower() if isinstance(v, bool) else str(v) for v in options.values())
    return name + ":" + ",".join(f"{k}={v}" for k, v in sorted(zip(options, text)))


__all__ = ["METHODS", "PruningMethod", "get_method", "keep_top_units", "method_options", "method_spec",
           "parse_method_spec", "register"]
