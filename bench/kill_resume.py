"""Kill/resume trials of the whole DAG: SIGKILL Snakemake at a random time, unlock, rerun, compare.

    nice -n 19 python -m bench.kill_resume                    # 20 trials on tests/data/trial.yaml
    python -m bench.kill_resume --trials 5 --seed 1 --keep    # keep the trial folders to look at

One uninterrupted reference run, then N trials, each in an empty folder: start Snakemake in its own
process group, SIGKILL the group at a seeded random time in (0, 0.95 x reference duration), run
`snakemake --unlock`, rerun to completion, and check the result:
- the rerun succeeds;
- every Parquet under results/ is readable, every PDF/PNG complete, every CSV parses, and no
  `<out>.partial/` sidecar folder is left over;
- the rerun itself leaves no `.tmp-*` file (leftovers of the killed writer are counted apart:
  `stale_tmp`, see tests/test_resume.py::test_stale_temp_files_of_a_killed_writer_are_swept);
- the final metrics equal the reference run's: all.parquet and tables/cells.csv without the
  timing columns, and the model weights are the same bytes.
Prints one line per trial and then "recovered K/N". tests/test_resume.py runs the same code with N=2.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIAL_CONFIG = os.path.join(REPO, "tests", "data", "trial.yaml")
# columns that measure time (differ run to run by nature) and are left out of every comparison
TIMING = ("wall_seconds", "tokens_per_second", "decode_ms_median", "decode_ms_p90")
# provenance that may change between two runs of the same config: `git_commit` (a commit landing
# between the kill and the rerun). `revision` (a content hash of the model folder without its
# build_info.json) must be the same: tests/test_resume.py::test_model_revision_is_stable_across_builds
VOLATILE = ("git_commit",)
NOT_COMPARED = TIMING + VOLATILE


# ----------------------------------------------------------------------------- running Snakemake
def snakemake_cmd(workdir: str, config: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", os.path.join(REPO, "Snakefile"), "--configfile", config,
            "--directory", workdir, "--cores", "2", *args]


TIMEOUT = 3600.0  # seconds one Snakemake run may take (--timeout); a starved 2-core machine needs it


def run_snakemake(workdir: str, config: str, *args: str, timeout: float | None = None) -> tuple[int, float, str]:
    """Run Snakemake to its end; (returncode, seconds, last lines of its output). A run that outlives
    `timeout` is killed with its jobs (process group) and reported as rc -9, not raised."""
    timeout = TIMEOUT if timeout is None else timeout
    t0 = time.monotonic()
    proc = subprocess.Popen(snakemake_cmd(workdir, config, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc, workdir)
        return -9, time.monotonic() - t0, f"timed out after {timeout:.0f} s (killed with its jobs)"
    return proc.returncode, time.monotonic() - t0, out[-4000:]


def _proc_cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def _proc_cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def processes_in(workdir: str) -> list[int]:
    """Processes running in `workdir` (Snakemake and its jobs chdir there; the folder is ours alone)."""
    workdir = os.path.realpath(workdir)
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            cwd = _proc_cwd(int(d))
            if cwd and (cwd == workdir or cwd.startswith(workdir + os.sep)):
                out.append(int(d))
    return out


def running_steps(workdir: str) -> list[str]:
    """Which kvbench steps were running (for the report): 'eval', 'build-model', ... or 'snakemake'."""
    steps = set()
    for pid in processes_in(workdir):
        cmd = _proc_cmd(pid)
        if " -m kvbench " in f" {cmd} ":
            words = cmd.split()
            i = words.index("kvbench")
            sub = words[i + 1] if i + 1 < len(words) else "?"
            steps.add(sub + (" --figure" if "--figure" in words else ""))
    return sorted(steps) or ["snakemake"]


def kill_all(proc: subprocess.Popen, workdir: str) -> None:
    """SIGKILL Snakemake's process group, then any process of ours still running in the folder."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for _ in range(50):  # jobs are in the same group; this only catches stragglers, by pid
        left = processes_in(workdir)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"processes still running in {workdir}: {processes_in(workdir)}")


# ----------------------------------------------------------------------------- checking the results
def temp_files(workdir: str) -> list[str]:
    """`.tmp-*` files and folders (atomic writes in progress or abandoned) under results/ and resources/."""
    hits = []
    for top in ("results", "resources"):
        for root, dirs, files in os.walk(os.path.join(workdir, top)):
            hits += [os.path.relpath(os.path.join(root, n), workdir) for n in dirs + files if n.startswith(".tmp-")]
    return sorted(hits)


def check_outputs(workdir: str) -> list[str]:
    """Problems with what is under results/: unreadable or truncated files, leftover sidecars."""
    import pandas as pd
    import pyarrow.parquet as pq

    problems = []
    res = os.path.join(workdir, "results")
    for root, dirs, files in os.walk(res):
        for d in dirs:
            if d.endswith(".partial"):
                problems.append(f"leftover sidecar folder {os.path.relpath(os.path.join(root, d), workdir)}")
        for n in files:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, workdir)
            if n.startswith(".tmp-"):
                continue  # judged apart (temp_files)
            try:
                if n.endswith(".parquet"):
                    pq.read_table(p)
                elif n.endswith(".csv"):
                    pd.read_csv(p)
                elif n.endswith(".pdf"):
                    with open(p, "rb") as f:
                        data = f.read()
                    if not data.startswith(b"%PDF") or b"%%EOF" not in data[-64:]:
                        problems.append(f"truncated PDF {rel}")
                elif n.endswith(".png"):
                    with open(p, "rb") as f:
                        data = f.read()
                    if not data.startswith(b"\x89PNG") or not data.endswith(b"IEND\xaeB`\x82"):
                        problems.append(f"truncated PNG {rel}")
            except Exception as e:  # noqa: BLE001 - any unreadable file is a problem to report
                problems.append(f"unreadable {rel}: {type(e).__name__}: {e}")
    return problems


def metrics(workdir: str) -> dict:
    """What must be the same run to run: all.parquet and cells.csv without timing, the weights' bytes."""
    import hashlib

    import pandas as pd

    res = os.path.join(workdir, "results")
    rows = pd.read_parquet(os.path.join(res, "all.parquet"))
    rows = rows.drop(columns=[c for c in NOT_COMPARED if c in rows.columns])
    rows = rows.sort_values(["model", "task", "dataset", "method", "length", "budget", "sample_id"])
    cells = pd.read_csv(os.path.join(res, "tables", "cells.csv"))
    cells = cells.drop(columns=[c for c in NOT_COMPARED if c in cells.columns])
    weights = {}
    for p in sorted(glob.glob(os.path.join(workdir, "resources", "models", "*", "*.safetensors"))):
        with open(p, "rb") as f:
            weights[os.path.relpath(p, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return {"rows": rows.reset_index(drop=True), "cells": cells.reset_index(drop=True), "weights": weights}


def differences(ref: dict, got: dict) -> list[str]:
    import pandas as pd

    out = []
    for k in ("rows", "cells"):
        a, b = ref[k], got[k]
        if list(a.columns) != list(b.columns) or len(a) != len(b):
            out.append(f"{k}: shape/columns differ ({a.shape} vs {b.shape})")
            continue
        try:
            pd.testing.assert_frame_equal(a, b, check_exact=True)
        except AssertionError as e:
            out.append(f"{k}: {str(e).splitlines()[0:3]}")
    if ref["weights"] != got["weights"]:
        out.append(f"model weights differ: {ref['weights']} vs {got['weights']}")
    return out


# ----------------------------------------------------------------------------- one trial
def reference_run(base: str, config: str = TRIAL_CONFIG) -> dict:
    wd = os.path.join(base, "reference")
    os.makedirs(wd, exist_ok=True)
    rc, seconds, log = run_snakemake(wd, config)
    if rc != 0:
        raise RuntimeError(f"reference run failed:\n{log}")
    problems = check_outputs(wd) + [f"temp file left: {t}" for t in temp_files(wd)]
    if problems:
        raise RuntimeError(f"reference run left problems: {problems}")
    return {"workdir": wd, "seconds": seconds, "metrics": metrics(wd)}


def trial(i: int, seed: int, ref: dict, base: str, config: str = TRIAL_CONFIG, max_fraction: float = 0.95) -> dict:
    """Kill at a seeded random time, unlock, rerun, check. Returns a dict with `recovered` and details.
    The kill time is drawn in (0.5 s, 0.95 x the reference's duration); if the run ends first (it was
    faster than the reference), the trial starts over with a time drawn from that run's duration."""
    rng = random.Random(f"{seed}:{i}")
    limit = ref["seconds"]
    wd = os.path.join(base, f"trial{i:03d}")
    for attempt in range(4):  # a run faster than the reference (less load) may end before the kill: redraw
        kill_at = rng.uniform(0.5, max(1.0, max_fraction * limit))
        shutil.rmtree(wd, ignore_errors=True)
        os.makedirs(wd)
        log = open(os.path.join(base, f"trial{i:03d}.log"), "w")
        proc = subprocess.Popen(snakemake_cmd(wd, config), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < kill_at:
            time.sleep(0.05)
        finished_first = proc.poll() is not None
        steps = [] if finished_first else running_steps(wd)
        kill_all(proc, wd)
        log.close()
        if not finished_first:
            break
        limit = time.monotonic() - t0  # this run's own duration bounds the next draw
    stale = temp_files(wd)  # left by the killed writers
    rc_unlock, _, unlock_log = run_snakemake(wd, config, "--unlock")
    rc, seconds, rerun_log = run_snakemake(wd, config)
    after = temp_files(wd)
    new_tmp = sorted(set(after) - set(stale))
    problems = []
    if rc_unlock != 0:
        problems.append(f"--unlock failed: {unlock_log[-1500:]}")
    if rc != 0:
        problems.append(f"rerun failed (rc {rc}): {rerun_log[-3000:]}")
    else:
        problems += check_outputs(wd)
        problems += [f"rerun left temp file {t}" for t in new_tmp]
        try:
            problems += differences(ref["metrics"], metrics(wd))
        except Exception as e:  # noqa: BLE001
            problems.append(f"cannot read final results: {type(e).__name__}: {e}")
    return {"trial": i, "kill_at": round(kill_at, 1), "attempts": attempt + 1,
            "killed_during": steps or ["(already finished)"],
            "rerun_seconds": round(seconds, 1), "stale_tmp": [t for t in stale if t in after],
            "problems": problems, "recovered": not problems, "workdir": wd}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=TRIAL_CONFIG)
    p.add_argument("--workdir", help="where the trial folders go (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the trial folders")
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds one Snakemake run may take")
    a = p.parse_args(argv)
    globals()["TIMEOUT"] = a.timeout
    base = a.workdir or tempfile.mkdtemp(prefix="kvbench-kill-resume-")
    os.makedirs(base, exist_ok=True)
    config = os.path.abspath(a.config)
    from bench._util import machine

    t_start = time.monotonic()
    print(machine(), flush=True)
    print(f"config {config}, folders under {base}", flush=True)
    ref = reference_run(base, config)
    print(f"reference run: {ref['seconds']:.1f} s", flush=True)
    results = []
    for i in range(a.trials):
        r = trial(i, a.seed, ref, base, config)
        results.append(r)
        status = "recovered" if r["recovered"] else "FAILED"
        print(f"trial {i:2d}: kill at {r['kill_at']:6.1f} s (draw {r['attempts']}) during "
              f"{', '.join(r['killed_during'])}; "
              f"rerun {r['rerun_seconds']:.1f} s; stale temp files {len(r['stale_tmp'])}; {status}", flush=True)
        for prob in r["problems"]:
            print(f"    - {prob}", flush=True)
        for t in r["stale_tmp"]:
            print(f"    stale: {t}", flush=True)
        if not a.keep and r["recovered"]:
            shutil.rmtree(r["workdir"], ignore_errors=True)
    k = sum(r["recovered"] for r in results)
    n_stale = sum(bool(r["stale_tmp"]) for r in results)
    n_cut = sum(r["killed_during"] != ["(already finished)"] for r in results)
    print(f"recovered {k}/{len(results)} (runs interrupted by the kill: {n_cut}/{len(results)}; trials leaving "
          f"stale .tmp-* of the killed run: {n_stale}/{len(results)}); total {time.monotonic() - t_start:.0f} s")
    if not a.keep and k == len(results):
        shutil.rmtree(base, ignore_errors=True)
    return 0 if k == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
