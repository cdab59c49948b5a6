"""The workflow's own conventions, checked on the tiny config with dry runs (seconds each).

    python -m pytest -q tests/test_workflow_rules.py

- Rules hold no lambdas: params, inputs and resources are named helpers in workflow/rules/common.smk,
  each with a docstring.
- Each job's needs (threads, mem_mb, runtime, gpu) are declared by its rule, grow with the attempt,
  and no profile changes them (tests/test_slurm.py checks the Slurm side).
- The config is validated once per Snakemake process.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny.yaml"
RULE_FILES = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
pytestmark = pytest.mark.dag


def dry_run(workdir: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", str(TINY),
           "--directory", str(workdir), "-n", "--forceall", "--quiet", "host", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def planned_jobs(output: str) -> dict[tuple[str, str], dict[str, str]]:
    """(rule, wildcards) -> resources of every job a dry run printed."""
    jobs, rule, wildcards = {}, None, ""
    for line in output.splitlines():
        if m := re.fullmatch(r"\s*(?:local)?rule (\w+):", line):
            rule, wildcards = m.group(1), ""
        elif m := re.fullmatch(r"\s*wildcards: (.*)", line):
            wildcards = m.group(1)
        elif (m := re.fullmatch(r"\s*resources: (.*)", line)) and rule:
            jobs[(rule, wildcards)] = dict(kv.split("=", 1) for kv in m.group(1).split(", "))
    return jobs


def test_no_lambdas_in_rules():
    hits = [f"{f.name}:{i}" for f in RULE_FILES for i, line in enumerate(f.read_text().splitlines(), 1)
            if re.search(r"\blambda\b", line)]
    assert not hits, f"lambdas in rules (use a named helper in common.smk): {hits}"


def test_every_helper_has_a_docstring():
    text = (REPO / "workflow" / "rules" / "common.smk").read_text()
    helpers = re.findall(r"^def (\w+)\(.*\):\n(.*)$", text, flags=re.MULTILINE)
    assert len(helpers) >= 10
    assert [name for name, body in helpers if not body.strip().startswith('"""')] == []


def test_rules_declare_needs_that_grow_with_the_attempt(tmp_path):
    first, second = planned_jobs(dry_run(tmp_path)), planned_jobs(dry_run(tmp_path, "--attempt", "2"))
    assert first.keys() == second.keys() and len(first) > 30
    for (rule, wildcards), res in first.items():
        if rule == "all":  # a target list: no command, nothing to ask for
            continue
        again = second[(rule, wildcards)]
        for key in ("mem_mb", "runtime"):
            assert int(again[key]) == 2 * int(res[key]), (rule, key, res, again)
        if rule in ("build_model", "profile_heads", "evaluate"):
            assert res["gpu"] == again["gpu"] == "0"  # tiny.yaml runs on the CPU


def test_gpu_declared_on_cuda_for_model_rules_only(tmp_path):
    jobs = planned_jobs(dry_run(tmp_path, "--config", "device=cuda"))
    gpu = {rule: res.get("gpu") for (rule, _), res in jobs.items()}
    assert gpu == {"build_model": "1", "profile_heads": "1", "evaluate": "1",
                   "make_data": None, "aggregate": None, "figure": None, "all": None}


# Runs Snakemake's own entry point with both validators wrapped, counting their calls.
COUNT_VALIDATIONS = r"""
import sys
import kvbench.config
import snakemake.utils
calls = []
def counted(name, fn):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)
    return wrapper
kvbench.config.validate_config = counted("validate_config", kvbench.config.validate_config)
snakemake.utils.validate = counted("snakemake.utils.validate", snakemake.utils.validate)
from snakemake.cli import main
try:
    main(sys.argv[1:])
finally:
    print("VALIDATIONS", calls, file=sys.stderr)
"""


def test_config_validated_once(tmp_path):
    cmd = [sys.executable, "-c", COUNT_VALIDATIONS, "-s", str(REPO / "Snakefile"), "--configfile", str(TINY),
           "--directory", str(tmp_path), "-n"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "VALIDATIONS ['validate_config']" in r.stderr, r.stderr[-3000:]
