"""Model registry in the timm style: ``@register_model`` on a builder, ``create_model`` by name.

Names are lower case (``resnet18``); the seed's spellings (``ResNet18``, ``MobileNetv1``, ``VGG16``)
resolve case-insensitively, ignoring ``-`` and ``_``.
"""

from __future__ import annotations

from typing import Callable

from branchy_tee.core.errors import UsageError

_MODELS: dict[str, Callable] = {}


def _canonical(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register_model(fn: Callable) -> Callable:
    """Register a builder ``fn(num_classes=10, in_channels=3, **config) -> MultiExitNet`` under its name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Registered model names, in registration order (small to large within each family)."""
    return list(_MODELS)


def resolve_name(name: str) -> str:
    """Map a user-facing spelling to the registered name, or fail with the list of valid names."""
    key = _canonical(name)
    for registered in _MODELS:
        if _canonical(registered) == key:
            return registered
    raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(_MODELS)}")


def _check_config(registered: str, config: dict) -> None:
    """Options whose default is a number take a positive number (widths, multipliers, growth rates):
    anything else would fail deep inside the builder, or build a network of zero channels."""
    import inspect

    params = inspect.signature(_MODELS[registered]).parameters
    for key, value in config.items():
        default = params[key].default if key in params else None
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise UsageError(f"--model-config {key}={value}: {registered}'s {key} takes a positive number")


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **config):
    """Build a multi-exit model by name. Extra ``config`` keys are passed to the family builder."""
    if num_classes < 2:
        raise UsageError(f"num_classes must be at least 2, got {num_classes}")
    if in_channels not in (1, 3):
        raise UsageError(f"in_channels must be 1 or 3, got {in_channels}")
    registered = resolve_name(name)
    _check_config(registered, config)
    try:
        model = _MODELS[registered](num_classes=num_classes, in_channels=in_channels, **config)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise UsageError(f"model {registered} does not take option(s) {', '.join(sorted(config))}") from None
        raise
    model.arch = registered
    model.config = {"num_classes": num_classes, "in_channels": in_channels, **config}
    return model
