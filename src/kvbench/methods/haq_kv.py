"""HAQ-KV: head-aware mixed-bit KV quantization under a token budget (+ the shared quantized base).

Each KV head is stored at the bit width of its profiled type (kvbench.profiling: retrieval heads 8
bits, induction 4, local 2 by default), on `QuantKVStore` (kvbench.engine.qstore): KIVI-style
packing (Liu et al. 2024, arXiv:2402.02750; keys per channel, values per token, groups of
`group_size`, a full-precision window of the last `residual` tokens). Head types follow
retrieval-head work (Wu et al. 2024, arXiv:2404.15574): heads that fetch distant tokens get more
bits, heads that only look at the recent window fewer.

Budget (DESIGN.md): every (layer, KV head) may allocate B full-precision tokens' bytes,
B x 2 x head_dim x bytes-per-element. `QuantMethod` spends that allowance at the head's precision:
its token count is the largest n whose worst-case bytes (`qstore.bytes_bound`: residual window at
full price, scales and zero-points, partial key groups) fit, so a 2-bit head keeps several times
more tokens than an 8-bit one in the same bytes. The inner eviction rule is selectable (`evict`:
h2o / streaming_llm / recent) and runs unchanged on those token counts (composition).

Engine note: `head_budgets` has no cache geometry (head_dim, dtype), so it returns the uniform
allowance B per head and `select` converts it with the geometry the stores were made with
(`make_store` runs before any eviction). The session's trigger `live > B` is then conservative
(tokens >= B), and `select` keeps everything while a head is within its converted count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.qstore import QuantKVStore, max_tokens
from ..quant import SUPPORTED_BITS
from .base import LayerView, Method, register
from .h2o import H2O
from .streaming_llm import StreamingLLM

EVICT_RULES = ("h2o", "streaming_llm", "recent")


def check_bits(owner: str, name: str, value, allowed=SUPPORTED_BITS) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}: {name} must be one of {tuple(allowed)}, got {value!r}")


@dataclass
class QuantMethod(Method):
    """Base of methods on QuantKVStore: byte allowance -> tokens per head, composed eviction rule.
    Subclasses give `store_spec(layer, n_heads, profile)` (QuantKVStore keyword arguments) and
    `sinks()` (tokens the streaming_llm rule protects)."""

    storage = "quant"
    layout = "packed_quant"
    group_size: int = 32
    residual: int = 32
    evict: str = "h2o"
    recent_ratio: float = 0.5

    @property
    def needs_scores(self) -> bool:
        return self.evict == "h2o"

    def sinks(self) -> int:
        raise NotImplementedError

    def store_spec(self, layer: int, n_heads: int, profile) -> dict:
        raise NotImplementedError

    def validate(self, budget):
        t = self.type_name
        if self.evict not in EVICT_RULES:
            raise ValueError(f"{t}: evict must be one of {EVICT_RULES}, got {self.evict!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"{t}: group_size must be a positive int, got {self.group_size!r}")
        if self.residual < 0:
            raise ValueError(f"{t}: residual must be >= 0, got {self.residual}")
        self.rule().validate(budget)

    def rule(self) -> Method:
        if self.evict == "h2o":
            return H2O(recent_ratio=self.recent_ratio)
        return StreamingLLM(n_sink=self.sinks() if self.evict == "streaming_llm" else 0, positions="original")

    def make_store(self, geom: dict, dtype, device, layer: int, profile=None) -> QuantKVStore:
        d, h = geom["head_dim"], geom["n_kv_heads"]
        if d % self.group_size:
            raise ValueError(f"{self.type_name}: group_size {self.group_size} does not divide head_dim {d}")
        store = QuantKVStore(h, d, dtype, device, group_size=self.group_size, residual=self.residual,
                             track_scores=self.needs_scores, **self.store_spec(layer, h, profile))
        self.__dict__.setdefault("_cost", {})[layer] = [store.cost_args(i) for i in range(h)]
        self.__dict__["_tokens"] = {}
        return store

    def token_budgets(self, layer: int, allowance: torch.Tensor) -> torch.Tensor:
        """(H,) tokens each head of `layer` may keep within allowance (H,) full-precision tokens."""
        cost = self.__dict__.get("_cost", {}).get(layer)
        if cost is None:
            raise RuntimeError(f"{self.type_name}: no store made for layer {layer} (LayerView.layer unset?)")
        key = (layer, tuple(allowance.tolist()))
        if key not in self._tokens:
            full = [a * 2 * c["d"] * torch.empty(0, dtype=c["dtype"]).element_size() for a, c in zip(key[1], cost)]
            self._tokens[key] = torch.tensor([max_tokens(f, **c) for f, c in zip(full, cost)], device=allowance.device)
        return self._tokens[key]

    def select(self, view: LayerView, budgets):
        return self.rule().select(view, self.token_budgets(view.layer, budgets))


@register
@dataclass
class HaqKV(QuantMethod):
    """Per-layer storage: QuantKVStore with key_bits = value_bits = bits of each head's type,
    (H,) per layer; keys (n, D) channel groups, values (n, D) token groups, residual (n_r, D)."""

    type_name = "haq_kv"
    paper = "head-aware mixed-bit KV quantization; KIVI storage (arXiv:2402.02750), head types (arXiv:2404.15574)"
    needs_profile = True
    bits_retrieval: int = 8
    bits_induction: int = 4
    bits_local: int = 2
    n_sink: int = 4

    def bits(self) -> dict[str, int]:
        return {"retrieval": self.bits_retrieval, "induction": self.bits_induction, "local": self.bits_local}

    def sinks(self) -> int:
        return self.n_sink

    def validate(self, budget):
        for name, b in self.bits().items():
            check_bits(self.type_name, f"bits_{name}", b)
        if self.n_sink < 0:
            raise ValueError(f"{self.type_name}: n_sink must be >= 0, got {self.n_sink}")
        super().validate(budget)

    def store_spec(self, layer, n_heads, profile):
        if profile is None:
            raise ValueError(f"{self.type_name} needs a head profile (types per layer and KV head)")
        types = list(profile.types[layer])
        if len(types) != n_heads or set(types) - set(self.bits()):
            raise ValueError(f"{self.type_name}: profile layer {layer} has types {types}; expected {n_heads} "
                             f"of {sorted(self.bits())}")
        bits = [self.bits()[t] for t in types]
        return dict(key_bits=bits, value_bits=bits)
