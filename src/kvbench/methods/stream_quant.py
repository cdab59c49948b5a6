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

import torch

from .base import register
from .haq_kv import QuantMethod, check_bits


class SinkOutlierFlags:
    """Called by QuantKVStore.append with keys (H, n, D) and seq (n,): returns (H, n) bool, True for
    tokens to keep at high precision. Holds the running key-norm EMA (H,) of one layer."""

    def __init__(self, n_sink: int, decay: float, threshold: float, detect: bool):
        self.n_sink, self.decay, self.threshold, self.detect = n_sink, decay, threshold, detect
        self.ema: torch.Tensor | None = None

    def __call__(self, k: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        norm = k.float().norm(dim=-1)  # (H, n)
        sink = (seq < self.n_sink)[None].expand_as(norm)
        if not self.detect:
            return sink.clone()
        ordinary = ~sink
        if self.ema is None:
            if not bool(ordinary.any()):
                return sink.clone()
            self.ema = norm[:, ordinary[0]].median(dim=1).values  # seed: the first chunk's median
        out = ordinary & (norm > self.threshold * self.ema[:, None])
        upd = ordinary & ~out  # EMA over ordinary tokens, in stream order: closed form of the recursion
        cnt = upd.sum(dim=1, keepdim=True)
        rank = torch.cumsum(upd.long(), dim=1) - 1
        w = (1 - self.decay) * self.decay ** (cnt - 1 - rank).clamp(min=0).float() * upd
        self.ema = self.decay ** cnt[:, 0].float() * self.ema + (w * norm).sum(dim=1)
        return sink | out

    def nbytes(self) -> int:
        return 0 if self.ema is None else self.ema.numel() * self.ema.element_size()


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

    def store_spec(self, layer, n_heads, profile):
        flags = SinkOutlierFlags(self.attention_sink_size, self.ema_decay, self.outlier_threshold_relative,
                                 self.detect_outliers)
        return dict(key_bits=[self.key_bits_normal] * n_heads, value_bits=[self.value_bits_normal] * n_heads,
                    hi_bits=(self.key_bits_sink_outlier, self.value_bits_sink_outlier), flagger=flags,
                    max_hi=self.attention_sink_size + (self.max_outliers if self.detect_outliers else 0))
