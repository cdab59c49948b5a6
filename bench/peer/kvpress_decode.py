"""Per-token decode latency of the peer: kvpress's DecodingPress(StreamingLLMPress) vs a full cache.

Runs in the peer venv (kvpress pins transformers < 5.3; `bash bench/peer/make_venv.sh` builds it),
on the model folders kvbench's bench uses (`PYTHONPATH=src python -m bench.peer.models` in the main
venv builds them):

    PYTHONPATH=src bench/.cache/peer-venv/bin/python -m bench.peer.kvpress_decode                        # qwen2.5-0.5b
    PYTHONPATH=src bench/.cache/peer-venv/bin/python -m bench.peer.kvpress_decode --model bench/.cache/models/qwen2-h512-random
    PYTHONPATH=src bench/.cache/peer-venv/bin/python -m bench.peer.kvpress_decode --contexts 1024 --repeats 5 --threads 1  # quick

One prefill of L random token ids (seeded) in chunks of 512 with a plain DynamicCache, forked
(deep copy) at every context: DecodingPress does nothing during the prefill, so the full cache at L
is also the press's starting state. Sessions: the full cache at every context (K, and each L) and
the press keeping K out of each L > K, `DecodingPress(base_press=StreamingLLMPress(), target_size=K,
compression_interval=1)`: it compresses after every decode step, K + 1 -> K, which is what kvbench's
streaming_llm does (its first step compresses L + 1 -> K, a warm-up step). The press's hooks are
entered and left outside the clock. Then rounds: every session decodes one greedy token per round in
a shuffled order (warm-up rounds discarded), once per torch thread setting (`--threads 1,0`: one
thread, then torch's default), each setting from fresh forks of the prefilled caches:

    overhead = press(K, L) / full cache at context K     (the price of eviction)
    saving   = press(K, L) / full cache at context L     (< 1: the press is faster than not evicting)

both medians of per-round ratios with their 10-90% range, as bench/decode.py reports them.

`--check-steps N` (default 64) then replays N decode steps of the press at the first L and records
which stream positions each layer's cache holds, by matching the cache's key rows against the rows
before the step (hooks on the attention modules, after kvpress's own): StreamingLLM should hold the
4 sinks and the newest K - 4 positions. Writes bench/results/peer_kvpress_<model>.csv and
..._check.csv (kept positions per step).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import version

import torch

from bench.peer._timing import (
    REPO,
    RESULTS,
    Timed,
    fork,
    header,
    machine_info,
    prefill_chain,
    print_table,
    rows_of,
    run_rounds,
    save,
    show,
)

DEFAULT_MODEL = os.path.join(REPO, "bench", ".cache", "models", "qwen2.5-0.5b")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="a model folder (config.json + safetensors)")
    p.add_argument("--kept", type=int, default=512, help="K: tokens the press keeps (per layer and KV head)")
    p.add_argument("--contexts", default="1024,2048,4096", help="comma-separated L (prefill tokens), each > K")
    p.add_argument("--interval", type=int, default=1, help="DecodingPress compression_interval (1: every step)")
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", default="1,0", help="comma-separated torch thread counts (0: torch's default; "
                   "'': no timing, the kept-positions check alone)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-steps", type=int, default=64, help="decode steps of the kept-positions check (0: skip)")
    p.add_argument("--out", default=None, help="CSV path (default bench/results/peer_kvpress_<model>.csv)")
    return p.parse_args(argv)


def new_press(a):
    from kvpress import DecodingPress, StreamingLLMPress

    return DecodingPress(base_press=StreamingLLMPress(n_sink=a.n_sink), compression_interval=a.interval,
                         target_size=a.kept)


def hooks_of(press, model):
    """The press's hooks on `model`, as a context manager factory. BasePress.__call__, not
    DecodingPress.__call__: the latter resets the press's step counters on exit, and the session
    enters it once per step (the model is shared with the full-cache sessions)."""
    from kvpress.presses.base_press import BasePress

    return lambda: BasePress.__call__(press, model)


class PositionTracker:
    """Which stream positions each tracked layer's cache holds, per KV head.

    A pre-hook on the attention module keeps the layer's key tensor before the step (DynamicLayer
    replaces it, never writes into it); a hook registered after kvpress's maps each row of the
    compressed keys to the row it equals bit for bit before the step, or to the step's new position."""

    def __init__(self, model, cache, layers: list[int], context: int):
        self.model, self.cache, self.layers = model, cache, layers
        n_heads = cache.layers[0].keys.shape[1]
        self.pos = {i: [list(range(context)) for _ in range(n_heads)] for i in layers}  # [layer][head] -> positions
        self.before, self.next_pos, self.unmatched, self.handles = {}, context, 0, []

    def install(self):
        attn = {i: self.model.model.layers[i].self_attn for i in self.layers}
        for i, m in attn.items():
            self.handles.append(m.register_forward_pre_hook(lambda mod, args, kw, i=i: self._pre(i), with_kwargs=True))
            self.handles.append(m.register_forward_hook(lambda mod, args, kw, out, i=i: self._post(i), with_kwargs=True))

    def remove(self):
        for h in self.handles:
            h.remove()

    def _pre(self, i):
        self.before[i] = self.cache.layers[i].keys

    def _post(self, i):
        old, new = self.before[i], self.cache.layers[i].keys  # (1, H, n, D)
        for h in range(new.shape[1]):
            where = {row.numpy().tobytes(): j for j, row in enumerate(old[0, h])}
            mapped = []
            for row in new[0, h]:
                j = where.get(row.numpy().tobytes())
                mapped.append(self.pos[i][h][j] if j is not None else self.next_pos)
            self.unmatched += max(0, mapped.count(self.next_pos) - 1)
            self.pos[i][h] = mapped


def check_kept(model, prefilled: Timed, a) -> list[dict]:
    """Decode a.check_steps tokens with the press, tracking the kept positions of the first and last
    layers. Expected (StreamingLLM): sinks 0..n_sink-1 and the newest K - n_sink positions."""
    t = fork(prefilled)
    press = new_press(a)
    n_layers = len(model.model.layers)
    tracker = PositionTracker(model, t.cache, [0, n_layers - 1], t.context)
    rows = []
    with BasePressCall(press, model):
        tracker.install()  # after kvpress's hooks: ours run after its compression
        try:
            for s in range(a.check_steps):
                tracker.next_pos = t.pos
                t.step()
                newest = t.pos - 1
                want = set(range(a.n_sink)) | set(range(newest - (a.kept - a.n_sink) + 1, newest + 1))
                for li in tracker.layers:
                    for h, kept in enumerate(tracker.pos[li]):
                        ks = set(kept)
                        rows.append(dict(step=s + 1, layer=li, head=h, newest=newest, held=len(kept),
                                         sinks_kept=sum(p in ks for p in range(a.n_sink)),
                                         wrong_kept=len(ks - want), missing=len(want - ks),
                                         stream_order=all(x < y for x, y in zip(kept, kept[1:])),
                                         oldest_nonsink=min((p for p in kept if p >= a.n_sink), default=-1),
                                         first_slots=" ".join(map(str, kept[:6])),
                                         evicted_recent=" ".join(map(str, sorted(want - ks)[-6:]))))
        finally:
            tracker.remove()
    print(f"\n# kept-positions check: DecodingPress(StreamingLLMPress(n_sink={a.n_sink}), target_size={a.kept}, "
          f"compression_interval={a.interval}) after a prefill of {t.context}; expected per head: positions "
          f"0..{a.n_sink - 1} and the newest {a.kept - a.n_sink}; rows not matched to a known key: {tracker.unmatched}")

    # one line per step: layer 0, head 0, and whether every tracked layer and head held the same positions
    same = {}
    for r in rows:
        same.setdefault(r["step"], set()).add((r["sinks_kept"], r["wrong_kept"], r["first_slots"]))
    first = [r for r in rows if r["layer"] == 0 and r["head"] == 0]
    shown = [dict(r, all_tracked_alike=len(same[r["step"]]) == 1) for i, r in enumerate(first)
             if r["step"] <= 5 or r["step"] % 8 == 0 or r is first[-1] or r["sinks_kept"] != first[i - 1]["sinks_kept"]]
    print_table(shown, ["step", "newest", "held", "sinks_kept", "wrong_kept", "missing", "stream_order",
                        "oldest_nonsink", "first_slots", "evicted_recent", "all_tracked_alike"])
    lost = next((r["step"] for r in rows if r["sinks_kept"] < a.n_sink), None)
    gone = next((r["step"] for r in rows if r["sinks_kept"] == 0), None)
    last = [r for r in rows if r["step"] == a.check_steps]
    print(f"# first step with a sink evicted: {lost}; all sinks gone at step: {gone}; after {a.check_steps} steps "
          f"{max(r['wrong_kept'] for r in last)} of {a.kept} held positions are not StreamingLLM's "
          f"(every tracked layer and head)")
    return rows


class BasePressCall:
    """`with BasePressCall(press, model):` the press's hooks without DecodingPress's reset."""

    def __init__(self, press, model):
        self.cm = hooks_of(press, model)()

    def __enter__(self):
        return self.cm.__enter__()

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def main(argv=None) -> int:
    a = parse_args(argv)
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    transformers.utils.logging.disable_progress_bar()

    contexts = sorted({int(x) for x in a.contexts.split(",") if x.strip()})
    if any(c <= a.kept for c in contexts):
        raise SystemExit(f"every context must exceed K={a.kept}: {contexts}")
    threads = [int(x) for x in a.threads.split(",") if x.strip()]
    name = os.path.basename(os.path.normpath(a.model))
    out = a.out or os.path.join(RESULTS, f"peer_kvpress_{name}.csv")
    info = machine_info(transformers=transformers.__version__, kvpress=version("kvpress"), model=name)
    print(f"# peer decode latency (kvpress): {header(info)}", flush=True)

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    cfg = model.config
    print(f"# {name}: {cfg.num_hidden_layers} layers x {cfg.num_key_value_heads} KV heads x head_dim "
          f"{getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads}, float32, "
          f"attention {cfg._attn_implementation}; K={a.kept}, contexts {contexts}, chunk {a.chunk}, "
          f"warm-up {a.warmup}, repeats {a.repeats}, interval {a.interval}", flush=True)
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, cfg.vocab_size, (max(contexts),), generator=g)
    chain = prefill_chain(model, DynamicCache, sorted({a.kept, *contexts}), ids, a.chunk)
    full = {c: Timed(f"full@L{c}", "full", c, None, model, cache, logits, s) for c, cache, logits, s in chain}
    for c, t in full.items():
        print(f"  prefilled {t.label:<14} {t.prefill_s:6.1f}s", flush=True)

    rows = []
    for n in threads:
        torch.set_num_threads(n if n > 0 else info["default_threads"])
        sessions = [fork(t) for t in full.values()]
        for c in contexts:
            press = new_press(a)
            sessions.append(fork(full[c], label=f"kvpress_streaming@K{a.kept}/L{c}", kind="kvpress_streaming",
                                 kept=a.kept, around=hooks_of(press, model)))
        run_rounds(sessions, a.warmup, a.repeats, a.seed)
        part = rows_of(sessions, torch.get_num_threads(), interval=a.interval, **info)
        print(f"\n# threads {torch.get_num_threads()}: overhead = kvpress(K, L) / full(context K); "
              "saving = kvpress(K, L) / full(context L); medians of per-round ratios [10%, 90%]")
        show(part)
        rows += part
    torch.set_num_threads(info["default_threads"])
    if rows:  # `--threads ''`: the kept-positions check alone
        save(rows, out)
    if a.check_steps:
        check = check_kept(model, full[contexts[0]], a)
        save([dict(r, **info) for r in check], os.path.splitext(out)[0] + "_check.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
