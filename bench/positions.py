"""Re-indexed RoPE positions (StreamingLLM): cost per decode step and key accuracy, new engine vs old.

Old (kvbench <= a63968c, reproduced here as `LegacySession`, callable only from this bench): keys are
stored rotated at their cache rank and, at every eviction, re-rotated in place in the cache dtype by
the change of rank, so a key that lives B steps in the window is rotated ~B times. New (the engine):
keys are stored before RoPE and rotated once per forward, in float32, to the positions of that
forward (`hf.StoreCache.positioner`), so nothing accumulates.

Two measurements, both in one run:
1. Cost: decode steps of a one-group stream (role SOURCE, positions 0, 1, ...; there `cache` and
   `shifted` give the same positions) after a prefill of B + 64 tokens, for old `cache`, new
   `shifted` (the default), new `cache`, and `original` (no re-indexing: the floor). Sessions are
   timed round-robin in a shuffled order each round, so load drifting over the run hits all alike;
   the ratio new/old is the median of per-round ratios, with its 10-90% range.
2. Accuracy: a bfloat16 copy of the model, `--evictions` one-token steps at budget `--acc-budget`;
   at the end, every key attention uses is compared with transformers' own RoPE (rotary_emb +
   apply_rotary_pos_emb, in bf16 as the model runs it) of the same pre-RoPE key (k_proj output,
   hooked) at its intended position (its rank): relative error ||k - ref|| / ||ref||, median and max,
   next to the error of one bf16 rotation (the floor).

    nice -n 19 python -m bench.positions                      # builtin shape (random weights), B = 64, 256
    python -m bench.positions --model random:qwen2.5-0.5b --budgets 512 --repeats 20
    python -m bench.positions --skip-accuracy

Writes bench/results/positions.csv.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

from bench._util import RESULTS, builtin_random, cached_model, machine, print_table, write_csv


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin-random", help="builtin-random (the offline default's shape), "
                   "a model source (random:qwen2.5-0.5b, ...) or an HF folder")
    p.add_argument("--budgets", default="64,256")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeats", type=int, default=200, help="timed decode steps per session")
    p.add_argument("--evictions", type=int, default=5000, help="accuracy: one-token steps past the budget (bf16)")
    p.add_argument("--acc-budget", type=int, default=256)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(RESULTS, "positions.csv"))
    return p.parse_args(argv)


def legacy_session_class():
    from kvbench.engine import hf
    from kvbench.engine.session import Session
    from kvbench.methods.base import LayerView
    from kvbench.streams import ROLE_TARGET

    class LegacySession(Session):
        """The engine before the fix (`cache` positions only): keys rotated at their cache rank,
        re-rotated in place by the change of rank after every eviction."""

        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.rule, self.cache.positioner = None, None
            self.group_base, self._rot = {}, None

        def _cache_positions(self, pos, is_tgt):
            out = torch.empty_like(pos)
            s = self.stores[0]
            live_tgt = s.valid[0] & (s.role[0] == ROLE_TARGET)
            for g in (False, True):
                sel = is_tgt == g
                if not bool(sel.any()):
                    continue
                base = self.group_base.setdefault(g, int(pos[sel][0]))
                live = int(live_tgt.sum()) if g else int((s.valid[0] & ~live_tgt).sum())
                out[sel] = base + live + torch.arange(int(sel.sum()), device=pos.device)
            return out

        def _reindex_positions(self, store):
            new = store.pos
            is_tgt = store.role == ROLE_TARGET
            for g in (False, True):
                if g not in self.group_base:
                    continue
                m = store.valid & (is_tgt == g)
                new = torch.where(m, self.group_base[g] + torch.cumsum(m, dim=1) - 1, new)
            delta = torch.where(store.valid, new - store.pos, 0)
            if not bool(delta.any()):
                return
            cached = self._rot
            if cached is None or cached[0].shape != delta.shape or not torch.equal(cached[0], delta):
                cached = self._rot = (delta, *hf.rope_tables(self.model, delta))
            store.set_keys(hf.rope_apply(store.k, cached[1], cached[2]))
            store.set_pos(new)

        @torch.inference_mode()
        def feed(self, ids, pos, role, logits="last"):
            ids, pos, role = (torch.as_tensor(x, dtype=torch.long, device=self.device) for x in (ids, pos, role))
            outs = []
            for a in range(0, ids.shape[0], self.chunk_size):
                b = min(a + self.chunk_size, ids.shape[0])
                c_pos = self._cache_positions(pos[a:b], role[a:b] == ROLE_TARGET)
                seq = torch.arange(self.seq, self.seq + b - a, device=self.device)
                self.cache.pending = (seq, c_pos, role[a:b])
                last = b == ids.shape[0]
                out = hf.forward(self.model, ids[a:b], c_pos, self.cache, "last" if logits == "last" else "all")
                if logits == "all" or last:
                    outs.append(out)
                self.seq += b - a
                self.tokens += b - a
                self.memory.observe(self.stores, after_step=False)
                self._evict()
                self.memory.observe(self.stores, after_step=True)
            return torch.cat(outs) if logits == "all" else outs[-1]

        def _evict(self):
            if self.budgets is None:
                return
            self._rot = None
            for i, s in enumerate(self.stores):
                if any(n > b for n, b in zip(s.n_live, self._budgets_host[i])):
                    view = LayerView(s.seq, s.pos, s.role, s.valid, s.score, layer=i, ordered=s.ordered)
                    s.compact(self.method.select(view, self.budgets[i]))
                    self._reindex_positions(s)
            self._rot = None

    return LegacySession


def make(model, kind: str, budget: int):
    from kvbench.engine.session import Session
    from kvbench.methods import method_from_config

    mode = {"old cache": "cache", "new shifted": "shifted", "new cache": "cache", "original": "original"}[kind]
    m = method_from_config("streaming_llm", {"n_sink": 4, "positions": mode})
    cls = legacy_session_class() if kind.startswith("old") else Session
    return cls(model, m, budget, chunk_size=1 if kind.startswith("old") else 64)


def timing(model, budgets, a) -> list[dict]:
    from kvbench.streams import ROLE_SOURCE

    g = torch.Generator().manual_seed(a.seed)
    kinds = ["old cache", "new shifted", "new cache", "original"]
    rows = []
    for b in budgets:
        n0 = b + 64
        ids = torch.randint(10, model.config.vocab_size, (n0 + a.warmup + a.repeats,), generator=g)
        sess = {}
        for k in kinds:
            s = make(model, k, b)
            for i in range(0, n0, 1):  # one token per step for every kind: the same eviction history
                logits = s.feed(ids[i:i + 1], [i], [ROLE_SOURCE])
            sess[k] = [s, n0, []]
        rng = random.Random(a.seed)
        order = list(kinds)
        for r in range(a.warmup + a.repeats):
            rng.shuffle(order)
            for k in order:
                s, p, times = sess[k]
                t0 = time.perf_counter()
                logits = s.feed(ids[p:p + 1], [p], [ROLE_SOURCE])
                dt = (time.perf_counter() - t0) * 1e3
                sess[k][1] = p + 1
                if r >= a.warmup:
                    times.append(dt)
        del logits
        old = sess["old cache"][2]
        for k in kinds:
            times = sess[k][2]
            ratio = sorted(x / y for x, y in zip(times, old))
            q = lambda f: ratio[int(f * (len(ratio) - 1))]  # noqa: E731
            rows.append(dict(budget=b, session=k, median_ms=statistics.median(times),
                             p10_ms=sorted(times)[len(times) // 10], p90_ms=sorted(times)[len(times) * 9 // 10],
                             ratio_vs_old=statistics.median(ratio), ratio_p10=q(0.1), ratio_p90=q(0.9),
                             steps=len(times)))
    return rows


def accuracy(model_dir: str, a) -> list[dict]:
    """Relative key error after a.evictions one-token steps in bf16, old vs new."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvbench.models import load_model
    from kvbench.streams import ROLE_SOURCE

    model = load_model(model_dir, "cpu", "bfloat16")[0]
    b, n_sink = a.acc_budget, 4
    n = b + a.evictions
    ids = torch.randint(10, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(a.seed + 1))
    rows = []
    for kind in ("old cache", "new shifted"):
        s = make(model, kind, b)
        pre = {}

        def hook(li):
            def f(mod, inp, out):
                seq = s.cache.pending[0].tolist()
                x = out[0].reshape(out.shape[1], -1, model.config.head_dim).detach()
                for i, j in enumerate(seq):
                    if j < n_sink or j >= n - b - 1:
                        pre[(li, j)] = x[i]
            return f

        hooks = [layer.self_attn.k_proj.register_forward_hook(hook(li)) for li, layer in enumerate(model.model.layers)]
        t0 = time.perf_counter()
        for i in range(n):
            s.feed(ids[i:i + 1], [i], [ROLE_SOURCE])
        spent = time.perf_counter() - t0
        for h in hooks:
            h.remove()
        errs, ones = [], []
        for li, st in enumerate(s.stores):
            if kind.startswith("old"):
                keys = st.k  # stored rotated: what attention uses
            else:
                from kvbench.engine import hf
                keys = hf.rope_apply(st.k, *hf.rope_tables(model, s._positions(st)))
            for h in range(st.h):
                seqs = st.seq[h][st.valid[h]].tolist()
                x = torch.stack([pre[(li, j)][h] for j in seqs])[None, None]  # (1, 1, C, D) bf16
                pos = torch.arange(len(seqs))[None]  # intended: the rank (one position group)
                cos, sin = model.model.rotary_emb(x[0], pos)
                ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
                ref32, _ = apply_rotary_pos_emb(x.float(), x.float(), cos.float(), sin.float())
                ref, ref32 = ref[0, 0].float(), ref32[0, 0]
                got = keys[h][st.valid[h]].float()
                errs += ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
                ones += ((ref - ref32).norm(dim=-1) / ref32.norm(dim=-1)).tolist()
        rows.append(dict(session=kind, dtype="bfloat16", budget=b, evictions=n - b, keys=len(errs),
                         err_median=statistics.median(errs), err_max=max(errs),
                         one_rotation_median=statistics.median(ones), one_rotation_max=max(ones),
                         ms_per_step=spent / n * 1e3))
    return rows


def main(argv=None) -> int:
    a = parse_args(argv)
    from kvbench.models import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = builtin_random() if a.model == "builtin-random" else cached_model(a.model)
    model = load_model(model_dir, "cpu", "float32")[0]
    budgets = [int(x) for x in a.budgets.split(",")]
    print(f"# re-indexed positions: {machine()}")
    print(f"# model {a.model} float32 (timing), budgets {budgets}, warm-up {a.warmup}, repeats {a.repeats}",
          flush=True)
    t0 = time.perf_counter()
    rows = timing(model, budgets, a)
    print(f"\n# cost per decode step ({time.perf_counter() - t0:.0f}s; ratio = session / old cache, median of "
          "per-round ratios [p10, p90])")
    print_table(rows, ["budget", "session", "median_ms", "p10_ms", "p90_ms", "ratio_vs_old", "ratio_p10",
                       "ratio_p90", "steps"], nd=3)
    out = [dict(kind="cost", **r) for r in rows]
    if not a.skip_accuracy:
        t0 = time.perf_counter()
        acc = accuracy(model_dir, a)
        print(f"\n# key error after {a.evictions} evictions, bf16, B = {a.acc_budget} "
              f"({time.perf_counter() - t0:.0f}s); reference: transformers' bf16 RoPE at the intended position")
        print_table(acc, ["session", "evictions", "keys", "err_median", "err_max", "one_rotation_median",
                          "one_rotation_max", "ms_per_step"], nd=4)
        out += [dict(kind="accuracy", **r) for r in acc]
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
    write_csv(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
