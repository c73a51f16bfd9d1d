"""Name -> (config dataclass, model-level class) registry, filled on import."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from torch import nn

from san.errors import ConfigError, UserError
from san.methods.base import MethodConfig, PeftModel

_METHODS: dict[str, type[PeftModel]] = {}


class UnknownMethodError(UserError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def register_method(name: str, model_class: type[PeftModel]) -> type[PeftModel]:
    if name in _METHODS and _METHODS[name] is not model_class:
        raise ValueError(f"method {name!r} is registered twice ({_METHODS[name].__name__} and {model_class.__name__})")
    model_class.method_name = name
    _METHODS[name] = model_class
    return model_class


def available_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[PeftModel]:
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; accepted: {', '.join(available_methods())}"
        ) from None


def method_config(name: str, settings: Mapping[str, Any]) -> MethodConfig:
    """Build the method's config dataclass; unknown fields are an error naming the accepted ones."""
    config_class = method_class(name).config_class
    accepted = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise ConfigError(
            f"method {name!r} has no setting(s) {unknown}; accepted: {sorted(accepted)} "
            f"(set one as method.<setting>=<value>)"
        )
    return config_class(**dict(settings))


def build_method(name: str, model: nn.Module, settings: Mapping[str, Any] | None = None) -> PeftModel:
    """Adapt `model` (a timm model, modified in place) with the named method."""
    config = method_config(name, settings or {})
    return method_class(name)(model, config)


# Keys of a `method` config node that name it rather than configure it.
NAMING_KEYS = ("name", "label")


def method_settings(method_node: Mapping[str, Any]) -> dict[str, Any]:
    """A `method` config node without its names: the fields of the method's dataclass."""
    return {k: v for k, v in method_node.items() if k not in NAMING_KEYS}


def method_label(method_node: Mapping[str, Any]) -> str:
    """How results name the method: its `label` when an experiment sets one (an ablation
    variant such as san_no_propagation), else its registered name."""
    return method_node.get("label") or method_node["name"]


def build_method_from_config(model: nn.Module, method_node: Mapping[str, Any]) -> PeftModel:
    """Adapt `model` with the method a resolved `method` config node describes."""
    return build_method(method_node["name"], model, method_settings(method_node))
