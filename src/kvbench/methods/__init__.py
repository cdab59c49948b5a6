"""KV-cache methods. Importing this package registers every method (see base.REGISTRY)."""

from . import full, h2o, head_aware, streaming_llm  # noqa: F401  (registration)
from .base import REGISTRY, LayerView, Method, method_from_config

__all__ = ["REGISTRY", "LayerView", "Method", "method_from_config"]
