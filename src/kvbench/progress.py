"""Progress that reads well in a terminal and in a log file.

    for doc in progress(docs, desc="ppl h2o L1024 B128", file=sys.stderr):
        ...

On a terminal this is a tqdm bar. Anywhere else (a Snakemake job log, a pipe, a file) tqdm's
carriage-return redraws make `less` show one unreadable line, so plain lines are written instead,
one each time another 10% is done or 30 s have passed, and one at the end:

    ppl h2o L1024 B128: 3/10 (30%) 12.4 s elapsed, about 28.9 s left

The object returned supports what callers use of tqdm: iteration, `update(n)`, `set_postfix(...)`
(shown on the next line) and `close()`; `initial` counts work done by an earlier run.
"""

from __future__ import annotations

import sys
import time


def _isatty(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):
        return False


class PlainProgress:
    def __init__(self, iterable=None, desc: str = "", total: int | None = None, file=None, initial: int = 0,
                 every_fraction: float = 0.1, every_seconds: float = 30.0):
        self.iterable, self.desc, self.file = iterable, desc, file if file is not None else sys.stderr
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.total, self.n, self.start_n = total, initial, initial
        self.every_fraction, self.every_seconds = every_fraction, every_seconds
        self.t0 = self.last_t = time.monotonic()
        self.last_n, self.postfix, self.closed = initial, "", False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def _line(self) -> str:
        elapsed = time.monotonic() - self.t0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            pct = 100.0 * self.n / self.total
            done_here = self.n - self.start_n
            left = (f", about {elapsed / done_here * (self.total - self.n):.1f} s left"
                    if 0 < done_here and self.n < self.total else "")
            text = f"{head}{self.n}/{self.total} ({pct:.0f}%) {elapsed:.1f} s elapsed{left}"
        else:
            text = f"{head}{self.n} done, {elapsed:.1f} s elapsed"
        return text + (f" [{self.postfix}]" if self.postfix else "")

    def _emit(self) -> None:
        print(self._line(), file=self.file, flush=True)
        self.last_n, self.last_t = self.n, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        step = max(1, int(self.total * self.every_fraction)) if self.total else None
        if (step and self.n - self.last_n >= step) or time.monotonic() - self.last_t >= self.every_seconds:
            self._emit()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.last_n or self.n == self.start_n:
                self._emit()


def progress(iterable=None, desc: str = "", total: int | None = None, file=None, initial: int = 0,
             mininterval: float = 5.0, **tqdm_kwargs):
    """A tqdm bar when `file` (default stderr) is a terminal, else PlainProgress (plain lines)."""
    file = file if file is not None else sys.stderr
    if _isatty(file):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, file=file, initial=initial, mininterval=mininterval,
                    **tqdm_kwargs)
    return PlainProgress(iterable, desc=desc, total=total, file=file, initial=initial)
