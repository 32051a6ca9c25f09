"""The multi-exit model zoo. Importing this package registers every family.

The import order is the order ``list_models()`` reports: small to large.
"""

# isort: off
from branchy_tee.models import lenet, alexnet, vgg, resnet, densenet, mobilenet  # noqa: F401  (registration side effect)

# isort: on
from branchy_tee.models.multiexit import MultiExitNet
from branchy_tee.models.registry import create_model, list_models, register_model, resolve_name

__all__ = ["MultiExitNet", "create_model", "list_models", "register_model", "resolve_name"]
