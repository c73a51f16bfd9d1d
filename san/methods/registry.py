"""Methods by name, through one door.

`register_method(name, model_class)` is the door: a method module calls it when it is
imported. Which modules exist is read from the Python entry-point group
`san_peft.methods` (pyproject.toml of this project, and of any installed package that
adds methods): each entry point names a module, and importing it registers its methods.
The core therefore never imports a plugin package (`baselines/` included); it loads
whatever is installed, the first time a method is asked for.

Each method's config dataclass is the single source of its settings: Hydra's `method`
group gets it through the ConfigStore (`store_method_configs`), so `method=san` needs no
YAML file; YAML files in configs/method/ are only named variants of a registered method.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import typing
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

from san.errors import ConfigError, UserError

if TYPE_CHECKING:  # the registry itself stays light: san-report and planning import it
    from torch import nn

    from san.methods.base import AdaptedModel, MethodConfig

ENTRY_POINT_GROUP = "san_peft.methods"
# Keys of a `method` config node that name it rather than configure it.
NAMING_KEYS = ("name", "label")

_METHODS: dict[str, type[AdaptedModel]] = {}
_plugins_loaded = False
# Methods whose schema is in Hydra's ConfigStore (building one probes OmegaConf per field).
_STORED: set[str] = set()


class UnknownMethodError(UserError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class NoMethodsInstalledError(UserError, RuntimeError):
    pass


def register_method(name: str, model_class: type[AdaptedModel]) -> type[AdaptedModel]:
    if name in _METHODS and _METHODS[name] is not model_class:
        raise ValueError(f"method {name!r} is registered twice ({_METHODS[name].__name__} and {model_class.__name__})")
    model_class.method_name = name
    _METHODS[name] = model_class
    return model_class


def load_plugins(entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> None:
    """Import every module the `san_peft.methods` entry points name (each registers on import).

    `entry_points` replaces the installed ones (tests pass their own through the same door)."""
    global _plugins_loaded
    if entry_points is None:
        if _plugins_loaded:
            return
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        if not entry_points:
            raise NoMethodsInstalledError(_no_plugins_message())
        _plugins_loaded = True
    for entry_point in entry_points:
        entry_point.load()


def _no_plugins_message() -> str:
    message = (
        f"no method plugins are installed (entry-point group {ENTRY_POINT_GROUP!r} is empty): install the "
        "checkout so its entry points are registered: make install (or pip install -e .)"
    )
    try:
        metadata = importlib.metadata.distribution("san-peft-bench")
    except importlib.metadata.PackageNotFoundError:
        return message
    # metadata found without the group: usually a stale *.egg-info (from an old build) in the
    # working directory, which Python reads before the installed metadata
    return f"{message}; the metadata Python found is {metadata._path} (delete it if it is a stale build)"


def available_methods() -> list[str]:
    load_plugins()
    return sorted(_METHODS)


def method_class(name: str) -> type[AdaptedModel]:
    load_plugins()
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; accepted: {', '.join(available_methods())} (a method added since the "
            f"install needs its entry point in pyproject.toml and `make install`)"
        ) from None


def method_config(name: str, settings: Mapping[str, Any]) -> MethodConfig:
    """Build the method's config dataclass; unknown fields are an error naming the accepted ones."""
    config_class = method_class(name).config_class
    accepted = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise ConfigError(
            f"method {name!r} has no setting(s) {unknown}; accepted: {sorted(accepted)} "
            f"(set one as method.<setting>=<value>; san-params method={name} --describe lists them)"
        )
    try:
        return config_class(**dict(settings))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"method {name!r}: {error}") from error


def build_method(name: str, model: nn.Module, settings: Mapping[str, Any] | None = None) -> AdaptedModel:
    """Adapt `model` (a timm model, modified in place) with the named method."""
    config = method_config(name, settings or {})
    return method_class(name)(model, config)


def method_settings(method_node: Mapping[str, Any]) -> dict[str, Any]:
    """A `method` config node without its names: the fields of the method's dataclass."""
    return {k: v for k, v in method_node.items() if k not in NAMING_KEYS}


def method_label(method_node: Mapping[str, Any]) -> str:
    """How results name the method: its `label` when a variant or an experiment sets one
    (adaptformer, san_no_propagation), else its registered name."""
    return method_node.get("label") or method_node["name"]


def build_method_from_config(model: nn.Module, method_node: Mapping[str, Any]) -> AdaptedModel:
    """Adapt `model` with the method a resolved `method` config node describes."""
    return build_method(method_node["name"], model, method_settings(method_node))


# --- the dataclass as Hydra's config -------------------------------------------------------
def _omegaconf_accepts(annotation: Any, value: Any) -> bool:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    probe = dataclasses.make_dataclass(
        "Probe", [("value", annotation, dataclasses.field(default_factory=lambda: value))]
    )
    try:
        OmegaConf.structured(probe)
    except (OmegaConfBaseException, ValueError, TypeError):
        return False
    return True


def _default(spec: dataclasses.Field) -> Any:
    return spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()


def config_schema(name: str) -> type:
    """The method's dataclass as a Hydra structured config: its fields (with their help) and
    `name`/`label`. A field whose type OmegaConf cannot hold (a union of a list and a
    string, such as SAN's `positions`) is typed Any here; the dataclass checks it on build."""
    config_class = method_class(name).config_class
    hints = typing.get_type_hints(config_class)
    fields: list[tuple[str, Any, dataclasses.Field]] = [
        ("name", str, dataclasses.field(default=name, metadata={"help": "The registered method."})),
        (
            "label",
            Optional[str],
            dataclasses.field(
                default=None, metadata={"help": "How results name this variant (default: the registered name)."}
            ),
        ),
    ]
    for spec in dataclasses.fields(config_class):
        value = _default(spec)
        annotation = hints[spec.name] if _omegaconf_accepts(hints[spec.name], value) else Any
        fields.append(
            (
                spec.name,
                annotation,
                dataclasses.field(default_factory=lambda value=value: value, metadata=spec.metadata),
            )
        )
    return dataclasses.make_dataclass(f"{config_class.__name__}Schema", fields)


def store_method_configs() -> None:
    """Put every registered method's schema into Hydra's `method` group, once per method."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name in available_methods():
        if name not in _STORED:
            store.store(group="method", name=name, node=config_schema(name))
            _STORED.add(name)


def describe(name: str) -> str:
    """The method's settings with their types, defaults and help, for `san-params --describe`."""
    config_class = method_class(name).config_class
    hints = typing.get_type_hints(config_class)
    doc = (method_class(name).__doc__ or "").strip().splitlines()
    lines = [f"method {name}: {doc[0] if doc else config_class.__name__}", "settings (method.<setting>=<value>):"]
    for spec in dataclasses.fields(config_class):
        default = _default(spec)
        annotation = getattr(hints[spec.name], "__name__", None) or str(hints[spec.name]).replace("typing.", "")
        lines.append(f"  {spec.name} ({annotation}, default {default!r}): {spec.metadata.get('help', '')}")
    return "\n".join(lines)
