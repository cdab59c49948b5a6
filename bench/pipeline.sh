#!/usr/bin/env bash
# Pipeline wall time: the whole DAG from an empty results dir, and a no-op re-run.
#
# Measures, in one run and in a fresh temporary working directory (nothing of the repo's own
# results/ or resources/ is touched):
#   startup  `snakemake --version`                        (Python + Snakemake import: the floor)
#   plan     `snakemake -n` on the empty directory        (parse, validate the config, build the DAG)
#   run      `snakemake --cores N` from empty              (every job: model, data, profile, evals, aggregate)
#   noop_n   `snakemake -n` on the complete DAG, x3        goal: median <= 10 s, must plan nothing
#   noop     `snakemake --cores N` on the complete DAG     (must do nothing)
# and prints each with ratios against startup and plan measured in the same run (so a slow machine
# shows up in the baseline, not as a regression).
#
# Default: the tiny CI config tests/data/tiny.yaml. --full: the offline default config.yaml (trains
# the builtin model: about 15+ minutes on 2 cores).
#
#   nice -n 19 bash bench/pipeline.sh                 # tiny config
#   nice -n 19 bash bench/pipeline.sh --full          # offline default config.yaml
#   bash bench/pipeline.sh --workdir DIR --noop-only  # time only the no-op re-run of a complete DIR
#   bash bench/pipeline.sh --help
#
# Appends one line per run to bench/results/pipeline.csv.
set -euo pipefail

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$BENCH")"
CONFIG="$REPO/tests/data/tiny.yaml"
CORES=2
WORKDIR=""
KEEP=0
NOOP_ONLY=0
GOAL_NOOP=10

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; cat <<EOF

options:
  --full             use the offline default config.yaml instead of tests/data/tiny.yaml
  --configfile F     any config file
  --cores N          cores for the run (default $CORES)
  --workdir DIR      working directory (default: a new temporary one, removed at the end)
  --keep             keep the temporary working directory
  --noop-only        skip the run: time startup, plan and the no-op re-run of an existing --workdir
EOF
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --full) CONFIG="$REPO/config.yaml" ;;
    --configfile) CONFIG="$(realpath "$2")"; shift ;;
    --cores) CORES="$2"; shift ;;
    --workdir) WORKDIR="$2"; shift ;;
    --keep) KEEP=1 ;;
    --noop-only) NOOP_ONLY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [[ -z "$WORKDIR" ]]; then
  [[ $NOOP_ONLY == 1 ]] && { echo "--noop-only needs --workdir of a complete run" >&2; exit 2; }
  WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/kvbench-pipeline.XXXXXX")"
  [[ $KEEP == 1 ]] || trap 'rm -rf "$WORKDIR"' EXIT
fi
mkdir -p "$WORKDIR" "$BENCH/results"
LOGDIR="$WORKDIR/bench-logs"
mkdir -p "$LOGDIR"

SMK=(snakemake -s "$REPO/Snakefile" --configfile "$CONFIG" --directory "$WORKDIR")
# The rules run `python -m kvbench`: time this checkout's code even if the editable install points elsewhere.
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"

now() { date +%s.%N; }
# timed NAME CMD...: run CMD with output to $LOGDIR/NAME.log, set T_NAME to its wall seconds
timed() {
  local name="$1"; shift
  local t0 t1
  t0=$(now)
  if ! "$@" >"$LOGDIR/$name.log" 2>&1; then
    echo "FAILED: $* (log: $LOGDIR/$name.log)" >&2
    tail -n 30 "$LOGDIR/$name.log" >&2
    KEEP=1; trap - EXIT
    exit 1
  fi
  t1=$(now)
  printf -v "T_$name" '%.2f' "$(echo "$t1 - $t0" | bc -l)"
}
ratio() { echo "scale=3; $1 / $2" | bc -l | sed 's/^\./0./'; }
jobs_planned() {  # total of the dry run's job stats table (0 when there is nothing to do)
  awk '/^total/ {print $2; found=1; exit} END {if (!found) print 0}' "$LOGDIR/$1.log"
}

echo "# pipeline wall time: $(date +%F), nproc=$(nproc), CPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), snakemake $(snakemake --version)"
echo "# config $CONFIG, cores $CORES, workdir $WORKDIR"

timed startup snakemake --version
timed plan "${SMK[@]}" -n
PLANNED=$(jobs_planned plan)
if [[ $NOOP_ONLY == 0 ]]; then
  [[ "$PLANNED" != 0 ]] || { echo "the working directory is not empty: nothing planned" >&2; exit 1; }
  timed run "${SMK[@]}" --cores "$CORES" --resources gpu=1
else
  T_run=""
fi
# the no-op dry run three times: median (and range), as the goal is close to the noise on a busy machine
for i in 1 2 3; do timed "noop_n$i" "${SMK[@]}" -n; done
read -r T_noop_lo T_noop_n T_noop_hi < <(printf '%s\n' "$T_noop_n1" "$T_noop_n2" "$T_noop_n3" | sort -g | tr '\n' ' '; echo)
LEFT=$(jobs_planned noop_n1)
timed noop "${SMK[@]}" --cores "$CORES" --resources gpu=1
if ! grep -q "Nothing to be done" "$LOGDIR/noop.log"; then
  echo "WARNING: the no-op re-run did something (see $LOGDIR/noop.log)" >&2
fi

printf '\n%-10s %10s %14s %12s  %s\n' step seconds "x startup" "x plan" note
printf '%-10s %10s %14s %12s  %s\n' startup "$T_startup" 1.000 "$(ratio "$T_startup" "$T_plan")" "snakemake --version"
printf '%-10s %10s %14s %12s  %s\n' plan "$T_plan" "$(ratio "$T_plan" "$T_startup")" 1.000 \
  "dry run, $([[ $NOOP_ONLY == 1 ]] && echo "the given dir (no run)" || echo "empty dir"): $PLANNED jobs"
if [[ -n "$T_run" ]]; then
  printf '%-10s %10s %14s %12s  %s\n' run "$T_run" "$(ratio "$T_run" "$T_startup")" "$(ratio "$T_run" "$T_plan")" "$PLANNED jobs, --cores $CORES"
fi
GOAL_OK=$(echo "$T_noop_n <= $GOAL_NOOP" | bc -l)
printf '%-10s %10s %14s %12s  %s\n' noop_n "$T_noop_n" "$(ratio "$T_noop_n" "$T_startup")" "$(ratio "$T_noop_n" "$T_plan")" \
  "dry run, complete dir, median of 3 [$T_noop_lo, $T_noop_hi]: $LEFT jobs left; goal <= ${GOAL_NOOP}s: $([[ $GOAL_OK == 1 ]] && echo ok || echo MISS)"
printf '%-10s %10s %14s %12s  %s\n' noop "$T_noop" "$(ratio "$T_noop" "$T_startup")" "$(ratio "$T_noop" "$T_plan")" "real re-run, complete dir"
[[ "$LEFT" == 0 ]] || echo "WARNING: the dry run on the complete DAG plans $LEFT job(s)" >&2

CSV="$BENCH/results/pipeline.csv"
[[ -f "$CSV" ]] || echo "date,nproc,load1,config,cores,jobs,startup_s,plan_s,run_s,noop_n_s,noop_n_min_s,noop_n_max_s,noop_s,noop_goal_s,noop_jobs_left" >"$CSV"
echo "$(date +%FT%T),$(nproc),$(cut -d' ' -f1 /proc/loadavg),$(basename "$CONFIG"),$CORES,$PLANNED,$T_startup,$T_plan,$T_run,$T_noop_n,$T_noop_lo,$T_noop_hi,$T_noop,$GOAL_NOOP,$LEFT" >>"$CSV"
echo "appended to $CSV"
[[ $KEEP == 1 ]] && echo "kept $WORKDIR (logs in $LOGDIR)"
exit 0
