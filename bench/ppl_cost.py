"""Time of the ppl cells of a config (the offline default by default), run in-process.

Every (method variant, length, budget) cell of the studies that run the `ppl` task, with the config's
n_samples synthetic documents (seed: the config's), through `kvbench.tasks.perplexity` exactly as an
eval job runs it (Session(model, method, budget, chunk_size, profile)); head-profiled methods get a
mixed head profile (timing does not depend on which heads are which). Prints seconds per cell and
the total; compare two checkouts by pointing PYTHONPATH at each:

    nice -n 19 python -m bench.ppl_cost --model /work/train/tiny
    PYTHONPATH=/tmp/old/src python -m bench.ppl_cost --model /work/train/tiny --out bench/results/ppl_cost_old.csv
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import yaml

from bench._util import REPO, RESULTS, machine, mixed_profile, print_table, write_csv


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--config", default=os.path.join(REPO, "config.yaml"))
    p.add_argument("--only", default="", help="comma-separated method variants (default: all in ppl studies)")
    p.add_argument("--out", default=os.path.join(RESULTS, "ppl_cost.csv"))
    a = p.parse_args(argv)
    import torch

    from kvbench import tasks
    from kvbench.data import synthetic_docs
    from kvbench.engine import hf
    from kvbench.engine.session import Session
    from kvbench.methods import method_from_config
    from kvbench.models import load_model
    from kvbench.prompt import Prompter

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = yaml.safe_load(open(a.config))
    cells = set()
    for st in cfg["studies"].values():
        if "ppl" in st["tasks"]:
            for m in st["methods"]:
                for L in st["lengths"]:
                    for b in (st.get("budgets") or [None]) if m != "full" else [None]:
                        cells.add((m, L, b))
    only = set(a.only.split(",")) - {""}
    cells = sorted((c for c in cells if not only or c[0] in only), key=lambda c: (c[0], c[1], c[2] or 0))
    model, tok, _ = load_model(a.model)
    geom = hf.model_geometry(model)
    prof = mixed_profile(geom["n_layers"], geom["n_kv_heads"])
    ds = next(iter(cfg["datasets"].values()))
    n, seed, chunk = ds.get("n_samples", 2), cfg.get("seed", 0), cfg.get("chunk_size", 64)
    k = cfg["tasks"]["ppl"].get("wait_k", 5)
    docs = {L: synthetic_docs(L, n, seed) for L in sorted({c[1] for c in cells})}
    print(f"# ppl cells of {a.config}: {machine()}", flush=True)
    rows, total = [], 0.0
    for m, L, b in cells:
        spec = dict(cfg["methods"][m])
        mtype = spec.pop("type")
        t0 = time.perf_counter()
        nll = 0.0
        for doc in docs[L]:
            method = method_from_config(mtype, spec)
            sess = Session(model, method, b, chunk, prof if method.needs_profile else None)
            r = tasks.perplexity(sess, Prompter(tok, a.model, doc["src_lang"], doc["tgt_lang"]), doc, k)
            nll += r["nll_sum"] / r["n_scored_tokens"] / len(docs[L])
        s = time.perf_counter() - t0
        total += s
        rows.append(dict(method=m, length=L, budget=b or "full", docs=len(docs[L]), seconds=s, nll_per_token=nll,
                         peak=sess.memory.row()["retained_tokens_peak"]))
        print(f"  {m} L{L} B{b}: {s:.1f}s nll/token {nll:.4f} peak {rows[-1]['peak']}", flush=True)
    print_table(rows, ["method", "length", "budget", "docs", "seconds", "nll_per_token", "peak"], nd=2)
    print(f"# total {total:.0f}s for {len(rows)} cells; load average {os.getloadavg()[0]:.1f}")
    write_csv(rows, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
