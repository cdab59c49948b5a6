"""A throw-away single-node Slurm cluster for tests, run as root on this machine.

    with slurm_cluster() as cluster:          # or the `slurm` fixture in tests/test_slurm.py
        subprocess.run(["sbatch", "--wrap", "hostname"], env=cluster.env)

What it does (see ../../../shared/SLURM_FACTS.md for why each setting is there):
- skips the test (pytest.skip) when not root or when apt-get is missing;
- installs Debian's slurm-wlm and munge with apt-get when slurmctld is missing;
- writes a private munge key, slurm.conf, state/spool/log directories into one temp dir, and
  picks free ports, so it never touches /etc/slurm, /etc/munge or a munged/slurm already
  running on the machine; the one path outside the temp dir is a symlink
  /run/slurm/conf/slurm.conf -> that slurm.conf, for nested sruns (see link_runtime_conf);
- starts its own munged (--force, private socket), `slurmctld -D` and `slurmd -D`, waits until
  `sinfo` shows the node idle, and yields a SlurmCluster whose `env` (SLURM_CONF=...) lets
  sbatch/squeue/scancel and Snakemake's Slurm executor talk to it;
- on exit cancels the jobs still queued, stops exactly the daemons it started (by PID) and
  removes the temp dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

PACKAGES = ("slurm-wlm", "munge")
PARTITION = "debug"
RUNTIME_CONF = Path("/run/slurm/conf/slurm.conf")


def _which(name: str) -> str | None:
    # Daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"    <unreadable: {exc}>"
    return "\n".join("    " + line for line in lines[-n:]) or "    <empty>"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _mem_available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def ensure_slurm_installed() -> float:
    """Install slurm-wlm and munge with apt-get if slurmctld is missing.

    Returns the seconds spent installing (0.0 when already installed). Skips the calling test
    when not root or apt-get is unavailable; raises with apt's output when the install fails.
    """
    if os.geteuid() != 0:
        pytest.skip("a real Slurm cluster needs root (daemons run as SlurmUser=root)")
    if all(_which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return 0.0
    if not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and apt-get is unavailable to install it")
    t0 = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # On a machine with an init system, the packages' postinst would try to start the system
    # slurmctld/slurmd (with no slurm.conf: they fail, and so could dpkg). A policy-rc.d that
    # answers 101 forbids service starts during the install; removed again afterwards.
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        for cmd in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
        ):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
                )
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if not _which(b)]
    if missing:
        raise RuntimeError(f"installed {PACKAGES} but still missing: {missing}")
    return time.monotonic() - t0


class SlurmCluster:
    """A running single-node cluster: its env, files and daemons (started by `slurm_cluster`)."""

    def __init__(self, root: Path, install_seconds: float):
        self.root = root
        self.install_seconds = install_seconds
        self.node = subprocess.run(
            ["hostname", "-s"], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.cpus = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
        # "A bit below free memory": jobs asking for more than this are rejected by sbatch.
        self.memory_mb = max(256, int(_mem_available_mb() * 0.8))
        self.partition = PARTITION
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for var in [v for v in self.env if v.startswith(("SLURM_JOB", "SBATCH_"))]:
            del self.env[var]  # never inherit an outer allocation or sbatch defaults
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}
        self._created_run_paths: list[Path] = []

    # -- files -------------------------------------------------------------------------------
    def write_files(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(mode=0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        self.conf.write_text(
            f"""\
# Written by tests/slurm/cluster.py: one node, no cgroups, no accounting database.
ClusterName=kvbenchtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Finished jobs stay visible to squeue for 5 minutes: the executor's status command.
MinJobAge=300
KillWait=5
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
# OverSubscribe: up to 4 jobs may share a core. With only nproc cores, a job holding one (a
# long build_model) would otherwise block a group job that sums its members' CPUs.
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""
        )

    def link_runtime_conf(self) -> None:
        """Make the config findable without SLURM_CONF, at slurmd's configless cache path.

        Inside a job, Snakemake's slurm-jobstep executor runs each rule through a nested
        `srun`, and strips every SLURM_* variable (SLURM_CONF included) from its environment
        first. Such an srun looks for /etc/slurm/slurm.conf, then /run/slurm/conf/slurm.conf:
        the latter is a runtime path (where a configless slurmd caches its config), so a
        symlink there reaches our conf without touching /etc. Removed again on exit.
        """
        if Path("/etc/slurm/slurm.conf").exists():
            pytest.skip("/etc/slurm/slurm.conf exists: a nested srun in the test jobs would use "
                        "that system cluster instead of the private test cluster")
        conf_dir = RUNTIME_CONF.parent
        if RUNTIME_CONF.is_symlink() and not RUNTIME_CONF.exists():
            RUNTIME_CONF.unlink()  # dangling link left by a killed earlier session
        if RUNTIME_CONF.exists():
            pytest.skip(f"{RUNTIME_CONF} exists (a configless slurmd or another test cluster "
                        "runs here); a nested srun would use it instead of the test cluster")
        for d in (conf_dir.parent, conf_dir):
            if not d.exists():
                d.mkdir()
                self._created_run_paths.insert(0, d)
        RUNTIME_CONF.symlink_to(self.conf)
        self._created_run_paths.insert(0, RUNTIME_CONF)

    def unlink_runtime_conf(self) -> None:
        for path in self._created_run_paths:  # link first, then the dirs we made
            with contextlib.suppress(OSError):
                path.unlink() if path.is_symlink() else path.rmdir()
        self._created_run_paths.clear()

    # -- daemons -----------------------------------------------------------------------------
    def _start(self, name: str, cmd: list[str]) -> None:
        log = self.root / "log" / f"{name}.out"
        self._logs[name] = log
        with open(log, "ab") as out:
            self._procs[name] = subprocess.Popen(
                cmd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the test session must not hit it first
            )

    def start_munged(self) -> None:
        m = self.root / "munge"
        self._start(
            "munged",
            [
                _which("munged"), "--foreground", "--force",
                f"--key-file={m / 'munge.key'}", f"--socket={self.munge_socket}",
                f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}", "--num-threads=2",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), 15, "munged to create its socket")

    def start_slurmctld(self) -> None:
        self._start("slurmctld", [_which("slurmctld"), "-D"])

    def start_slurmd(self) -> None:
        self._start("slurmd", [_which("slurmd"), "-D", "-N", self.node])

    def kill_slurmd(self) -> None:
        """SIGKILL slurmd, like a node daemon crash (running job steps survive, as in Slurm)."""
        self._stop("slurmd", signal.SIGKILL)

    def daemon_pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self._procs.items() if p.poll() is None}

    def _stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        proc = self._procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop_all(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            self._stop(name)

    # -- queries -----------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return proc.stdout.strip() if proc.returncode == 0 else f"<sinfo failed: {proc.stderr.strip()}>"

    def jobs(self) -> dict[str, str]:
        """Slurm job id -> state, for all jobs still known to slurmctld (MinJobAge=300 s)."""
        out = self.run("squeue", "-h", "--states=all", "-o", "%i|%T").stdout
        return dict(line.split("|", 1) for line in out.split() if "|" in line)

    def job_field(self, jobid: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", jobid).stdout
        for item in out.split():
            if item.startswith(field + "="):
                return item.split("=", 1)[1]
        return ""

    def cancel_all(self, timeout: float = 30.0) -> None:
        """scancel every queued/running job and wait until none is active."""
        self.run("scancel", "--user=root", check=False)  # root only: the daemons run as root
        active = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED")
        self._wait(
            lambda: not any(s in active for s in self.jobs().values()), timeout, "jobs to end after scancel"
        )

    def wait_for_node(self, states=("idle",), timeout: float = 60.0) -> None:
        def ok() -> bool:
            for name in ("munged", "slurmctld", "slurmd"):
                proc = self._procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.log_tails()}")
            return self.node_state() in states

        self._wait(ok, timeout, f"node {self.node} to be {'/'.join(states)}")

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout:.0f} s waiting for {what} "
                    f"(sinfo: {self.node_state()})\n{self.log_tails()}"
                )
            time.sleep(0.5)

    def log_tails(self) -> str:
        parts = []
        for path in [*self._logs.values(), *sorted((self.root / "log").glob("*.log")),
                     self.root / "munge" / "munged.log"]:
            if path.exists():
                parts.append(f"--- {path.name} (last lines) ---\n{_tail(path)}")
        return "\n".join(parts)


@contextlib.contextmanager
def slurm_cluster(timeout: float = 60.0) -> Iterator[SlurmCluster]:
    """Start a private single-node Slurm cluster; yield it; tear it down again."""
    install_seconds = ensure_slurm_installed()
    root = Path(tempfile.mkdtemp(prefix="kvbench-slurm-"))
    cluster = SlurmCluster(root, install_seconds)
    try:
        cluster.write_files()
        cluster.link_runtime_conf()
        cluster.start_munged()
        cluster.start_slurmctld()
        cluster.start_slurmd()
        cluster.wait_for_node(("idle",), timeout)
        yield cluster
    finally:
        try:
            if cluster.daemon_pids().keys() >= {"slurmctld", "slurmd"}:
                cluster.cancel_all(timeout=20)
        except Exception:
            pass  # teardown goes on: the daemons must stop regardless
        finally:
            cluster.stop_all()
            cluster.unlink_runtime_conf()
            shutil.rmtree(root, ignore_errors=True)
