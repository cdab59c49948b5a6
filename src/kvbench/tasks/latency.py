"""`latency`: per-token decode latency after a prefill of the document: `warmup` untimed decode
steps, then `n_decode` timed ones (CUDA synchronized around each); rows hold the median and p90."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .base import param, register
from .common import DocumentTask, document_stream, sync


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

        s, _ = document_stream(prompter, doc, self.wait_k, self.target_offset)
        logits = session.feed(s.ids, s.pos, s.role)
        pos, role = s.pos[-1] + 1, s.role[-1]
        times = []
        for i in range(self.warmup + self.n_decode):
            t = int(logits[-1].argmax())
            sync(session.device)
            t0 = time.perf_counter()
            logits = session.feed([t], [pos + i], [role])
            sync(session.device)
            if i >= self.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        tt = torch.tensor(times)
        return dict(decode_ms_median=float(tt.median()), decode_ms_p90=float(torch.quantile(tt, 0.9)))

    def cell(self, g) -> dict:
        return dict(decode_ms_median=g["decode_ms_median"].median(), decode_ms_p90=g["decode_ms_p90"].median())
