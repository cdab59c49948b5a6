"""Helpers shared by the benchmarks in bench/ (not a benchmark itself).

- `mixed_profile(n_layers, n_kv_heads)`: a head profile object (`.types`: per layer, per KV head,
  "retrieval" / "induction" / "local") with every type present, for methods with `needs_profile`.
- `cached_model(source, cache_dir)`: a model folder under bench/.cache/ built once with
  `kvbench.models.build_model` (random:<arch>, builtin:<name>, ...) or an existing HF folder.
- `builtin_random(cache_dir)`: the builtin architecture and tokenizer with random weights (no
  training), saved like a builtin model so `Prompter` treats it as one: what the memory bench uses.
- `print_table`, `write_csv`, `machine()`: output.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from types import SimpleNamespace

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
CACHE = os.path.join(BENCH, ".cache")
RESULTS = os.path.join(BENCH, "results")
TYPES = ("retrieval", "induction", "local")


def mixed_profile(n_layers: int, n_kv_heads: int) -> SimpleNamespace:
    """Head types rotating over (retrieval, induction, local), shifted by one per layer, so every
    type appears and (with >= 2 KV heads) every layer mixes types: per-head budgets differ."""
    return SimpleNamespace(types=[[TYPES[(li + h) % 3] for h in range(n_kv_heads)] for li in range(n_layers)])


def cached_model(source: str, cache_dir: str = os.path.join(CACHE, "models")) -> str:
    """A folder with config.json: `source` itself if it is one, else built once into cache_dir."""
    if os.path.exists(os.path.join(source, "config.json")):
        return source
    from kvbench.models import build_model, parse_source

    scheme, name, _ = parse_source(source)
    out = os.path.join(cache_dir, name.replace("/", "--"))
    if not os.path.exists(os.path.join(out, "kvbench_source.json")):
        print(f"building {source} into {out} (once)", flush=True)
        build_model(source, out)
    return out


def builtin_random(cache_dir: str = os.path.join(CACHE, "models"), max_positions: int = 16384) -> str:
    """The builtin architecture (hidden 128, 4 layers, 2 KV heads, head_dim 64) with random weights.
    The folder name carries a hash of the builtin vocabulary: a changed word list builds a new one."""
    import hashlib

    from kvbench import builtin

    tok = builtin.build_tokenizer()
    vocab = hashlib.sha1(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:8]
    out = os.path.join(cache_dir, f"builtin-random-{max_positions}-{vocab}")
    if os.path.exists(os.path.join(out, "build_info.json")):
        return out
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(builtin.build_config(len(tok), tok, max_positions))
    tmp = out + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "build_info.json"), "w") as f:
        json.dump({"builtin": "random weights (bench)"}, f)
    os.replace(tmp, out)
    return out


def cpu_name() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of xs, linear between order statistics."""
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def paired(a, b) -> tuple[float, float, float]:
    """Median and 10/90% of per-round ratios a.times / b.times (both timed in the same rounds)."""
    import statistics

    r = [x / y for x, y in zip(a.times, b.times)]
    return statistics.median(r), pct(r, 0.1), pct(r, 0.9)


def machine() -> str:
    cpu = cpu_name()
    import subprocess

    import torch

    import kvbench

    dev = f", CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return (f"{time.strftime('%Y-%m-%d %H:%M')}, nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}, "
            f"CPU {cpu}{dev}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}, "
            f"kvbench {os.path.dirname(kvbench.__file__)} @ git {commit}")


def fmt(v, nd: int = 3) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_table(rows: list[dict], cols: list[str], nd: int = 3) -> None:
    cells = [[fmt(r.get(c), nd) for c in cols] for r in rows]
    w = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w[i]) for i, c in enumerate(cols)))
    for x in cells:
        print("  ".join(v.rjust(w[i]) for i, v in enumerate(x)))


def write_csv(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    print(f"wrote {path}")
