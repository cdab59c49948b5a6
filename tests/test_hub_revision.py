"""hub: sources through the real huggingface_hub code, offline: a Hugging Face cache laid out as the
hub client writes it (blobs, refs, snapshots) stands in for a download done elsewhere. The model folder
links the cached weights, and every row records the commit the revision resolved to, not the branch."""

import hashlib
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "kvbench-test/tiny"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_model_dir):
    """HF_HUB_CACHE holding REPO at COMMIT, with refs/main pointing there."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap, blobs = repo / "snapshots" / COMMIT, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for name in os.listdir(tiny_model_dir):
        data = open(os.path.join(tiny_model_dir, name), "rb").read()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    return str(cache)


def _kvbench(args, cache, **kw):
    env = dict(os.environ, HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "kvbench", *args], env=env, capture_output=True, text=True, **kw)


def test_branch_resolves_to_its_commit_in_every_row(hub_cache, tmp_path):
    out = tmp_path / "model"
    r = _kvbench(["build-model", f"hub:{REPO}@main", "--out", str(out)], hub_cache)
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "kvbench_source.json").read_text())
    assert info["revision"] == COMMIT and info["requested_revision"] == "main"
    weights = out / "model.safetensors"
    blob = os.path.realpath(os.path.join(hub_cache, "models--kvbench-test--tiny", "snapshots", COMMIT,
                                         "model.safetensors"))
    assert os.stat(weights).st_ino == os.stat(blob).st_ino  # linked, not a second copy
    data = tmp_path / "L128.jsonl"
    r = _kvbench(["make-data", "--dataset-json", '{"source": "synthetic", "n_samples": 1}', "--length", "128",
                  "--model", str(out), "--out", str(data)], hub_cache)
    assert r.returncode == 0, r.stderr
    raw = tmp_path / "raw.parquet"
    r = _kvbench(["eval", "--model", str(out), "--task", "ppl", "--data", str(data), "--method", "full",
                  "--length", "128", "--device", "cpu", "--out", str(raw)], hub_cache)
    assert r.returncode == 0, r.stderr
    assert pq.read_table(raw).column("revision").to_pylist() == [COMMIT]


def test_unknown_revision_offline_names_the_way_out(hub_cache, tmp_path):
    r = _kvbench(["build-model", f"hub:{REPO}@v9", "--out", str(tmp_path / "m")], hub_cache)
    assert r.returncode != 0
    assert "kvbench-test/tiny@v9" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("rev,warned", [("main", True), ("v1.0", True), (COMMIT, False)])
def test_validate_warns_for_a_movable_revision(tmp_path, capsys, rev, warned):
    from kvbench.config import load_config, reset_warnings

    cfg = {"models": {"m": {"source": f"hub:{REPO}@{rev}"}},
           "datasets": {"synth": {"source": "synthetic", "n_samples": 1}},
           "tasks": {"ppl": {"wait_k": 5}}, "methods": {"full": {"type": "full"}},
           "studies": {"s": {"tasks": ["ppl"], "methods": ["full"], "lengths": [128]}}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    reset_warnings()
    load_config(str(p))
    err = capsys.readouterr().err
    assert ("not a commit hash" in err and f"m (@{rev})" in err) == warned
