"""The full cache: every token kept. The reference every other method is compared against."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, register


@register
@dataclass
class Full(Method):
    type_name = "full"
    paper = "-"
    evicts = False
