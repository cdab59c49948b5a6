"""The one recipe for timing a decode step, shared by the latency task and bench/decode.py.

A step is one `Session.feed` of one token. On CUDA the device is synchronized before the clock starts
and before it stops, so queued kernels are neither charged to the step nor left out of it; on CPU the
work is synchronous. Times are wall-clock milliseconds (`time.perf_counter`).
"""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(session, token: int, pos: int, role: int) -> tuple[torch.Tensor, float]:
    """Feed one token; (its logits (1, V), milliseconds the step took)."""
    sync(session.device)
    t0 = time.perf_counter()
    logits = session.feed([token], [pos], [role])
    sync(session.device)
    return logits, (time.perf_counter() - t0) * 1e3


def decode_times(session, logits: torch.Tensor, pos: int, role: int, n: int, warmup: int) -> list[float]:
    """Greedy-decode warmup + n tokens from `logits` at positions pos, pos + 1, ...; the n step times
    after the warm-up (ms)."""
    times = []
    for i in range(warmup + n):
        logits, ms = timed_step(session, int(logits[-1].argmax()), pos + i, role)
        if i >= warmup:
            times.append(ms)
    return times
