"""The multi-exit model zoo. Importing this package registers every family.

The import order is the order ``list_models()`` reports: small to large, as in DESIGN.md.
"""

# isort: off
from . import lenet, alexnet, vgg, resnet, densenet, mobilenet  # noqa: F401  (registration side effect)

# isort: on
from .multiexit import MultiExitNet
from .registry import create_model, list_models, register_model, resolve_name

__all__ = ["MultiExitNet", "create_model", "list_models", "register_model", "resolve_name"]
