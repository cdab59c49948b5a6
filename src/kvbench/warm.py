"""Warm start for local runs: kvbench commands forked from a process that has already imported torch
and transformers, instead of each job paying the import (~10 s on a slow 2-core machine, ~45% of a
paper-smoke job's time; a job of the offline default computes for 3-60 s).

    KVBENCH_WARM=1 python -m kvbench eval ...     (what the Snakemake rules run locally)
    KVBENCH_WARM=0                                (or unset: every command runs in its own process)

The first command starts a server (`python -m kvbench.warm`) that imports the engine, listens on a
Unix socket in a private folder and exits after IDLE_S seconds without work. Each command is a
client: it sends its argv, working directory, environment and its stdin/stdout/stderr (SCM_RIGHTS),
the server forks a child that runs `kvbench.cli.main(argv)` there, and the client exits with the
child's exit code. To Snakemake and to the job it looks like one process:
  - the log is the client's stderr, written by the child directly (progress lines included);
  - SIGINT/SIGTERM/SIGHUP sent to the client go to the child (eval's Ctrl-C still keeps finished
    samples), and the client waits for the child before it exits, so no output appears after
    Snakemake has seen the job end; a client killed outright (SIGKILL) closes its socket and the
    server kills the child;
  - a child is what a new process would be after its imports: environment, working directory,
    umask, thread count (OMP_NUM_THREADS), and fresh random seeds are the client's.
What a library reads once at import (OpenMP's and malloc's settings, cache folders, the code itself)
would be the server's, so a server only serves clients whose interpreter, sys.path, environment and
kvbench source files match its own (their hash names the socket); any difference starts another one.
The server never runs a torch operation itself: forking after OpenMP has started threads can hang.

Not used under a batch system (SLURM_JOB_ID set: each job is its own allocation, whose processes end
with it), nor where a GPU is visible (/dev/nvidia*, /dev/kfd) or off Linux: a CUDA (or ROCm, Metal)
context must not be inherited through fork, an import may already touch the driver, and a GPU job's
import time is small beside its work. Never required: if the server cannot be started or reached,
the command runs in-process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import tempfile
import time

IDLE_S = 60  # a server with no job for this long exits (jobs of one Snakemake run follow within ~1 s)
START_TIMEOUT_S = 300  # a cold import on a busy machine takes 10-30 s; give up (run in-process) after this
# set per shell or by the shell itself; they do not change what an import reads
_VOLATILE_ENV = ("_", "PWD", "OLDPWD", "SHLVL", "KVBENCH_WARM")
_HEADER = struct.Struct("!I")


def enabled() -> bool:
    return (os.environ.get("KVBENCH_WARM", "") not in ("", "0") and not os.environ.get("SLURM_JOB_ID")
            and sys.platform == "linux" and not gpu_visible())


def gpu_visible() -> bool:
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


def _state_dir() -> str:
    base = os.environ.get("KVBENCH_WARM_DIR") or os.path.join(tempfile.gettempdir(), f"kvbench-warm-{os.getuid()}")
    os.makedirs(base, mode=0o700, exist_ok=True)
    if os.stat(base).st_uid != os.getuid():
        raise OSError(f"{base} belongs to another user")
    return base


def server_key() -> str:
    """Hash of what an import depends on: interpreter, sys.path, environment, kvbench's source files."""
    import kvbench

    h = hashlib.sha256()
    h.update(sys.executable.encode())
    h.update(json.dumps(sys.path[1:]).encode())  # [0] is the script's folder or '' (cwd), not a dependency
    env = {k: v for k, v in os.environ.items() if k not in _VOLATILE_ENV}
    h.update(json.dumps(sorted(env.items())).encode())
    root = os.path.dirname(os.path.abspath(kvbench.__file__))
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".py"):
                st = os.stat(os.path.join(folder, f))
                h.update(f"{os.path.relpath(os.path.join(folder, f), root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------- client

def run(argv: list[str]) -> int | None:
    """Run `kvbench argv` in a warm child; its exit code, or None if no server could serve it."""
    try:
        base = _state_dir()
        key = server_key()
    except OSError:
        return None
    path = os.path.join(base, key + ".sock")
    for _ in range(3):  # a server may exit (idle) between our connect and its accept: try again
        sock = _connect_or_start(base, key, path)
        if sock is None:
            return None
        try:
            code = _serve_me(sock, argv)
        finally:
            sock.close()
        if code is not None:
            return code
    return None


def _connect(path: str) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return s
    except OSError:
        s.close()
        return None


def _connect_or_start(base: str, key: str, path: str) -> socket.socket | None:
    s = _connect(path)
    if s is not None:
        return s
    with open(os.path.join(base, key + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one client starts the server; the others wait here, then connect
        s = _connect(path)
        if s is not None:
            return s
        if os.path.exists(path):
            os.unlink(path)  # left by a server that died without cleaning up
        import subprocess

        env = {k: v for k, v in os.environ.items() if k != "KVBENCH_WARM"}
        with open(os.path.join(base, key + ".log"), "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "kvbench.warm", path], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, env=env, start_new_session=True, close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return None  # the server failed to start (its log says why): run in-process
            s = _connect(path)
            if s is not None:
                return s
            time.sleep(0.05)
        proc.kill()
        return None


def _serve_me(sock: socket.socket, argv: list[str]) -> int | None:
    """Send the request, relay signals to the child, return its exit code (None: not started)."""
    umask = os.umask(0)
    os.umask(umask)
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "umask": umask,
                          "env": {k: v for k, v in os.environ.items() if k != "KVBENCH_WARM"}}).encode()
    try:
        socket.send_fds(sock, [_HEADER.pack(len(request)) + request], [0, 1, 2])
    except OSError:
        return None
    reader = sock.makefile("r", encoding="utf-8")
    try:
        line = reader.readline()
    except OSError:
        line = ""
    if not line.startswith("pid "):
        return None
    child = int(line.split()[1])

    def forward(signum, _frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    try:  # a signal handled meanwhile does not interrupt the read (PEP 475)
        line = reader.readline()
    except OSError:  # the server died: it took the child with it
        line = ""
    if line.startswith("exit "):
        return int(line.split()[1])
    return 1  # the server went away while the child ran (it kills its children when it ends)


# ---------------------------------------------------------------------------------------- server

def _warm_imports() -> None:
    """What every model-running command imports, without running a torch operation."""
    import pyarrow.parquet  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from . import cli, data, evaluate, models, profiling  # noqa: F401


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    msg, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    if len(msg) < _HEADER.size:
        raise OSError("short request")
    (n,) = _HEADER.unpack(msg[:_HEADER.size])
    body = msg[_HEADER.size:]
    while len(body) < n:
        more = conn.recv(n - len(body))
        if not more:
            raise OSError("truncated request")
        body += more
    return json.loads(body), fds


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the client's process, run the command, never return."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["kvbench", *request["argv"]]
        import random

        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        import torch

        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))
        from .cli import main

        try:
            main(request["argv"])
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - what an uncaught exception prints in a normal process
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _sweep(base: str, max_age_s: float = 86400) -> None:
    """Logs and locks of servers gone for a day (each change of source or environment makes a key)."""
    now = time.time()
    for name in os.listdir(base):
        stem, ext = os.path.splitext(name)
        p = os.path.join(base, name)
        if ext in (".log", ".lock") and not os.path.exists(os.path.join(base, stem + ".sock")):
            try:
                if now - os.stat(p).st_mtime > max_age_s:
                    os.unlink(p)
            except OSError:
                pass


def serve(path: str, idle_s: float = IDLE_S) -> None:
    _sweep(os.path.dirname(path))
    _warm_imports()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print(f"kvbench.warm: pid {os.getpid()} serving on {path}", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    running: dict[int, socket.socket] = {}  # child pid -> its client's connection
    last_work, served = time.monotonic(), 0

    def stop_children(*_):
        for pid in running:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _remove(path, listener)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGINT, stop_children)
    while True:
        for key, _ in sel.select(timeout=0.1):
            if key.fileobj is listener:
                try:
                    conn, _ = listener.accept()
                    request, fds = _recv_request(conn)
                except (OSError, ValueError):
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    for c in running.values():
                        c.close()
                    conn.close()
                    _child(request, fds)
                for fd in fds:
                    os.close(fd)
                served += 1
                print(f"kvbench.warm: job {served} pid {pid}: kvbench {' '.join(request['argv'][:1])} "
                      f"in {request['cwd']}", flush=True)
                try:
                    conn.sendall(f"pid {pid}\n".encode())
                except OSError:
                    pass
                running[pid] = conn
                sel.register(conn, selectors.EVENT_READ, pid)
            else:  # a client's socket became readable: it went away (it sends nothing else)
                try:
                    gone = not key.fileobj.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone and key.data in running:
                    try:
                        os.kill(key.data, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    sel.unregister(key.fileobj)
        while running:  # reap finished children, report their exit codes
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = running.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code  # killed by signal n: 128 + n, as a shell reports it
            try:
                sel.unregister(conn)
            except (KeyError, ValueError):
                pass
            try:
                conn.sendall(f"exit {code}\n".encode())
            except OSError:
                pass
            conn.close()
            last_work = time.monotonic()
        if not running and time.monotonic() - last_work > idle_s:
            lock_path = path[: -len(".sock")] + ".lock"
            with open(lock_path, "a+") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a client is starting or connecting: stay
                _remove(path, listener)
            print(f"kvbench.warm: idle {idle_s:.0f} s after {served} jobs, exiting", flush=True)
            return


def _remove(path: str, listener: socket.socket) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
    listener.close()


if __name__ == "__main__":
    serve(sys.argv[1], float(os.environ.get("KVBENCH_WARM_IDLE", IDLE_S)))
