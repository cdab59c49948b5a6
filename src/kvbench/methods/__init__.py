"""KV-cache methods. Importing this package imports every module in it, and each registers its
methods (base.register): adding a method is adding a file, no import list to edit."""

import importlib
import pkgutil

from .base import REGISTRY, LayerView, Method, method_from_config

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")

__all__ = ["REGISTRY", "LayerView", "Method", "method_from_config"]
