"""The install routes agree: pyproject, the conda env of the rules, the README's commands and CI."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# run by Snakemake itself, not inside a rule's environment
NOT_IN_RULE_ENV = {"snakemake", "snakemake-executor-plugin-slurm"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)\n```", text, re.S)
    assert m, f"README.md has no code block after <!-- {marker} -->"
    return m.group(1)


def test_conda_env_pins_equal_pyproject():
    deps = {_name(d): d.replace(" ", "") for d in _pyproject()["project"]["dependencies"]}
    env = yaml.safe_load((ROOT / "envs" / "kvbench.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pinned = {_name(d): d.replace(" ", "") for d in pip if not d.startswith("-e")}
    expected = {k: v for k, v in deps.items() if k not in NOT_IN_RULE_ENV}
    assert pinned == expected, "envs/kvbench.yaml and pyproject.toml disagree on the rule dependencies"
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    version = python.split("=", 1)[1]
    assert f"Python {version}" in (ROOT / "README.md").read_text(), "README must name the env's Python as tested"
    lower = re.match(r">=\s*([\d.]+)$", _pyproject()["project"]["requires-python"])
    assert lower, "requires-python has a lower bound only (no upper cap)"
    assert tuple(map(int, version.split("."))) >= tuple(map(int, lower.group(1).split(".")))


def test_readme_commands_use_a_venv_and_the_exact_torch_pin():
    torch_pin = next(d for d in _pyproject()["project"]["dependencies"] if _name(d) == "torch")
    for marker in ("main-command", "test-command"):
        cmd = _readme_command(marker)
        assert cmd.startswith("python3 -m venv .venv && . .venv/bin/activate && "), marker
        assert f"pip install {torch_pin.replace(' ', '')} && " in cmd, f"{marker}: torch must be pinned exactly first"
    assert "python -m pytest -q" in _readme_command("test-command")


def test_ci_runs_the_readme_test_command_from_the_system_python():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "/usr/bin/python3" in ci and "test-command" in ci
    # the extraction .ci/run uses finds exactly the README's command
    out = subprocess.run(
        ["bash", "-c", "awk '/<!-- test-command -->/{f=1;next} f&&/^```bash/{g=1;next} g&&/^```/{exit} g{print}' "
         "README.md"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert out == _readme_command("test-command")


def test_package_data_ships_the_kernel_source():
    """A non-editable install must carry engine/deq.c, or the quantized store silently falls back to
    its slower torch path on every machine that installs kvbench from a wheel."""
    globs = _pyproject()["tool"]["setuptools"]["package-data"]["kvbench"]
    pkg = ROOT / "src" / "kvbench"
    shipped = {p.relative_to(pkg).as_posix() for g in globs for p in pkg.glob(g)}
    assert "engine/deq.c" in shipped, globs
