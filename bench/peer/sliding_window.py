"""Per-token decode latency of transformers' own sliding-window cache vs a full cache (main venv).

The peer for kvbench's window-only eviction: transformers 5.23's `DynamicSlidingWindowLayer` (what
`DynamicCache(config=...)` builds for every `sliding_attention` layer). Run from the repo root in
kvbench's venv, on the model folders of `python -m bench.peer.models`:

    PYTHONPATH=src python -m bench.peer.sliding_window                          # qwen2.5-0.5b
    PYTHONPATH=src python -m bench.peer.sliding_window --model bench/.cache/models/qwen2-h512-random
    PYTHONPATH=src python -m bench.peer.sliding_window --contexts 1024 --repeats 5 --threads 1   # quick

The same weights are loaded twice: as saved (every layer `full_attention`, a plain DynamicCache) and
with `use_sliding_window=True, sliding_window=K + 1, layer_types=["sliding_attention"] * n_layers` (so
the model builds sliding masks and `DynamicCache(config=...)` holds one
`DynamicSlidingWindowLayer` per layer). A window of K + 1 holds K tokens between steps and attends
K + 1 (the K held and the new one), as kvpress's DecodingPress at target_size K does; there are no
sink tokens (window only), and positions are the stream's. Each model prefills L random token ids
(seeded) once in chunks of 512, forked (deep copy) at every context; the sliding prefill is windowed.
Then the timing protocol of bench/decode.py (see bench/peer/_timing.py), once per torch thread
setting (`--threads 1,0`), each from fresh forks:

    overhead = sliding(K, L) / full cache at context K
    saving   = sliding(K, L) / full cache at context L

Writes bench/results/peer_hf_sliding_<model>.csv.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from bench.peer._timing import (
    REPO,
    RESULTS,
    Timed,
    fork,
    header,
    machine_info,
    prefill_chain,
    rows_of,
    run_rounds,
    save,
    show,
)

DEFAULT_MODEL = os.path.join(REPO, "bench", ".cache", "models", "qwen2.5-0.5b")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="a model folder (config.json + safetensors)")
    p.add_argument("--kept", type=int, default=512, help="K: tokens the sliding cache holds between steps")
    p.add_argument("--contexts", default="1024,2048,4096", help="comma-separated L (prefill tokens), each > K")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", default="1,0", help="comma-separated torch thread counts (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="CSV path (default bench/results/peer_hf_sliding_<model>.csv)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    transformers.utils.logging.disable_progress_bar()
    contexts = sorted({int(x) for x in a.contexts.split(",") if x.strip()})
    if any(c <= a.kept for c in contexts):
        raise SystemExit(f"every context must exceed K={a.kept}: {contexts}")
    threads = [int(x) for x in a.threads.split(",") if x.strip()]
    name = os.path.basename(os.path.normpath(a.model))
    out = a.out or os.path.join(RESULTS, f"peer_hf_sliding_{name}.csv")
    info = machine_info(transformers=transformers.__version__, model=name)
    print(f"# peer decode latency (transformers sliding window): {header(info)}", flush=True)

    full_model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    n_layers = full_model.config.num_hidden_layers  # saved configs list layer_types: override it too
    sw_model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, use_sliding_window=True,
                                                    sliding_window=a.kept + 1, max_window_layers=0,
                                                    layer_types=["sliding_attention"] * n_layers).eval()
    cfg = sw_model.config
    assert set(cfg.layer_types) == {"sliding_attention"}, cfg.layer_types
    probe = DynamicCache(config=cfg)
    assert all(isinstance(layer, DynamicSlidingWindowLayer) for layer in probe.layers), probe
    print(f"# {name}: {cfg.num_hidden_layers} layers x {cfg.num_key_value_heads} KV heads, float32, attention "
          f"{cfg._attn_implementation}; sliding_window {cfg.sliding_window} (holds K={a.kept}), contexts {contexts}, "
          f"chunk {a.chunk}, warm-up {a.warmup}, repeats {a.repeats}", flush=True)
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, cfg.vocab_size, (max(contexts),), generator=g)

    full = {c: Timed(f"full@L{c}", "full", c, None, full_model, cache, logits, s)
            for c, cache, logits, s in prefill_chain(full_model, DynamicCache, sorted({a.kept, *contexts}), ids, a.chunk)}
    slide = {c: Timed(f"hf_sliding@K{a.kept}/L{c}", "hf_sliding", c, a.kept, sw_model, cache, logits, s)
             for c, cache, logits, s in prefill_chain(sw_model, lambda: DynamicCache(config=cfg), contexts, ids, a.chunk)}
    for t in [*full.values(), *slide.values()]:
        print(f"  prefilled {t.label:<24} {t.prefill_s:6.1f}s  held {t.held()}", flush=True)

    rows = []
    for n in threads:
        torch.set_num_threads(n if n > 0 else info["default_threads"])
        sessions = [fork(t) for t in [*full.values(), *slide.values()]]
        run_rounds(sessions, a.warmup, a.repeats, a.seed)
        part = rows_of(sessions, torch.get_num_threads(), **info)
        print(f"\n# threads {torch.get_num_threads()}: overhead = sliding(K, L) / full(context K); "
              "saving = sliding(K, L) / full(context L); medians of per-round ratios [10%, 90%]")
        show(part)
        rows += part
    torch.set_num_threads(info["default_threads"])
    save(rows, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
