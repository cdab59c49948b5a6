"""One table per model shape from the CSVs bench/peer/run.sh wrote: kvbench's evicting methods and
the peers, each as a ratio to a full cache measured in its own run (not a benchmark itself).

    python -m bench.peer.summary                 # reads bench/results/, prints, writes peer_summary.csv

For every session at kept size K and context L:
- overhead = session(K, L) / full cache at context K, in the same run (same process, same weights);
  goal <= 1.10 for dense kvbench methods (issue #20);
- vs_held (quantized kvbench methods, which hold more than K tokens in K's bytes) = session / full
  cache holding as many tokens; goal <= 1.30 (bench/decode.py decides, this script copies its verdict);
- saving = session(K, L) / full cache at context L;
- full_K_ms: that run's own full cache at context K, so runs in different processes (kvpress pins
  transformers < 5.3) can be seen to time the same model alike.
The peer goal: kvbench streaming_llm's overhead <= kvpress DecodingPress(StreamingLLMPress)'s at the
same K, L and threads. Caveat printed with the kvpress rows: kvpress 0.5.5's ScorerPress keeps
tokens in top-k order, not stream order, so on CPU its DecodingPress(StreamingLLMPress) evicts the
wrong tokens (sinks included; `kvpress_decode.py --check-steps` shows which): its time is that of a
cache of K tokens, not of the StreamingLLM rule.
"""

from __future__ import annotations

import csv
import glob
import os
import re
import sys

from bench._util import RESULTS, print_table, write_csv

CAVEAT = ("kvpress 0.5.5: ScorerPress keeps tokens in top-k order, not stream order; on CPU "
          "DecodingPress(StreamingLLMPress) then evicts the wrong tokens, sinks included")


def read(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def full_ms(rows: list[dict], context) -> float | None:
    for r in rows:
        if r.get("budget", r.get("kept")) == "full" and str(r["context"]) == str(context):
            return num(r["median_ms"])
    return None


def shape_rows(model: str, results: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(results, f"decode_{model}_t*.csv"))):
        m = re.search(r"_t(\d+)\.csv$", path)
        if m is None:  # another run of the shape (e.g. decode_<model>_t1_r30.csv, more rounds): not run.sh's
            continue
        th = m.group(1)
        rows = read(path)
        for r in rows:
            if r["budget"] == "full":
                continue
            out.append(dict(source="kvbench", session=r["session"], threads=th, held=num(r["held"]),
                            full_K_ms=full_ms(rows, r["budget"]), median_ms=num(r["median_ms"]),
                            overhead=num(r["overhead"]), vs_held=num(r.get("vs_held")), saving=num(r["saving"]),
                            goal=("vs_held" if num(r.get("vs_held")) is not None else "overhead")
                            + f" <= {r['goal_max']}", verdict=r["goal"]))
    for kind, pattern in (("kvpress", "peer_kvpress_{}.csv"), ("hf_sliding", "peer_hf_sliding_{}.csv")):
        path = os.path.join(results, pattern.format(model))
        if not os.path.exists(path):
            continue
        rows = read(path)
        for r in rows:
            if r["kind"] == "full":
                continue
            th_rows = [x for x in rows if x["threads"] == r["threads"]]
            out.append(dict(source=kind, session=r["session"], threads=r["threads"], held=num(r["held"]),
                            full_K_ms=full_ms(th_rows, r["kept"]), median_ms=num(r["median_ms"]),
                            overhead=num(r.get("overhead")), saving=num(r.get("saving")), goal="", verdict=""))
    return out


def versus_kvpress(rows: list[dict]) -> None:
    """The peer goal, row by row: kvbench streaming_llm against kvpress at the same K, L, threads."""
    key = lambda r: (re.search(r"[@]\w?(\d+)/L(\d+)", r["session"]).groups(), str(r["threads"]))  # noqa: E731
    peer = {key(r): r for r in rows if r["source"] == "kvpress"}
    for r in rows:
        if r["source"] == "kvbench" and r["session"].startswith("streaming_llm@"):
            p = peer.get(key(r))
            if p is not None and r["overhead"] is not None and p["overhead"] is not None:
                r["vs_kvpress"] = r["overhead"] / p["overhead"]
                r["verdict"] += " / peer " + ("ok" if r["overhead"] <= p["overhead"] else "MISS")


def main(argv=None) -> int:
    results = (argv or sys.argv[1:] or [RESULTS])[0]
    found = (re.match(r"^decode_(.+)_t\d+\.csv$", os.path.basename(p))
             for p in glob.glob(os.path.join(results, "decode_*_t*.csv")))
    models = sorted({m.group(1) for m in found if m})  # run.sh's files only (not decode_<model>_t1_r30.csv)
    everything = []
    for m in models:
        rows = shape_rows(m, results)
        versus_kvpress(rows)
        print(f"\n## {m}: ratios to a full cache in the same run (medians of per-round ratios)")
        print_table(rows, ["source", "session", "threads", "held", "full_K_ms", "median_ms", "overhead", "vs_held",
                           "saving", "goal", "verdict", "vs_kvpress"], nd=3)
        if any(r["source"] == "kvpress" for r in rows):
            print(f"  caveat: {CAVEAT}")
        everything += [dict(model=m, **r) for r in rows]
    if not everything:
        raise SystemExit(f"no decode_*_t*.csv in {results}: run `bash bench/peer/run.sh` first")
    write_csv(everything, os.path.join(results, "peer_summary.csv"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
