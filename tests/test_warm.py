"""Warm start (kvbench/warm.py): a command forked from a warm server behaves as the same command run in
its own process (working directory, environment, output, exit code, signals, results), a server serves
many commands, and a dead or idle server never blocks one."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kvbench(args, cwd, warm_dir=None, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBENCH_WARM")}
    if warm_dir is not None:
        env.update(KVBENCH_WARM="1", KVBENCH_WARM_DIR=str(warm_dir), KVBENCH_WARM_IDLE="30")
    return subprocess.run([sys.executable, "-m", "kvbench", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          **kw)


def served(warm_dir) -> list[tuple[int, int]]:
    """(server pid, child pid) of every command the servers in warm_dir ran."""
    out = []
    for name in sorted(os.listdir(warm_dir)):
        if name.endswith(".log"):
            server = None
            for line in open(os.path.join(warm_dir, name)):
                if m := re.match(r"kvbench.warm: pid (\d+) serving", line):
                    server = int(m[1])
                elif m := re.match(r"kvbench.warm: job \d+ pid (\d+)", line):
                    out.append((server, int(m[1])))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(cond, timeout=20.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


@pytest.fixture
def warm_dir(tmp_path):
    d = tmp_path / "warm"
    yield d
    for server, _ in served(d) if d.exists() else []:
        if alive(server):
            os.kill(server, signal.SIGTERM)


def test_a_warm_command_is_the_same_command_in_its_own_process(tmp_path, warm_dir):
    """Relative paths resolve in the client's folder, stdout/stderr and exit codes are the client's,
    and one server runs every command (each in a child of its own)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(os.path.join(ROOT, "config.yaml"), tmp_path / "b" / "mine.yaml")
    assert kvbench(["validate", "missing.yaml"], tmp_path / "a", warm_dir).returncode == 1  # starts the server
    for args in (["validate", "mine.yaml"], ["validate", "missing.yaml"], ["frobnicate"], ["methods"]):
        cold, hot = kvbench(args, tmp_path / "b"), kvbench(args, tmp_path / "b", warm_dir)
        assert (hot.returncode, hot.stdout, hot.stderr) == (cold.returncode, cold.stdout, cold.stderr), args
    jobs = served(warm_dir)
    assert len(jobs) == 5 and len({s for s, _ in jobs}) == 1, jobs
    assert len({c for _, c in jobs}) == 5


def test_a_dead_servers_socket_does_not_block_and_an_idle_server_exits(tmp_path, warm_dir):
    assert kvbench(["methods"], tmp_path, warm_dir).returncode == 0
    (server, _), = served(warm_dir)
    os.kill(server, signal.SIGKILL)
    wait_until(lambda: not alive(server))
    assert [n for n in os.listdir(warm_dir) if n.endswith(".sock")], "the killed server left its socket"
    r = kvbench(["methods"], tmp_path, warm_dir)
    assert r.returncode == 0 and "streaming_llm" in r.stdout
    servers = {s for s, _ in served(warm_dir)}
    assert len(servers) == 2
    new = (servers - {server}).pop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBENCH_WARM")}
    env.update(KVBENCH_WARM="1", KVBENCH_WARM_DIR=str(warm_dir), KVBENCH_WARM_IDLE="1")
    # a server with another environment (idle time 1 s) is another server; it exits after 1 s idle
    subprocess.run([sys.executable, "-m", "kvbench", "methods"], cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    third = ({s for s, _ in served(warm_dir)} - servers).pop()
    wait_until(lambda: not alive(third), timeout=30)
    assert alive(new)
    assert len([n for n in os.listdir(warm_dir) if n.endswith(".sock")]) == 1


@pytest.fixture(scope="module")
def ppl_job(tmp_path_factory, tiny_model_dir):
    from kvbench.data import make_data

    d = tmp_path_factory.mktemp("warm_eval")
    data = str(d / "L256.jsonl")
    make_data({"source": "synthetic"}, 256, 12, 0, data)

    def args(out, n=2):
        return ["eval", "--model", tiny_model_dir, "--model-name", "tiny", "--task", "ppl", "--data", data,
                "--dataset", "synth", "--method", "h2o", "--type", "h2o", "--budget", "64", "--length", "256",
                "--chunk-size", "8", "--device", "cpu", "--seed", "0", "--max-samples", str(n), "--out", out]
    return d, args


def test_a_warm_eval_writes_the_rows_a_cold_one_writes(ppl_job, warm_dir):
    from test_resume import metric_columns

    d, args = ppl_job
    cold, hot = kvbench(args(str(d / "cold.parquet")), d), kvbench(args(str(d / "hot.parquet")), d, warm_dir)
    assert cold.returncode == 0 and hot.returncode == 0, hot.stderr[-2000:]
    assert len(served(warm_dir)) == 1
    a, b = pd.read_parquet(d / "cold.parquet"), pd.read_parquet(d / "hot.parquet")
    pd.testing.assert_frame_equal(metric_columns(a), metric_columns(b), check_exact=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_signal_to_the_client_reaches_the_child(ppl_job, warm_dir, sig):
    """SIGINT goes to the child (eval ends as interrupted, keeping finished samples) and the client
    waits for it; a client killed outright takes its child with it. Either way no output appears."""
    d, args = ppl_job
    out = str(d / f"signal{sig}.parquet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBENCH_WARM")}
    env.update(KVBENCH_WARM="1", KVBENCH_WARM_DIR=str(warm_dir), KVBENCH_WARM_IDLE="30")
    proc = subprocess.Popen([sys.executable, "-m", "kvbench", *args(out, 12)], cwd=d, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: os.path.isdir(warm_dir) and served(warm_dir), timeout=300)
    (_, child), = served(warm_dir)
    wait_until(lambda: os.path.isdir(out + ".partial"), timeout=120)  # the child is computing
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted; rerun to resume" in err, (proc.returncode, err[-2000:])
        assert not alive(child), "the client ended before its child"
    else:
        wait_until(lambda: not alive(child), timeout=10)
    time.sleep(1)
    assert not os.path.exists(out), "the job wrote its output after it was stopped"


def test_off_under_slurm_on_a_gpu_machine_and_when_asked(monkeypatch):
    from kvbench import warm

    monkeypatch.setenv("KVBENCH_WARM", "1")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert warm.enabled()
    key = warm.server_key()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # read at import by OpenMP: another server
    assert warm.server_key() != key
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert not warm.enabled()
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("KVBENCH_WARM", "0")
    assert not warm.enabled()
    monkeypatch.setenv("KVBENCH_WARM", "1")
    monkeypatch.setattr(warm, "gpu_visible", lambda: True)  # a GPU node: CUDA is never forked
    assert not warm.enabled()


def test_logs_and_locks_of_servers_gone_for_a_day_are_swept(tmp_path):
    from kvbench import warm

    old = time.time() - 2 * 86400
    for name in ("gone.log", "gone.lock", "live.log", "live.lock", "live.sock", "recent.log", "other.txt"):
        (tmp_path / name).write_text("")
        if name != "recent.log":
            os.utime(tmp_path / name, (old, old))
    warm._sweep(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["live.lock", "live.log", "live.sock", "other.txt", "recent.log"]
