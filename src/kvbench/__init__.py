"""kvbench: a reproducible benchmark of KV-cache compression for long and streaming LLM inference."""

__version__ = "0.1.0"
