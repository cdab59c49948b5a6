"""HAQ-KV: head-aware mixed-bit KV quantization under a token budget (+ the shared quantized base).

Each KV head is stored at the bit width of its profiled type (kvbench.profiling: retrieval heads 8
bits, induction 4, local 2 by default), on `QuantKVStore` (kvbench.engine.qstore): KIVI-style
packing (Liu et al. 2024, arXiv:2402.02750; keys per channel, values per token, groups of
`group_size`, a full-precision window of the last `residual` tokens). Head types follow
retrieval-head work (Wu et al. 2024, arXiv:2404.15574): heads that fetch distant tokens get more
bits, heads that only look at the recent window fewer.

Budget (DESIGN.md): every (layer, KV head) may allocate B full-precision tokens' bytes,
B x 2 x head_dim x bytes-per-element. The engine spends that allowance at the head's precision
(kvbench.engine.budget.tokens_per_head): its token count is the largest n whose worst-case bytes
(`qstore.bytes_bound`: residual window at full price, scales and zero-points, partial key groups)
fit, so a 2-bit head keeps several times more tokens than an 8-bit one in the same bytes. The inner
eviction rule is selectable (`evict`: h2o / streaming_llm / recent) and runs unchanged on those
token counts (composition). A quantized method only describes its storage (`quant_spec`, data):
it never imports the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..quant import SUPPORTED_BITS
from .base import LayerView, Method, QuantSpec, register
from .h2o import H2O
from .streaming_llm import StreamingLLM

EVICT_RULES = ("h2o", "streaming_llm", "recent")


def check_bits(owner: str, name: str, value, allowed=SUPPORTED_BITS) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}: {name} must be one of {tuple(allowed)}, got {value!r}")


@dataclass
class QuantMethod(Method):
    """Base of methods on quantized storage: common storage fields, composed eviction rule.
    Subclasses give `quant_spec(layer, n_heads, types)` and `sinks()` (tokens the streaming_llm rule protects)."""

    storage = "quant"
    layout = "packed_quant"
    rowwise = True  # its rules (H2O, sinks + window, window) decide head by head
    group_size: int = 32
    residual: int = 32
    evict: str = "h2o"
    recent_ratio: float = 0.5

    @property
    def needs_scores(self) -> bool:
        return self.evict == "h2o"

    @property
    def entries_only(self) -> bool:
        return self.evict != "h2o"

    def sinks(self) -> int:
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

    def spec(self, key_bits, value_bits, **hi) -> QuantSpec:
        return QuantSpec(tuple(key_bits), tuple(value_bits), self.group_size, self.residual, **hi)

    def select(self, view: LayerView, budgets):
        return self.rule().select(view, budgets)


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

    def quant_spec(self, layer, n_heads, types):
        if types is None:
            raise ValueError(f"{self.type_name} needs a head profile (types per layer and KV head)")
        if len(types) != n_heads or set(types) - set(self.bits()):
            raise ValueError(f"{self.type_name}: profile layer {layer} has types {list(types)}; expected "
                             f"{n_heads} of {sorted(self.bits())}")
        bits = [self.bits()[t] for t in types]
        return self.spec(bits, bits)
