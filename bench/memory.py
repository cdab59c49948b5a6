"""Memory honesty: the cache bytes a method really holds vs the bytes its budget allows.

For every registered method, several budgets and several lengths, one document is fed through a
`kvbench.engine.session.Session` on a small model, and the bytes measured from the cache tensors
(`session.memory`, `store.nbytes()`: allocated, padding included) are divided by the theoretical
bytes of DESIGN.md's budget semantics:

    eviction (dense):  B x layers x kv_heads x head_dim x 2 (K and V) x bytes/elem   (B <= length)
    full:              length x layers x kv_heads x head_dim x 2 x bytes/elem

Goal: `ratio` (live bytes / theory, after the last step) within [0.98, 1.05] for eviction methods
and for full. Per-head budgets (`grouped_per_head`: heads grouped by budget, a buffer per group)
allocate each head its own count; any padding would show in its own column (`pad`). Dense buffers also hold spare
slots (`spare`): one slot per (layer, head) kept for the next decode token by an evicting cache, or
the growth slack (<= 1/32) of a cache that never evicted. `alloc` = ratio + pad + spare is what the
tensors occupy, and for the dense layout every step's allocation (`max_step`) is held to 1.05 too. `peak` is the in-chunk peak against (B + chunk) tokens (the README's bound);
`vs_full` divides by the full cache measured in the same run at the same length. Methods with
`storage != "dense"` (quantized) are handled generically: their bytes are reported relative to the
full cache in fp16 and fp32 at the same length (`vs_fp16_full`, `vs_fp32_full`), to the same retained
tokens in fp16 (`vs_fp16_held`), plus the bits really spent per cached value; their budget is bytes
(they may keep more tokens), so their goal is `max_step` (worst after-step allocation / budget bytes)
<= 1.05.

Methods with `needs_profile` get a mixed head profile (every layer mixes retrieval / induction /
local heads). The default model is the builtin architecture (4 layers, 2 KV heads, head_dim 64)
with random weights, built once into bench/.cache/models/; documents are synthetic translation
streams (instruction / source / target roles, wait-5, Group Position Encoding), as in the `ppl` task.
`--model random:qwen2.5-0.5b` (or any HF folder) feeds random token ids instead.

    nice -n 19 python -m bench.memory                       # defaults: < 10 min on 2 cores
    python -m bench.memory --lengths 256 --budgets 32       # a quick check
    python -m bench.memory --help

Writes bench/results/memory.csv (one row per method x budget x length) and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from bench._util import RESULTS, builtin_random, cached_model, machine, mixed_profile, print_table, write_csv
from kvbench.engine.budget import budget_bytes, token_bytes

GOAL = (0.98, 1.05)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Figures and goals: bench/README.md.")
    p.add_argument("--model", default="builtin-random",
                   help="builtin-random (default), a model source (random:qwen2.5-0.5b, builtin:..., hub:...) "
                        "built once into bench/.cache/models, or an HF folder")
    p.add_argument("--methods", default="all", help="comma-separated registered method types (default: all)")
    p.add_argument("--budgets", default="64,256", help="comma-separated budgets in tokens per (layer, KV head)")
    p.add_argument("--lengths", default="1024,4096", help="comma-separated document lengths in tokens")
    p.add_argument("--chunk-size", type=int, default=64, help="prefill chunk (the config's chunk_size)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=128,
                   help="group size of the body-bytes check (default 128: config/paper.yaml's quantized methods)")
    p.add_argument("--head-dims", default="64,128", help="head_dims of the body-bytes check (the paper models')")
    p.add_argument("--out", default=os.path.join(RESULTS, "memory.csv"))
    return p.parse_args(argv)


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def document(model_dir, tok, length: int, seed: int, vocab: int):
    """(ids, pos, role) of one document stream of about `length` tokens."""
    from kvbench.prompt import Prompter, is_builtin
    from kvbench.streams import ROLE_SOURCE

    if is_builtin(model_dir):
        from kvbench import synth
        from kvbench.data import synthetic_docs
        from kvbench.tasks import document_stream

        doc = synthetic_docs(length, 1, seed)[0]
        s, _ = document_stream(Prompter(tok, model_dir, synth.SRC_LANG, synth.TGT_LANG), doc, k=5)
        return s.tensors()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (length,), generator=g)
    return ids, torch.arange(length), torch.full((length,), ROLE_SOURCE, dtype=torch.long)


def measure(model, model_dir, tok, mtype: str, budget, length: int, a, profile) -> dict:
    from kvbench.engine.session import Session
    from kvbench.methods import REGISTRY

    method = REGISTRY[mtype]()
    ids, pos, role = document(model_dir, tok, length, a.seed, model.config.vocab_size)
    n = int(ids.shape[0])
    row = dict(method=mtype, storage=method.storage, layout=method.layout, budget=budget if budget else "full",
               length=length, n_tokens=n)
    t0 = time.perf_counter()
    s = Session(model, method, budget, a.chunk_size, profile if method.needs_profile else None)
    s.feed(ids, pos, role)
    row["seconds"] = time.perf_counter() - t0
    g, dt = s.geom, next(model.parameters()).dtype
    mem = s.memory.row()
    alloc = s.memory.after_step_bytes[-1]  # from the tensors, after the last step (steady state)
    live = sum(st.live_bytes() for st in s.stores) if all(hasattr(st, "live_bytes") for st in s.stores) else None
    retained = sum(int(st.live().sum()) for st in s.stores)  # over layers and heads
    # spare slots: allocated slots holding no live entry (the one freed for the token being written,
    # or the growth slack of a cache that never evicted); counted in `bytes` (allocated), shown apart here
    spare = sum((p.capacity * p.h - sum(p.n_live)) * token_bytes(g["head_dim"], dt)
                for st in s.stores for _, p in st.parts() if hasattr(p, "capacity"))
    row.update(layout=s.layout(), bytes=alloc, live_bytes=live, bytes_peak=mem["cache_bytes_peak"],
               meta_bytes_peak=mem["metadata_bytes_peak"],
               retained_per_head=retained / (g["n_layers"] * g["n_kv_heads"]))
    if method.storage == "dense":
        held = min(n, budget) if budget else n
        theory = budget_bytes(held, g, dt)
        row.update(theory=theory, ratio=(live if live is not None else alloc) / theory, alloc=alloc / theory,
                   pad=(alloc - live - spare) / theory if live is not None else None, spare=spare / theory,
                   max_step=max(s.memory.after_step_bytes) / theory,
                   peak=mem["cache_bytes_peak"] / budget_bytes(min(n, (budget or n) + a.chunk_size), g, dt),
                   meta=mem["metadata_bytes_peak"] / max(mem["cache_bytes_peak"], 1))
        ok = GOAL[0] <= row["ratio"] <= GOAL[1]
        if s.layout() in ("dense", "grouped_per_head"):  # no padding: every step's allocation is held to the budget too
            ok = ok and row["max_step"] <= GOAL[1]
        row["goal"] = "ok" if ok else "MISS"
    else:  # quantized or other packed storage: relative to the full cache at the same length
        per_value = retained * g["head_dim"] * 2  # K and V values held, over layers and heads
        row.update(vs_fp16_full=alloc / budget_bytes(n, g, torch.float16),
                   vs_fp32_full=alloc / budget_bytes(n, g, torch.float32),
                   vs_fp16_held=alloc / max(per_value * 2, 1), bits_per_value=alloc * 8 / max(per_value, 1),
                   meta=mem["metadata_bytes_peak"] / max(mem["cache_bytes_peak"], 1), goal="n/a")
        if budget:  # the budget is bytes: more tokens may be held, never more bytes (scales included)
            theory = budget_bytes(min(n, budget), g, dt)
            row.update(theory=theory, alloc=alloc / theory, max_step=max(s.memory.after_step_bytes) / theory,
                       peak=mem["cache_bytes_peak"] / budget_bytes(min(n, budget + a.chunk_size), g, dt))
            row["goal"] = "ok" if row["max_step"] <= GOAL[1] else "MISS"
    return row


BODY_GOAL = {4: 0.28, 2: 0.16}  # body bytes / fp16 bytes of the same tokens, scales and zeros counted


def body_bytes(group_size: int, head_dims: list[int], n: int = 4096, residual: int = 32) -> list[dict]:
    """The quantized body's bytes per token against fp16, measured from a QuantKVStore's tensors: 2
    KV heads, fp16 cache, n random tokens appended in chunks of 64 (`body`: codes + scales + zeros of
    the tokens in the body tier; `all`: every tier, the full-precision residual window included)."""
    from kvbench.engine.qstore import QuantKVStore

    rows = []
    for d in head_dims:
        for bits, goal in BODY_GOAL.items():
            st = QuantKVStore(2, d, torch.float16, "cpu", [bits] * 2, [bits] * 2, group_size, residual)
            g = torch.Generator().manual_seed(0)
            for a in range(0, n, 64):
                k, v = (torch.randn(2, 64, d, generator=g).half() for _ in range(2))
                seq = torch.arange(a, a + 64)
                st.append(k, v, seq, seq, torch.zeros(64, dtype=torch.long))
            tb, c = st.tier_bytes(), st.counts()
            n_body = sum(x["body"] for x in c)
            fp16 = lambda t: t * d * 2 * 2  # noqa: E731  (K and V, 2 bytes each)
            body = tb["body"] / fp16(n_body)
            rows.append(dict(head_dim=d, bits=bits, group_size=group_size, tokens=n, body_tokens=n_body // 2,
                             body_vs_fp16=body, all_vs_fp16=st.nbytes() / fp16(2 * n), goal_max=goal,
                             goal="ok" if body <= goal else "MISS"))
    return rows


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    from kvbench.engine import hf
    from kvbench.methods import REGISTRY
    from kvbench.models import load_model

    model_dir = builtin_random(max_positions=max(16384, max(ints(a.lengths)) * 2)) if a.model == "builtin-random" \
        else cached_model(a.model)
    model, tok, _ = load_model(model_dir, "cpu", a.dtype)
    geom = hf.model_geometry(model)
    profile = mixed_profile(geom["n_layers"], geom["n_kv_heads"])
    types = sorted(REGISTRY) if a.methods == "all" else a.methods.split(",")
    unknown = [t for t in types if t not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown method types {unknown}; registered: {sorted(REGISTRY)}")
    types = sorted(types, key=lambda t: (t != "full", t))  # the baseline first
    print(f"# memory honesty: {machine()}")
    print(f"# model {model_dir} ({geom['n_layers']} layers x {geom['n_kv_heads']} KV heads x head_dim "
          f"{geom['head_dim']}, {a.dtype}), chunk {a.chunk_size}, head profile types {profile.types}", flush=True)
    rows, full_bytes = [], {}
    t_start = time.perf_counter()
    for length in ints(a.lengths):
        for mtype in types:
            evicts = REGISTRY[mtype].evicts
            for budget in (ints(a.budgets) if evicts else [None]):
                if budget is not None and budget >= length:
                    continue  # nothing to evict: not a test of the budget
                try:
                    r = measure(model, model_dir, tok, mtype, budget, length, a, profile)
                except ValueError as e:  # a method refusing this budget (validate): say so, go on
                    r = dict(method=mtype, budget=budget, length=length, goal=f"skipped: {e}")
                if mtype == "full":
                    full_bytes[length] = r["bytes"]
                if "bytes" in r and length in full_bytes:
                    r["vs_full"] = r["bytes"] / full_bytes[length]
                rows.append(r)
                print(f"  {mtype:>14} B={r['budget']!s:>5} L={length:<6} " + " ".join(
                    f"{k}={r[k]:.4f}" for k in ("ratio", "alloc", "vs_full") if r.get(k) is not None)
                    + f" ({r.get('seconds', 0):.1f}s) {r.get('goal', '')}", flush=True)
    print(f"\n# {time.perf_counter() - t_start:.0f}s; ratio = live bytes / theory (goal {GOAL[0]}-{GOAL[1]}), "
          "pad = padding / theory, spare = spare slots / theory, alloc = allocated / theory, max_step = worst after-step allocation / theory, "
          "peak = in-chunk peak / (B + chunk) theory, vs_full = bytes / full cache (same length, same run)")
    print_table(rows, ["method", "layout", "budget", "length", "n_tokens", "retained_per_head", "bytes", "theory",
                       "ratio", "pad", "spare", "alloc", "max_step", "peak", "vs_full", "meta", "goal"], nd=3)
    quant = [r for r in rows if r.get("storage") not in (None, "dense")]
    if quant:
        print("\n# non-dense storage: bytes relative to the full cache in fp16 / fp32 at the same length")
        print("# (vs_fp16_full / vs_fp32_full: the full cache of the same length in fp16 / fp32; vs_fp16_held: the "
              "same retained tokens in fp16; alloc: the budget's bytes in the model dtype; meta: metadata / bytes)")
        print_table(quant, ["method", "storage", "layout", "budget", "length", "retained_per_head", "bytes",
                            "vs_fp16_full", "vs_fp32_full", "vs_fp16_held", "bits_per_value", "alloc", "max_step",
                            "vs_full", "meta", "goal"])
    body = body_bytes(a.group_size, ints(a.head_dims))
    print(f"\n# quantized body bytes / fp16 (scales and zeros counted), group size {a.group_size}, fp16 cache, "
          "2 KV heads, 4096 random tokens, residual window 32 (all_vs_fp16: every tier, window included)")
    print_table(body, ["head_dim", "bits", "group_size", "tokens", "body_tokens", "body_vs_fp16", "all_vs_fp16",
                       "goal_max", "goal"], nd=4)
    rows += [dict(method="body_bytes", **r) for r in body]
    write_csv(rows, a.out)
    missed = [r for r in rows if r.get("goal") == "MISS"]
    if missed:
        print(f"goal missed by {len(missed)} row(s): " + ", ".join(
            f"{r['method']} B{r.get('budget')} L{r.get('length')}" if r["method"] != "body_bytes"
            else f"body bytes {r['bits']}-bit head_dim {r['head_dim']}" for r in missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
