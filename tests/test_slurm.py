"""The Slurm profiles, run for real on a throw-away single-node Slurm cluster.

    python -m pytest -q tests/test_slurm.py -p no:cacheprovider      # needs root; ~1-2 min
    python -m pytest -q tests/test_slurm.py -m "not slurm"           # the profile checks only

Tests marked `slurm` start munged, slurmctld and slurmd (tests/slurm/cluster.py; apt-get installs
slurm-wlm and munge when missing) and run a workflow through
`snakemake --workflow-profile profiles/slurm`, so every job really goes through sbatch.
The workflow under test is a parameter: `write_toy_workflow` writes a small Snakefile whose rules
carry the pipeline's rule names (so the profile's per-rule resources and the make_data group
apply); to test the real DAG, pass the repository's Snakefile and a tiny config to
`run_with_profile` instead.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm.cluster import SlurmCluster, slurm_cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "profiles"
GPU_RULES = {"build_model", "profile_heads", "evaluate"}
CPU_RULES = {"make_data", "aggregate"}
ACCOUNT = "kvbench-test"  # no accounting database here: any name is accepted
# First status check 10 s after a submission (profile: the plugin's default 40 s). The toy jobs
# take 3-8 s (two Snakemake start-ups each), so each DAG layer costs one check. The plugin adds
# 10 s to the interval after every check in which no job finished.
FAST_STATUS = ["--slurm-init-seconds-before-status-checks", "10"]


# --------------------------------------------------------------------------------------------
# The workflow under test
# --------------------------------------------------------------------------------------------
TOY_SNAKEFILE = r'''
# Toy DAG with the pipeline's rule names: make_data x2 -> evaluate <- build_model.
# build_model waits for a file named "release" (at most 120 s), so a test can hold it running.
# --config fail_first_attempt=build_model makes build_model fail on attempt 1 (tests retries).
WAIT_FOR_RELEASE = (
    "import os, time; t = time.time(); "
    "any(os.path.exists('release') or time.time() - t > 120 or time.sleep(0.2) for _ in iter(int, 1))"
)
FAIL_FIRST = str(config.get("fail_first_attempt", "")).split(",")

localrules: all

rule all:
    input: "results/combined.txt"

rule make_data:
    output: "data/{part}.txt"
    log: "logs/make_data/{part}.log"
    shell:
        "echo slurm_job=${{SLURM_JOB_ID:-none}} > {log}; "
        "python -c \"import sys; open(sys.argv[1], 'w').write('data ' + sys.argv[2] + chr(10))\" "
        "{output} {wildcards.part} >> {log} 2>&1"

rule build_model:
    output: "model/weights.txt"
    log: "logs/build_model.log"
    params: fail_first=int("build_model" in FAIL_FIRST)
    threads: 2
    # gpu=1 as the real model rules declare it for local runs; the Slurm profiles override it.
    resources: gpu=1, try_no=lambda wildcards, attempt: attempt
    shell:
        "echo slurm_job=${{SLURM_JOB_ID:-none}} attempt={resources.try_no} >> {log}; "
        "if [ {params.fail_first} = 1 ] && [ {resources.try_no} = 1 ]; then exit 1; fi; "
        "python -c \"{WAIT_FOR_RELEASE}\" >> {log} 2>&1; "
        "python -c \"open('{output}', 'w').write('weights 42' + chr(10))\" >> {log} 2>&1"

rule evaluate:
    input: expand("data/{part}.txt", part=[1, 2]), "model/weights.txt"
    output: "results/combined.txt"
    log: "logs/evaluate.log"
    resources: gpu=1
    shell: "echo slurm_job=${{SLURM_JOB_ID:-none}} > {log}; cat {input} > {output}"
'''
TOY_OUTPUTS = ["data/1.txt", "data/2.txt", "model/weights.txt", "results/combined.txt"]


def write_toy_workflow(workdir: Path, release: bool = True) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    snakefile = workdir / "Snakefile"
    snakefile.write_text(TOY_SNAKEFILE)
    if release:
        (workdir / "release").touch()
    return snakefile


# --------------------------------------------------------------------------------------------
# Running Snakemake with a profile
# --------------------------------------------------------------------------------------------
def fit_profile_to_node(profile: Path, dest: Path, node_memory_mb: int) -> Path:
    """Copy `profile`, dividing its memory requests so they fit a small test node.

    Everything else stays verbatim. The divisor is an integer chosen so the largest request at
    attempt 1 is at most a quarter of the node (so attempt 2, twice that, still fits); the
    `attempt` scaling survives. Returns the new profile directory.
    """
    config = yaml.safe_load((profile / "config.yaml").read_text())
    entries = [config.get("default-resources") or {}, *(config.get("set-resources") or {}).values()]
    first = [eval(str(e["mem_mb"]), {"attempt": 1, "threads": 1}) for e in entries if "mem_mb" in e]
    divisor = max(1, -(-max(first) * 4 // node_memory_mb))
    for entry in entries:
        if "mem_mb" in entry and divisor > 1:
            entry["mem_mb"] = f"max(1, ({entry['mem_mb']}) // {divisor})"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def snakemake_command(workdir: Path, snakefile: Path, extra_args=(), profile: Path = PROFILES / "slurm"):
    # --workflow-profile, not --profile: with --profile, Snakemake would also load
    # profiles/default next to the real Snakefile, and its keys (cores, resources gpu=1, ...)
    # would override the Slurm profile's.
    return [
        sys.executable, "-m", "snakemake",
        "--workflow-profile", str(profile),
        "--snakefile", str(snakefile),
        "--directory", str(workdir),
        *map(str, extra_args),
    ]


def start_with_profile(workdir, snakefile, extra_args=(), *, env, profile=PROFILES / "slurm", log=None):
    """Start Snakemake in the background; returns (Popen, path of its combined output)."""
    log = Path(log or workdir.parent / f"{workdir.name}.snakemake.out")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            snakemake_command(workdir, snakefile, extra_args, profile),
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log


def run_with_profile(workdir, snakefile, extra_args=(), *, env, profile=PROFILES / "slurm",
                     timeout=300, check=True) -> str:
    """Run Snakemake to the end with `profile`; returns its output (stdout and stderr)."""
    workdir = Path(workdir)
    log = workdir.parent / f"{workdir.name}.snakemake.{time.monotonic_ns()}.out"
    proc, log = start_with_profile(workdir, snakefile, extra_args, env=env, profile=profile, log=log)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"snakemake did not finish in {timeout} s:\n{log.read_text()[-6000:]}")
    output = log.read_text()
    if check and proc.returncode != 0:
        pytest.fail(f"snakemake exited with {proc.returncode}:\n{output[-8000:]}")
    return output


# --------------------------------------------------------------------------------------------
# Reading what happened
# --------------------------------------------------------------------------------------------
def rule_blocks(output: str) -> Counter:
    """Jobs Snakemake started, by rule: its `rule X:` / `localrule X:` headers."""
    return Counter(re.findall(r"^\s*(?:local)?rule (\w+):\s*$", output, flags=re.M))


def slurm_job_ids(output: str) -> list[str]:
    return re.findall(r"has been submitted with SLURM jobid (\d+)", output)


def job_info(cluster: SlurmCluster, jobid: str) -> dict[str, str]:
    out = cluster.run("scontrol", "show", "job", "-o", jobid).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def mem_mb(value: str) -> int:
    number, unit = re.fullmatch(r"([\d.]+)([KMGT]?)", value).groups()
    return round(float(number) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[unit])


def rule_of(comment: str, rules) -> str:
    """Rule name from the plugin's job comment: rule_<rule>[_wildcards_...] / rule_<group>_<rule>."""
    body = comment.removeprefix("rule_").split("_wildcards_")[0]
    return next(r for r in sorted(rules, key=len, reverse=True) if body == r or body.endswith("_" + r))


def local_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm():
    """One private Slurm cluster shared by this module's tests."""
    t0 = time.monotonic()
    with slurm_cluster() as cluster:
        print(f"\nslurm cluster up in {time.monotonic() - t0:.1f} s "
              f"(apt install {cluster.install_seconds:.1f} s), daemons {cluster.daemon_pids()}")
        yield cluster


@pytest.fixture(scope="module")
def slurm_profile(slurm, tmp_path_factory):
    """profiles/slurm with its memory requests scaled to the test node."""
    return fit_profile_to_node(PROFILES / "slurm", tmp_path_factory.mktemp("profile") / "slurm",
                               slurm.memory_mb)


@pytest.fixture
def slurm_env(slurm):
    return dict(slurm.env, SBATCH_PARTITION=slurm.partition, SBATCH_ACCOUNT=ACCOUNT)


# --------------------------------------------------------------------------------------------
# Profile checks (no cluster needed)
# --------------------------------------------------------------------------------------------
def test_gpu_profile_only_adds_gres_to_gpu_rules():
    cpu = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    gpu = yaml.safe_load((PROFILES / "slurm-gpu" / "config.yaml").read_text())
    gres = {rule: res.pop("gres") for rule, res in gpu["set-resources"].items() if "gres" in res}
    assert gres == {rule: "gpu:1" for rule in GPU_RULES}
    assert gpu == cpu, "profiles/slurm-gpu must equal profiles/slurm apart from the gres entries"
    assert set(cpu["set-resources"]) == GPU_RULES | CPU_RULES
    assert not any("gres" in str(v) for v in cpu["default-resources"].values())


@pytest.mark.parametrize("profile", ["slurm", "slurm-gpu"])
def test_profile_resources_resolve(tmp_path, profile):
    """Dry run: the YTE template, expressions and per-rule overrides give the intended values."""
    snakefile = write_toy_workflow(tmp_path)
    env = dict(local_env(), SBATCH_PARTITION="gpu-a100", SBATCH_ACCOUNT="proj42")
    out = run_with_profile(tmp_path, snakefile, ["--dry-run"], env=env, profile=PROFILES / profile)
    resources = {}
    for rule, res in re.findall(r"^\s*rule (\w+):\n(?:.*\n)*?\s*resources: (.*)$", out, flags=re.M):
        resources[rule] = dict(kv.split("=", 1) for kv in res.split(", "))
    build, data = resources["build_model"], resources["make_data"]
    assert (build["mem_mb"], build["runtime"], build["gpu"]) == ("8000", "120", "0")
    assert (data["mem_mb"], data["runtime"], data["cpus_per_task"]) == ("2000", "30", "1")
    assert data["slurm_partition"] == "gpu-a100" and data["slurm_account"] == "proj42"
    for rule in ("build_model", "evaluate"):
        assert resources[rule].get("gres") == ("gpu:1" if profile == "slurm-gpu" else None)
    assert "gres" not in data
    assert "Group job data" in out  # make_data jobs bundled into one submission


# --------------------------------------------------------------------------------------------
# Real cluster
# --------------------------------------------------------------------------------------------
@pytest.mark.slurm
def test_slurm_profile_runs_dag_through_sbatch(slurm, slurm_profile, slurm_env, tmp_path):
    args = ["--config", "fail_first_attempt=build_model"]

    local = tmp_path / "local"
    run_with_profile(local, write_toy_workflow(local), args, env=local_env(), profile=PROFILES / "default")
    assert "slurm_job=none attempt=2" in (local / "logs" / "build_model.log").read_text()

    work = tmp_path / "slurm"
    out = run_with_profile(work, write_toy_workflow(work), [*args, *FAST_STATUS, "--slurm-keep-successful-logs"],
                           env=slurm_env, profile=slurm_profile)

    # Every job went through sbatch: Slurm knows each job id Snakemake reported.
    ids = slurm_job_ids(out)
    jobs = {i: job_info(slurm, i) for i in ids}
    by_rule = {}
    for i, info in jobs.items():
        by_rule.setdefault(rule_of(info["Comment"], ["make_data", "build_model", "evaluate"]), []).append(i)
        assert info["Partition"] == "debug" and info["Account"] == ACCOUNT
        assert Path(info["StdOut"]).is_file(), f"no Slurm log for job {i}"  # .snakemake/slurm_logs/...
        assert ".snakemake/slurm_logs/" in info["StdOut"]
    assert {r: len(v) for r, v in by_rule.items()} == {"make_data": 1, "build_model": 2, "evaluate": 1}, by_rule

    # Each rule's log names the Slurm job it ran in; the two make_data jobs shared one (group).
    (data_job,) = by_rule["make_data"]
    for part in (1, 2):
        assert f"slurm_job={data_job}" in (work / f"logs/make_data/{part}.log").read_text()
    assert f"slurm_job={by_rule['evaluate'][0]}" in (work / "logs/evaluate.log").read_text()

    # build_model failed once, was retried with twice the memory, and succeeded.
    first, second = sorted(by_rule["build_model"], key=int)
    assert (jobs[first]["JobState"], jobs[second]["JobState"]) == ("FAILED", "COMPLETED")
    assert (work / "logs/build_model.log").read_text().split() == [f"slurm_job={second}", "attempt=2"]
    mem1, mem2 = (mem_mb(jobs[j]["MinMemoryNode"]) for j in (first, second))
    assert abs(mem2 - 2 * mem1) <= 1, (mem1, mem2)
    assert jobs[second]["NumCPUs"] == "2"  # cpus_per_task: threads
    # build_model declares gpu=1 (for local runs); the CPU profile must not turn it into --gpus.
    assert not any("gpu" in info.get("TresPerNode", "") + info.get("TresPerJob", "") for info in jobs.values())

    # Same results as the local run.
    for path in TOY_OUTPUTS:
        assert (work / path).read_text() == (local / path).read_text(), path


@pytest.mark.slurm
def test_resume_after_slurmd_crash(slurm, slurm_profile, slurm_env, tmp_path):
    """slurmd and Snakemake die mid-run; after cleanup, a rerun redoes only the missing jobs."""
    work = tmp_path / "resume"
    snakefile = write_toy_workflow(work, release=False)  # build_model blocks until released
    proc, log = start_with_profile(work, snakefile, FAST_STATUS, env=slurm_env, profile=slurm_profile)
    try:
        deadline = time.monotonic() + 120
        while True:  # until Snakemake has booked both make_data jobs and build_model is running
            text = log.read_text()
            done = len(re.findall(r"Finished jobid: \d+ \(Rule: make_data\)", text))
            if done == 2 and "RUNNING" in slurm.jobs().values():
                break
            assert proc.poll() is None, f"snakemake ended early ({proc.returncode}):\n{text[-6000:]}"
            assert time.monotonic() < deadline, f"make_data never finished:\n{text[-6000:]}\n{slurm.log_tails()}"
            time.sleep(0.5)
        data_mtimes = {p: (work / p).stat().st_mtime_ns for p in TOY_OUTPUTS[:2]}

        slurm.kill_slurmd()
        proc.kill()  # SIGKILL: on SIGTERM Snakemake would wait for its cluster jobs
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (build_job,) = [i for i in slurm_job_ids(log.read_text())
                    if rule_of(job_info(slurm, i)["Comment"], ["make_data", "build_model"]) == "build_model"]
    assert not (work / "model/weights.txt").exists()

    slurm.start_slurmd()
    slurm.wait_for_node(("idle", "mixed", "allocated"))
    slurm.cancel_all()
    assert slurm.jobs()[build_job] == "CANCELLED"
    (work / "release").touch()
    run_with_profile(work, snakefile, ["--unlock"], env=slurm_env, profile=slurm_profile)

    out = run_with_profile(work, snakefile, FAST_STATUS, env=slurm_env, profile=slurm_profile)
    assert rule_blocks(out) == Counter({"build_model": 1, "evaluate": 1, "all": 1}), rule_blocks(out)
    assert len(slurm_job_ids(out)) == 2
    assert {p: (work / p).stat().st_mtime_ns for p in TOY_OUTPUTS[:2]} == data_mtimes
    assert (work / "results/combined.txt").read_text() == "data 1\ndata 2\nweights 42\n"


@pytest.mark.slurm
def test_real_pipeline_dag_through_slurm(slurm, slurm_profile, slurm_env, tmp_path):
    """The pipeline's own Snakefile on a small config: every model job through sbatch, and the
    metrics equal a local run's."""
    import pandas as pd

    config = REPO / "tests" / "data" / "slurm.yaml"
    args = ["--configfile", str(config)]
    local, work = tmp_path / "local", tmp_path / "slurm"
    for d in (local, work):
        d.mkdir()
    run_with_profile(local, REPO / "Snakefile", [*args, "--cores", "2"], env=local_env(),
                     profile=PROFILES / "default", timeout=600)
    out = run_with_profile(work, REPO / "Snakefile", [*args, *FAST_STATUS], env=slurm_env, profile=slurm_profile,
                           timeout=900)
    ids = slurm_job_ids(out)
    assert len(ids) >= 6, out[-4000:]  # build_model, make_data, 4 x evaluate, aggregate
    assert all(job_info(slurm, i).get("Partition") == slurm.partition for i in ids)
    metrics = ["task", "method", "budget", "sample_id", "hypothesis", "nll_sum", "retained_tokens_mean",
               "cache_bytes_peak"]
    a = pd.read_parquet(local / "results" / "all.parquet")[metrics].sort_values(metrics[:4]).reset_index(drop=True)
    b = pd.read_parquet(work / "results" / "all.parquet")[metrics].sort_values(metrics[:4]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)
