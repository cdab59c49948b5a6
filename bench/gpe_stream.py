"""StreamingLLM under Group Position Encoding: BLEU of the position modes, and the offsets the model reads.

Streaming translation (wait-k, GPE, greedy) of synthetic documents by a trained builtin model, for
the full cache and `streaming_llm` (4 sinks) with positions `original`, `cache` (per-group ranks,
the ablation) and `shifted` (one shift shared by both groups, the default) at each budget. Calls
`kvbench.tasks.translate` directly (no eval job), so lengths past the model's trained range (and
past its max_position_embeddings under `original`) can be measured; every row records the largest
RoPE position any query or key was rotated at (`Session.max_position`).

One JSON line per (length, method, budget, document) in --out (a rerun skips what is there), then a
table per length: corpus BLEU over the documents with a 95% bootstrap CI (documents resampled,
kvbench.metrics.paired_bootstrap against `original` at the same budget: delta and one-sided p),
words written / reference words, documents ended by EOS before 90% of the reference, max position.
With --offsets, document 0 at each budget also records, at every WRITE, the offset from the target
query to the latest cached source key (query position - key position) as attention reads it.

    nice -n 19 python -m bench.gpe_stream --model /work/train/tiny --lengths 2048 --docs 6
    python -m bench.gpe_stream --model DIR --lengths 4096,8192 --docs 4 --out bench/results/gpe_long.jsonl
    python -m bench.gpe_stream --model DIR --summary-only --out bench/results/gpe_stream.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from bench._util import RESULTS, machine, print_table

METHODS = {
    "full": ("full", {}),
    "original": ("streaming_llm", {"n_sink": 4, "positions": "original"}),
    "cache": ("streaming_llm", {"n_sink": 4, "positions": "cache"}),
    "shifted": ("streaming_llm", {"n_sink": 4, "positions": "shifted"}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="trained builtin model folder")
    p.add_argument("--lengths", default="2048")
    p.add_argument("--budgets", default="64,128")
    p.add_argument("--methods", default="full,original,cache,shifted")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--wait-k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="data seed (the offline default's: 0)")
    p.add_argument("--offsets", action="store_true", help="record the target-source offsets of document 0")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(RESULTS, "gpe_stream.jsonl"))
    return p.parse_args(argv)


class OffsetProbe:
    """At every WRITE forward (target query), attention's position of the query minus that of the
    latest cached source key, read from the layer-0 store and the session's positions."""

    def __init__(self, sess):
        self.sess, self.rows = sess, []

    def after_feed(self, role: list[int]):
        from kvbench.streams import ROLE_SOURCE, ROLE_TARGET

        if role[-1] != ROLE_TARGET:
            return
        st = self.sess.stores[0]
        pos = self.sess.positions_of(st)[0]  # (C,) head 0, as attention rotated them
        valid, r, seq = st.valid[0], st.role[0], st.seq[0]
        src = valid & (r == ROLE_SOURCE)
        if not bool(src.any()):
            return
        last_src = int(pos[src][seq[src].argmax()])
        q = int(pos[valid][seq[valid].argmax()])
        self.rows.append((int(self.sess.seq), q - last_src))


def run_one(model, tok, model_dir, doc, mname, budget, k, offsets):
    from kvbench import tasks
    from kvbench.engine.session import Session
    from kvbench.methods import method_from_config
    from kvbench.prompt import Prompter

    tname, params = METHODS[mname]
    sess = Session(model, method_from_config(tname, params), None if mname == "full" else budget, chunk_size=64)
    probe = None
    if offsets:
        probe = OffsetProbe(sess)
        real = sess.feed

        def feed(ids, pos, role, logits="last"):
            out = real(ids, pos, role, logits)
            probe.after_feed(list(role))
            return out

        sess.feed = feed
    p = Prompter(tok, model_dir, doc["src_lang"], doc["tgt_lang"])
    t0 = time.perf_counter()
    row = tasks.translate(sess, p, doc, k)
    row = {k2: row[k2] for k2 in ("hypothesis", "reference", "src_words", "ref_words", "hyp_words", "stop_reason",
                                  "al", "laal")}
    row.update(seconds=time.perf_counter() - t0, max_position=sess.max_position,
               retained_peak=sess.memory.row()["retained_tokens_peak"], tokens=sess.tokens)
    if probe is not None:
        row["offsets"] = probe.rows
    return row


def summarize(rows: list[dict]) -> list[dict]:
    from kvbench.metrics import corpus_scores, paired_bootstrap

    out = []
    keys = sorted({(r["length"], r["budget"] if r["method"] != "full" else 0, r["method"]) for r in rows})
    by = {}
    for r in rows:
        by.setdefault((r["length"], r["budget"] if r["method"] != "full" else 0, r["method"]), {})[r["doc"]] = r
    for length, budget, m in keys:
        cell = by[(length, budget, m)]
        base = by.get((length, budget, "original")) if m != "full" else None
        docs = sorted(cell) if base is None else sorted(set(cell) & set(base))
        hyps = [cell[d]["hypothesis"] for d in docs]
        refs = [cell[d]["reference"] for d in docs]
        sc = corpus_scores(hyps, refs)
        bs = paired_bootstrap([base[d]["hypothesis"] for d in docs] if base else hyps, hyps, refs, 1000, 0)
        out.append(dict(length=length, method=m, budget=budget or "full", docs=len(docs), bleu=sc["bleu"],
                        ci_low=bs["ci_low"], ci_high=bs["ci_high"],
                        delta_vs_original=bs["delta"] if base and m != "original" else None,
                        p_better=bs["p_value"] if base and m != "original" else None,
                        words=f"{sum(cell[d]['hyp_words'] for d in docs)}/{sum(cell[d]['ref_words'] for d in docs)}",
                        early_eos=sum(cell[d]["stop_reason"] == "eos" and cell[d]["hyp_words"] < 0.9 *
                                      cell[d]["ref_words"] for d in docs),
                        max_position=max(cell[d]["max_position"] for d in docs),
                        sec_per_doc=sum(cell[d]["seconds"] for d in docs) / len(docs)))
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    from kvbench.data import synthetic_docs
    from kvbench.models import load_model

    torch.set_num_threads(a.threads)
    done = []
    if os.path.exists(a.out):
        with open(a.out) as f:
            done = [json.loads(ln) for ln in f if ln.strip()]
    have = {(r["length"], r["method"], r["budget"], r["doc"]) for r in done}
    if not a.summary_only:
        model, tok, _ = load_model(a.model)
        print(f"# gpe_stream: {machine()}; model {a.model}", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        for length in [int(x) for x in a.lengths.split(",")]:
            docs = synthetic_docs(length, a.docs, a.seed)
            for m in a.methods.split(","):
                for budget in ([None] if m == "full" else [int(x) for x in a.budgets.split(",")]):
                    for doc in docs:
                        key = (length, m, budget, doc["id"])
                        if key in have:
                            continue
                        row = run_one(model, tok, a.model, doc, m, budget, a.wait_k, a.offsets and doc["id"] == 0)
                        row.update(length=length, method=m, budget=budget, doc=doc["id"])
                        with open(a.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
                        done.append(row)
                        print(f"L{length} {m} B{budget} doc {doc['id']}: {row['hyp_words']}/{row['ref_words']} words, "
                              f"{row['stop_reason']}, max pos {row['max_position']}, {row['seconds']:.0f}s", flush=True)
    table = summarize(done)
    print_table(table, ["length", "method", "budget", "docs", "bleu", "ci_low", "ci_high", "delta_vs_original",
                        "p_better", "words", "early_eos", "max_position", "sec_per_doc"], nd=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
