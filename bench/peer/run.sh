#!/usr/bin/env bash
# Every peer measurement of bench/peer/README.md, one after the other (2 cores: never in parallel),
# from the repo root, with kvbench's venv active (`. /work/venv/bin/activate` or `. .venv/bin/activate`):
#
#   nice -n 10 bash bench/peer/run.sh                 # both models, contexts 1k/2k/4k, K=512 (~30 min under load)
#   QUICK=1 bash bench/peer/run.sh                    # contexts 1024 only, 5 repeats (a smoke run)
#   THREADS=1 bash bench/peer/run.sh                  # one torch thread only (default: 1 then torch's default, 0)
#
# Logs and CSVs go to bench/results/ (git-ignored but for HISTORY.md): peer_*.{log,csv},
# decode_<model>_t<threads>.{log,csv}
# (every kvbench evicting method, dense and quantized), then `python -m bench.peer.summary` prints one
# table per shape (kvbench and peers, each against its own run's full cache) into peer_summary.{log,csv}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# modules run from the repo root (bench is a package); the peer venv has no kvbench: src/ on the path
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
bash bench/peer/make_venv.sh
python -m bench.peer.models
PEER=bench/.cache/peer-venv/bin/python
OUT=bench/results
mkdir -p "$OUT"
THREADS="${THREADS:-1,0}"
ARGS=(--kept 512 --contexts 1024,2048,4096 --threads "$THREADS")
DEC=(--methods all --budgets 512 --contexts 1024,2048,4096 --profile none)
if [ -n "${QUICK:-}" ]; then
  ARGS=(--kept 512 --contexts 1024 --repeats 5 --warmup 2 --threads "$THREADS")
  DEC=(--methods all --budgets 512 --contexts 1024 --repeats 5 --warmup 2 --profile none)
fi
for m in qwen2.5-0.5b qwen2-h512-random; do
  dir=bench/.cache/models/$m
  "$PEER" -m bench.peer.kvpress_decode --model "$dir" "${ARGS[@]}" 2>&1 | tee "$OUT/peer_kvpress_$m.log"
  python -m bench.peer.sliding_window --model "$dir" "${ARGS[@]}" 2>&1 | tee "$OUT/peer_hf_sliding_$m.log"
  for th in ${THREADS//,/ }; do  # kvbench's own methods, same weights, same protocol
    python -m bench.decode --model "$dir" "${DEC[@]}" --threads "$th" --out "$OUT/decode_${m}_t$th.csv" \
      2>&1 | tee "$OUT/decode_${m}_t$th.log"
  done
done
python -m bench.peer.summary "$OUT" 2>&1 | tee "$OUT/peer_summary.log"
