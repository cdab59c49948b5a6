"""`latency`: per-token decode latency after a prefill of the document: `warmup` untimed decode
steps, then `n_decode` timed ones (CUDA synchronized around each); rows hold the median and p90."""

from __future__ import annotations

from dataclasses import dataclass

from .base import param, register
from .common import DocumentTask, document_stream


@register
@dataclass(frozen=True)
class Latency(DocumentTask):
    name = "latency"
    order = 3
    summary = "per-token decode time"
    columns = ("decode_ms_median", "decode_ms_p90")
    extra_positions_from = ("warmup", "n_decode")

    n_decode: int = param(32, minimum=1, filled=True, help="timed decode steps")
    warmup: int = param(4, minimum=0, filled=True, help="untimed decode steps first")

    def run(self, session, prompter, doc: dict) -> dict:
        import torch

        from ..engine.timing import decode_times  # the decode-step timing recipe bench/decode.py uses too

        s, _ = document_stream(prompter, doc, self.wait_k, self.target_offset)
        logits = session.feed(s.ids, s.pos, s.role)
        times = decode_times(session, logits, s.pos[-1] + 1, s.role[-1], self.n_decode, self.warmup)
        tt = torch.tensor(times)
        return dict(decode_ms_median=float(tt.median()), decode_ms_p90=float(torch.quantile(tt, 0.9)))

    def cell(self, g) -> dict:
        return dict(decode_ms_median=g["decode_ms_median"].median(), decode_ms_p90=g["decode_ms_p90"].median())
