"""The Slurm profile, run for real on a throw-away single-node Slurm cluster.

    python -m pytest -q tests/test_slurm.py -p no:cacheprovider      # needs root; ~1-2 min
    python -m pytest -q tests/test_slurm.py -m "not slurm"           # the profile checks only

profiles/slurm serves CPU-only and GPU clusters: KVBENCH_GPU=1 adds `gres: gpu:1` to the model
rules. Jobs' memory, runtime and threads come from the rules alone; the profile only maps them.
Tests marked `slurm` start munged, slurmctld and slurmd (tests/slurm/cluster.py; apt-get installs
slurm-wlm and munge when missing) and run a workflow through
`snakemake --workflow-profile profiles/slurm`, so every job really goes through sbatch.
The workflow under test is a parameter: `write_toy_workflow` writes a small Snakefile whose rules
carry the pipeline's rule names (so the profile's per-rule entries and the make_data group
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
from test_workflow_rules import planned_jobs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "profiles"
GPU_RULES = {"build_model", "profile_heads", "evaluate"}
CPU_RULES = {"make_data", "aggregate", "figure"}
TINY = REPO / "tests" / "data" / "tiny.yaml"
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
    resources: mem_mb=lambda wildcards, attempt: 50 * attempt, runtime=lambda wildcards, attempt: 5 * attempt
    shell:
        "echo slurm_job=${{SLURM_JOB_ID:-none}} > {log}; "
        "python -c \"import sys; open(sys.argv[1], 'w').write('data ' + sys.argv[2] + chr(10))\" "
        "{output} {wildcards.part} >> {log} 2>&1"

rule build_model:
    output: "model/weights.txt"
    log: "logs/build_model.log"
    params: fail_first=int("build_model" in FAIL_FIRST)
    threads: 2
    # Needs declared as the real rules do (growing with the attempt); gpu=1 as the model rules
    # declare it on CUDA, which the Slurm profile maps to no --gpus (and to gres with KVBENCH_GPU=1).
    resources:
        gpu=1,
        mem_mb=lambda wildcards, attempt: 64 * attempt,
        runtime=lambda wildcards, attempt: 10 * attempt,
        try_no=lambda wildcards, attempt: attempt,
    shell:
        "echo slurm_job=${{SLURM_JOB_ID:-none}} attempt={resources.try_no} >> {log}; "
        "if [ {params.fail_first} = 1 ] && [ {resources.try_no} = 1 ]; then exit 1; fi; "
        "python -c \"{WAIT_FOR_RELEASE}\" >> {log} 2>&1; "
        "python -c \"open('{output}', 'w').write('weights 42' + chr(10))\" >> {log} 2>&1"

rule evaluate:
    input: expand("data/{part}.txt", part=[1, 2]), "model/weights.txt"
    output: "results/combined.txt"
    log: "logs/evaluate.log"
    resources: gpu=1, mem_mb=lambda wildcards, attempt: 64 * attempt, runtime=lambda wildcards, attempt: 5 * attempt
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
def fit_profile_to_node(profile: Path, dest: Path, node_memory_mb: int, first_mem_mb: dict[str, int]) -> Path:
    """Copy `profile`, adding per-rule memory requests that fit a small test node.

    The profile sets no memory: each rule declares its mem_mb, growing with the attempt.
    `first_mem_mb` (rule -> largest request at attempt 1, see `first_mem_mb`) is read from a dry
    run. When the largest is over a quarter of the node, the copy's set-resources gives each rule
    `max(1, first * attempt // divisor)`, the integer divisor chosen so attempt 1 fits four times
    over (attempt 2, twice that, still fits): the attempt scaling survives. A test-only override
    beside the profile's own entries, which stay verbatim (YTE templates included). Returns the
    new profile directory.
    """
    config = yaml.safe_load((profile / "config.yaml").read_text())
    divisor = max(1, -(-max(first_mem_mb.values()) * 4 // node_memory_mb))
    if divisor > 1:
        per_rule = config.setdefault("set-resources", {})
        for rule, first in first_mem_mb.items():
            per_rule.setdefault(rule, {})["mem_mb"] = f"max(1, {first} * attempt // {divisor})"
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


def first_mem_mb(output: str) -> dict[str, int]:
    """Largest mem_mb each rule asks for at attempt 1, from a dry run's output."""
    first = {}
    for (rule, _), res in planned_jobs(output).items():
        if res.get("mem_mb", "").isdigit():
            first[rule] = max(first.get(rule, 0), int(res["mem_mb"]))
    return first


def local_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_")) and k != "KVBENCH_GPU"}


def load_profile(monkeypatch, gpu: str | None) -> dict:
    """profiles/slurm as Snakemake reads it (a YTE template), with KVBENCH_GPU unset or `gpu`."""
    import yte

    if gpu is None:
        monkeypatch.delenv("KVBENCH_GPU", raising=False)
    else:
        monkeypatch.setenv("KVBENCH_GPU", gpu)
    with open(PROFILES / "slurm" / "config.yaml") as f:
        return yte.process_yaml(f, require_use_yte=True)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm():
    """One private Slurm cluster shared by this module's tests.

    Its node gets the machine's cores: `nproc`, which sizes it, honours OMP_NUM_THREADS, so a run
    under OMP_NUM_THREADS=1 would get a one-CPU node on which the two-thread build_model never
    starts. Jobs still get the caller's OMP_NUM_THREADS (`slurm_env`).
    """
    t0 = time.monotonic()
    omp = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        with slurm_cluster() as cluster:
            if omp is not None:
                os.environ["OMP_NUM_THREADS"] = omp
            print(f"\nslurm cluster up in {time.monotonic() - t0:.1f} s (apt install "
                  f"{cluster.install_seconds:.1f} s, {cluster.cpus} CPUs), daemons {cluster.daemon_pids()}")
            yield cluster
    finally:
        if omp is not None:
            os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(scope="module")
def tiny_plans(tmp_path_factory) -> dict[str, str]:
    """Dry runs of the real DAG on tiny.yaml with device cuda (so the model rules declare gpu=1):
    local (profiles/default) and through profiles/slurm without and with KVBENCH_GPU=1."""
    args = ["--configfile", TINY, "--config", "device=cuda", "--dry-run", "--forceall", "--quiet", "host"]
    env = dict(local_env(), SBATCH_PARTITION="gpu-a100", SBATCH_ACCOUNT="proj42")
    runs = {"local": (PROFILES / "default", env), "cpu": (PROFILES / "slurm", env),
            "gpu": (PROFILES / "slurm", dict(env, KVBENCH_GPU="1"))}
    return {name: run_with_profile(tmp_path_factory.mktemp(name), REPO / "Snakefile", args, env=run_env,
                                   profile=profile, timeout=600)
            for name, (profile, run_env) in runs.items()}


@pytest.fixture
def slurm_env(slurm):
    omp = {k: v for k, v in os.environ.items() if k == "OMP_NUM_THREADS"}
    return dict(slurm.env, SBATCH_PARTITION=slurm.partition, SBATCH_ACCOUNT=ACCOUNT, **omp)


# --------------------------------------------------------------------------------------------
# Profile checks (no cluster needed)
# --------------------------------------------------------------------------------------------
def test_gpu_switch_only_adds_gres_to_gpu_rules(monkeypatch):
    cpu, zero, gpu = (load_profile(monkeypatch, switch) for switch in (None, "0", "1"))
    assert zero == cpu
    gres = {rule: res.pop("gres") for rule, res in gpu["set-resources"].items() if "gres" in res}
    assert gres == {rule: "gpu:1" for rule in GPU_RULES}
    assert gpu == cpu, "KVBENCH_GPU=1 must change nothing but the gres entries"
    assert not (PROFILES / "slurm-gpu").exists(), "one Slurm profile: the GPU variant is KVBENCH_GPU=1"


def test_gpu_switch_refuses_other_values(tmp_path):
    out = run_with_profile(tmp_path, write_toy_workflow(tmp_path), ["--dry-run"],
                           env=dict(local_env(), KVBENCH_GPU="yes"), check=False)
    assert "KVBENCH_GPU must be 1" in out and "rule build_model" not in out, out[-3000:]


@pytest.mark.parametrize("gpu", [None, "1"])
def test_profile_sets_no_job_needs(monkeypatch, gpu):
    """Memory, runtime and threads are the rules'; the profile only maps them onto Slurm."""
    profile = load_profile(monkeypatch, gpu)
    assert not {"set-threads", "resources", "set-resource-scopes"} & set(profile)
    defaults = profile["default-resources"]
    assert set(defaults) <= {"slurm_partition", "slurm_account", "cpus_per_task"}, defaults
    assert defaults["cpus_per_task"] == "threads"  # sbatch --cpus-per-task = the rule's threads
    for rule, res in profile["set-resources"].items():
        # the local GPU slot becomes no --gpus; GPUs are asked for as gres (KVBENCH_GPU=1)
        assert rule in GPU_RULES and res["gpu"] == 0 and set(res) <= {"gpu", "gres"}, (rule, res)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_profile_resources_resolve(tiny_plans, variant):
    """Dry run of the real DAG: each job asks Slurm for what its rule declares locally, plus the
    mapping (partition, account, gres on the model rules with KVBENCH_GPU=1, no local GPU slot)."""
    local, slurm = planned_jobs(tiny_plans["local"]), planned_jobs(tiny_plans[variant])
    assert slurm.keys() == local.keys() and {rule for rule, _ in slurm} == GPU_RULES | CPU_RULES | {"all"}
    for (rule, wildcards), res in slurm.items():
        if rule == "all":  # a local target list: runs nothing
            continue
        declared = local[rule, wildcards]
        assert (res["mem_mb"], res["runtime"]) == (declared["mem_mb"], declared["runtime"]), (rule, res)
        assert res["slurm_partition"] == "gpu-a100" and res["slurm_account"] == "proj42"
        if rule in GPU_RULES:
            assert (declared["gpu"], res["gpu"]) == ("1", "0")
            assert res.get("gres") == ("gpu:1" if variant == "gpu" else None)
        else:
            assert "gpu" not in res and "gres" not in res, (rule, res)
    by_rule = {rule: res for (rule, _), res in slurm.items()}
    assert (by_rule["evaluate"]["mem_mb"], by_rule["evaluate"]["runtime"]) == ("16000", "480")
    assert (by_rule["make_data"]["mem_mb"], by_rule["make_data"]["runtime"]) == ("2000", "30")
    assert by_rule["make_data"]["cpus_per_task"] == "1"
    assert "Group job data" in tiny_plans[variant]  # make_data jobs bundled into one submission


# --------------------------------------------------------------------------------------------
# Real cluster
# --------------------------------------------------------------------------------------------
@pytest.mark.slurm
def test_slurm_profile_runs_dag_through_sbatch(slurm, slurm_env, tmp_path):
    args = ["--config", "fail_first_attempt=build_model"]

    local = tmp_path / "local"
    run_with_profile(local, write_toy_workflow(local), args, env=local_env(), profile=PROFILES / "default")
    assert "slurm_job=none attempt=2" in (local / "logs" / "build_model.log").read_text()

    work = tmp_path / "slurm"
    out = run_with_profile(work, write_toy_workflow(work), [*args, *FAST_STATUS, "--slurm-keep-successful-logs"],
                           env=slurm_env)

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

    # build_model failed once, was retried with twice the memory its rule declares, and succeeded.
    first, second = sorted(by_rule["build_model"], key=int)
    assert (jobs[first]["JobState"], jobs[second]["JobState"]) == ("FAILED", "COMPLETED")
    assert (work / "logs/build_model.log").read_text().split() == [f"slurm_job={second}", "attempt=2"]
    mem1, mem2 = (mem_mb(jobs[j]["MinMemoryNode"]) for j in (first, second))
    assert abs(mem2 - 2 * mem1) <= 1, (mem1, mem2)
    assert jobs[second]["NumCPUs"] == "2"  # cpus_per_task: threads
    # build_model declares gpu=1 (for local runs); the profile must not turn it into --gpus.
    assert not any("gpu" in info.get("TresPerNode", "") + info.get("TresPerJob", "") for info in jobs.values())

    # Same results as the local run.
    for path in TOY_OUTPUTS:
        assert (work / path).read_text() == (local / path).read_text(), path


@pytest.mark.slurm
def test_resume_after_slurmd_crash(slurm, slurm_env, tmp_path):
    """slurmd and Snakemake die mid-run; after cleanup, a rerun redoes only the missing jobs."""
    work = tmp_path / "resume"
    snakefile = write_toy_workflow(work, release=False)  # build_model blocks until released
    proc, log = start_with_profile(work, snakefile, FAST_STATUS, env=slurm_env)
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
    run_with_profile(work, snakefile, ["--unlock"], env=slurm_env)

    out = run_with_profile(work, snakefile, FAST_STATUS, env=slurm_env)
    assert rule_blocks(out) == Counter({"build_model": 1, "evaluate": 1, "all": 1}), rule_blocks(out)
    assert len(slurm_job_ids(out)) == 2
    assert {p: (work / p).stat().st_mtime_ns for p in TOY_OUTPUTS[:2]} == data_mtimes
    assert (work / "results/combined.txt").read_text() == "data 1\ndata 2\nweights 42\n"


@pytest.mark.slurm
def test_real_pipeline_dag_through_slurm(slurm, slurm_env, tmp_path):
    """The pipeline's own Snakefile on a small config: every model job through sbatch, and the
    metrics equal a local run's. The rules' memory requests are scaled down to the test node."""
    import pandas as pd

    config = REPO / "tests" / "data" / "slurm.yaml"
    args = ["--configfile", str(config)]
    local, work, plan = tmp_path / "local", tmp_path / "slurm", tmp_path / "plan"
    for d in (local, work, plan):
        d.mkdir()
    dry = run_with_profile(plan, REPO / "Snakefile", [*args, "--dry-run", "--quiet", "host"], env=slurm_env)
    slurm_profile = fit_profile_to_node(PROFILES / "slurm", tmp_path / "profile", slurm.memory_mb,
                                        first_mem_mb(dry))
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
