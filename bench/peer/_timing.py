"""The timing protocol of bench/decode.py for plain transformers caches (not a benchmark itself).

Imported by both peer scripts, so it needs nothing but torch and the standard library: it runs in
kvbench's venv (transformers 5.23) and in the peer venv (kvpress 0.5.5, transformers 5.2).

- `prefill_chain(model, new_cache, checkpoints, ids, chunk)`: feed ids once up to the last
  checkpoint in chunks, forking (deep copy) the cache at every checkpoint, as decode.py does.
- `Timed`: one session under test (a cache, its model, the next position, its step times in ms);
  `step()` is one greedy decode step (the argmax of the previous logits) timed with perf_counter.
  A session may carry `around`, a context manager factory entered and left outside the clock
  (kvpress's press hooks).
- `run_rounds(sessions, warmup, repeats, seed)`: every round times every session once, in a shuffled
  order (warm-up rounds discarded), so load drifting over the run hits every session alike.
- `paired(a, b)`: median and 10/90% of the per-round ratios a/b.
- `machine_info(**versions)`: date, CPU, nproc, threads, load, git commit, the versions given.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench._util import cpu_name, paired, pct, print_table, write_csv

PEER = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(PEER))

RESULTS = os.path.join(REPO, "bench", "results")
NOISY = 0.3  # as decode.py: median (p90 - p10) / median of step times above which figures are not trusted


@torch.inference_mode()
def forward(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """ids (T,) at positions start..start+T-1 into `cache`; the last position's logits (V,).
    Positions are passed explicitly (as kvpress's pipeline does): an evicting cache's length is not
    the stream position."""
    pos = torch.arange(start, start + ids.numel()).unsqueeze(0)  # (1, T)
    out = model(input_ids=ids.unsqueeze(0), position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    return out.logits[0, -1]


def prefill_chain(model, new_cache: Callable, checkpoints: list[int], ids: torch.Tensor, chunk: int):
    """[(context, cache, last logits, prefill seconds)] for each checkpoint, from one prefill."""
    cache, done, spent, out = new_cache(), 0, 0.0, []
    for c in sorted(checkpoints):
        t0 = time.perf_counter()
        for s in range(done, c, chunk):
            logits = forward(model, cache, ids[s:min(s + chunk, c)], s)
        spent += time.perf_counter() - t0
        done = c
        out.append((c, copy.deepcopy(cache), logits, spent))
    return out


@dataclass
class Timed:
    label: str
    kind: str  # "full" or the peer's name
    context: int  # tokens prefilled
    kept: int | None  # tokens the peer keeps (None: full cache)
    model: object
    cache: object
    logits: torch.Tensor
    prefill_s: float
    around: Callable | None = None  # () -> context manager, entered outside the clock
    pos: int = 0
    times: list = field(default_factory=list)

    def __post_init__(self):
        self.pos = self.pos or self.context

    def step(self) -> float:
        tok = self.logits.argmax().reshape(1)
        with self.around() if self.around else contextlib.nullcontext():
            t0 = time.perf_counter()
            self.logits = forward(self.model, self.cache, tok, self.pos)
            ms = (time.perf_counter() - t0) * 1e3
        self.pos += 1
        return ms

    def held(self) -> int:
        """Tokens in layer 0's cache (per KV head)."""
        layer = self.cache.layers[0]
        return int(layer.keys.shape[-2])


def fork(t: Timed, **kw) -> Timed:
    """A fresh session from a prefilled one: the cache deep-copied, the model shared."""
    d = dict(label=t.label, kind=t.kind, context=t.context, kept=t.kept, model=t.model,
             cache=copy.deepcopy(t.cache), logits=t.logits.clone(), prefill_s=t.prefill_s, around=t.around)
    d.update(kw)
    return Timed(**d)


def run_rounds(sessions: list[Timed], warmup: int, repeats: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    order = list(sessions)
    for r in range(warmup + repeats):
        rng.shuffle(order)
        for t in order:
            ms = t.step()
            if r >= warmup:
                t.times.append(ms)


def rows_of(sessions: list[Timed], threads: int, **extra) -> list[dict]:
    """One row per session; peers get `overhead` = peer(K, L) / full(context K) and
    `saving` = peer(K, L) / full(context L), both medians of per-round ratios [p10, p90]."""
    full = {t.context: t for t in sessions if t.kind == "full"}
    rows = []
    for t in sessions:
        med = statistics.median(t.times)
        row = dict(session=t.label, kind=t.kind, kept=t.kept or "full", context=t.context, threads=threads,
                   held=t.held(), prefill_s=t.prefill_s, median_ms=med, p10_ms=pct(t.times, 0.1),
                   p90_ms=pct(t.times, 0.9), spread=(pct(t.times, 0.9) - pct(t.times, 0.1)) / med, n=len(t.times))
        if t.kind != "full":
            for name, base in (("overhead", full.get(t.kept)), ("saving", full.get(t.context))):
                if base is not None:
                    m, lo, hi = paired(t, base)
                    row.update({name: m, f"{name}_p10": lo, f"{name}_p90": hi,
                                f"{name} [p10,p90]": f"{m:.3f} [{lo:.2f},{hi:.2f}]"})
        row.update(extra)
        rows.append(row)
    return rows


def show(rows: list[dict]) -> None:
    print_table(rows, ["session", "threads", "held", "prefill_s", "median_ms", "p10_ms", "p90_ms", "spread",
                       "overhead [p10,p90]", "saving [p10,p90]"], nd=2)
    noisy = statistics.median(r["spread"] for r in rows)
    if noisy > NOISY:
        print(f"WARNING: median spread {noisy:.2f} > {NOISY}: the machine was busy while timing; ratios are "
              "unreliable (check `uptime`, rerun when idle, or raise --repeats)")


def save(rows: list[dict], path: str) -> None:
    write_csv([{k: v for k, v in r.items() if "[" not in k} for r in rows], path)


def machine_info(**versions) -> dict:
    cpu = cpu_name()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=5).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    return dict(date=time.strftime("%Y-%m-%d %H:%M"), cpu=cpu, nproc=os.cpu_count(),
                default_threads=torch.get_num_threads(), load_1min=round(os.getloadavg()[0], 1),
                git=commit + ("+dirty" if dirty else ""), python=platform.python_version(),
                torch=torch.__version__, **versions)


def header(info: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in info.items())
