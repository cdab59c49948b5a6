"""StreamQuant: streaming KV quantization with attention-sink and outlier awareness.

Low-bit KIVI-style storage (Liu et al. 2024, arXiv:2402.02750) for the bulk of the stream, with the
tokens low bits hurt most kept apart at high precision, as in SKVQ (Duanmu et al. 2024,
arXiv:2405.06219: full-precision sliding window, attention sinks kept intact) and KVQuant (Hooper
et al. 2024, arXiv:2401.18079: outliers stored separately at higher precision):
- the first `attention_sink_size` tokens of the stream (Xiao et al. 2024, arXiv:2309.17453);
- outlier tokens: per KV head, a token whose key norm ||k|| (k: (D,)) exceeds
  `outlier_threshold_relative` x the running EMA of key norms (decay `ema_decay`, updated after each
  prefill chunk / decode step with the chunk's ordinary tokens; the first chunk seeds it with its
  median). At most `max_outliers` per head are kept apart, the rest are stored as ordinary tokens.
Those go to the store's `hi` tier, K and V packed per token at `key_bits_sink_outlier` /
`value_bits_sink_outlier` (8, or 16 = unquantized), when they leave the `residual` window;
everything else is packed at `key_bits_normal` / `value_bits_normal`. Tensors per layer: keys and
values (H, n, D) in, (H, C, D) dequantized out; the EMA state is (H,).

Defaults are the seed's: threshold 3.0 (recommended 2.5-3.5), EMA decay 0.9 (recommended
0.9-0.99), 4 sink tokens, 4 bits for ordinary tokens and 8 for sinks and outliers. The seed's chunk
size (512) is not a field here: chunked prefill is the session's (top-level `chunk_size`). The token
budget is converted to tokens per head as in `haq_kv.QuantMethod` (the `hi` tier is priced at
sinks plus max_outliers high-precision tokens), and the inner eviction rule defaults to StreamingLLM
(sinks and a recent window, original positions).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import HiRule, register
from .haq_kv import QuantMethod, check_bits


@register
@dataclass
class StreamQuant(QuantMethod):
    type_name = "stream_quant"
    paper = "SKVQ-style sinks + outliers at high precision (arXiv:2405.06219, 2401.18079); KIVI storage (2402.02750)"
    evict: str = "streaming_llm"
    ema_decay: float = 0.9  # seed value; recommended 0.9-0.99
    attention_sink_size: int = 4
    outlier_threshold_relative: float = 3.0  # seed value; recommended 2.5-3.5
    detect_outliers: bool = True
    max_outliers: int = 8
    key_bits_sink_outlier: int = 8
    value_bits_sink_outlier: int = 8
    key_bits_normal: int = 4
    value_bits_normal: int = 4

    def sinks(self) -> int:
        return self.attention_sink_size

    def validate(self, budget):
        t = self.type_name
        for name in ("key_bits_sink_outlier", "value_bits_sink_outlier"):
            check_bits(t, name, getattr(self, name), (8, 16))
        for name in ("key_bits_normal", "value_bits_normal"):
            check_bits(t, name, getattr(self, name))
        ks, kn, vs, vn = (self.key_bits_sink_outlier, self.key_bits_normal, self.value_bits_sink_outlier,
                          self.value_bits_normal)
        if ks < kn or vs < vn:  # the budget conversion prices the hi tier as the dearer one
            raise ValueError(f"{t}: sink/outlier bits must be >= normal bits (keys {ks} vs {kn}, values {vs} vs {vn})")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"{t}: ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.outlier_threshold_relative <= 0:
            raise ValueError(f"{t}: outlier_threshold_relative must be > 0, got {self.outlier_threshold_relative}")
        if self.attention_sink_size < 0 or self.max_outliers < 0:
            raise ValueError(f"{t}: attention_sink_size and max_outliers must be >= 0, got "
                             f"{self.attention_sink_size} and {self.max_outliers}")
        super().validate(budget)

    def quant_spec(self, layer, n_heads, types):
        """Every head alike (types unused): normal bits, and the hi tier's rule (engine.qstore.SinkOutlierFlags)."""
        n = n_heads
        rule = HiRule(self.attention_sink_size, self.ema_decay, self.outlier_threshold_relative, self.detect_outliers)
        return self.spec([self.key_bits_normal] * n, [self.value_bits_normal] * n,
                         hi_bits=(self.key_bits_sink_outlier, self.value_bits_sink_outlier), hi_rule=rule,
                         max_hi=self.attention_sink_size + (self.max_outliers if self.detect_outliers else 0))
