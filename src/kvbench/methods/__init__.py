"""KV-cache methods. Importing this package registers every method (see base.REGISTRY)."""

from . import full, h2o, haq_kv, head_aware, stream_quant, streaming_llm  # noqa: F401  (registration)
from .base import REGISTRY, LayerView, Method, method_from_config

__all__ = ["REGISTRY", "LayerView", "Method", "method_from_config"]
