"""Atomic writes: every output appears complete or not at all, and only replaces its own kind.

Files are written to a temporary name in the destination directory and renamed (os.replace is
atomic on POSIX within a file system); directories are built under a temporary name and renamed.
A writer killed with SIGKILL cannot clean up its temporary name (`.tmp-<name>-<random>`): the next
write of the same output sweeps such leftovers first. An OSError while writing (a full disk, a
read-only folder) is re-raised naming the destination.

Nothing else is ever replaced: a directory output (`atomic_dir`) replaces only an empty folder or a
previous build of the same kind (its marker file, `.kvbench_dir`, names the kind), and a file output
replaces only a file its `owned` check recognises. Anything else at the path is an OutputError
(one line, before any work): `--out resources/models/` or `--out .` never wipe a folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Callable

MARKER = ".kvbench_dir"  # {"kind": ...}: written into every directory atomic_dir builds
# folders kvbench built before the marker existed, recognised by the files each kind always holds
_LEGACY = {"model": ("kvbench_source.json", "build_info.json")}


class OutputError(ValueError):
    """An output path that must not be written (it holds something kvbench did not build)."""


def _sweep(path: str, suffix: str = "") -> None:
    """Remove temp names a dead writer of `path` left beside it (mkstemp/mkdtemp names: no '-' in the
    random part, so the temp names of another output, e.g. `name-2`, never match)."""
    d, base = os.path.split(os.path.abspath(path))
    pat = re.compile(r"\.tmp-" + re.escape(base) + r"-[A-Za-z0-9_]+" + r"(\.[A-Za-z0-9_.]+)?$")
    try:
        names = os.listdir(d)
    except OSError:
        return
    for n in names:
        if pat.match(n):
            p = os.path.join(d, n)
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)


def _named(e: OSError, path: str) -> OSError:
    if path in str(e):
        return e
    err = OSError(f"cannot write {path}: {e.strerror or e}")
    err.errno, err.strerror, err.filename = e.errno, e.strerror, path
    return err


def dir_kind(path: str) -> str | None:
    """The kind of kvbench build at `path` ('model', ...), '' for an empty folder, None otherwise."""
    if os.path.islink(path) or not os.path.isdir(path):
        return None
    try:
        names = os.listdir(path)
    except OSError:
        return None
    if not names:
        return ""
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            return str(json.load(f)["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for kind, files in _LEGACY.items():
        if any(n in names for n in files):
            return kind
    return None


def check_out_dir(path: str, kind: str, option: str = "--out") -> None:
    """OutputError unless `path` is free for a directory output of `kind`: absent, an empty folder,
    or a previous build of the same kind. Call it before any work; atomic_dir calls it again."""
    p = os.path.abspath(path)
    if os.path.dirname(p) == p:
        raise OutputError(f"{option} {path!r} is the file system root; give a new folder for the {kind}")
    if os.path.islink(p):
        raise OutputError(f"{option} {path!r} is a symbolic link; give the folder itself (or a new folder)")
    if not os.path.lexists(p):
        return
    if not os.path.isdir(p):
        raise OutputError(f"{option} {path!r} exists and is not a folder; refusing to replace it")
    found = dir_kind(p)
    if found not in ("", kind):
        what = f"a {found} build" if found else f"not a kvbench {kind} build (no {MARKER})"
        raise OutputError(f"{option} {path!r} is an existing folder, {what}; refusing to replace it: "
                          f"give a new folder (or remove it yourself)")
    cwd = os.path.abspath(os.getcwd())
    if cwd == p or cwd.startswith(p + os.sep):
        raise OutputError(f"{option} {path!r} contains the working directory; refusing to replace it")


def check_out_file(path: str, owned: Callable[[str], bool] | None = None, what: str = "output",
                   option: str = "--out") -> None:
    """OutputError unless `path` is free for a file output: absent, or a file `owned` recognises as a
    previous output of the same kind (no `owned`: any regular file)."""
    p = os.path.abspath(path)
    if os.path.isdir(p):
        raise OutputError(f"{option} {path!r} is an existing folder; give a file name for the {what}")
    if os.path.lexists(p) and not os.path.isfile(p):
        raise OutputError(f"{option} {path!r} exists and is not a regular file; refusing to replace it")
    if os.path.isfile(p) and owned is not None and not owned(p):
        raise OutputError(f"{option} {path!r} exists and is not a kvbench {what}; refusing to replace it: "
                          f"give another name (or remove it yourself)")


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


def _publish_mode(tmp: str, base: int) -> None:
    """Give a finished temp file (base 0o666) or folder (0o777) the mode a plain open()/mkdir()
    would have: mkstemp/mkdtemp create them private (0o600/0o700), so results renamed into place
    would be unreadable to the group and others that the umask lets read them."""
    os.chmod(tmp, base & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary file path next to `path`; on success rename it to `path`. `path` may not be
    an existing folder (OutputError before anything is written)."""
    d = os.path.dirname(os.path.abspath(path))
    check_out_file(path, what="file", option="output")
    try:
        os.makedirs(d, exist_ok=True)
        _sweep(path, suffix)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", suffix=suffix, dir=d)
        os.close(fd)
    except OSError as e:
        raise _named(e, path) from e
    try:
        try:
            yield tmp
            _publish_mode(tmp, 0o666)
            os.replace(tmp, path)
        except OSError as e:
            raise _named(e, path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str, kind: str = "model"):
    """Yield a temporary directory next to `path`; on success it replaces `path`, which may only be
    absent, an empty folder or a previous build of the same `kind` (else OutputError, checked before
    the yield and again before the swap). The new folder carries the marker naming its kind."""
    check_out_dir(path, kind)
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    try:
        os.makedirs(d, exist_ok=True)
        _sweep(path)
        old = path + ".old"  # left by a writer of the old layout killed between its two renames
        if dir_kind(old) == kind:
            shutil.rmtree(old, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=d)
    except OSError as e:
        raise _named(e, path) from e
    try:
        yield tmp
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump({"kind": kind}, f)
        check_out_dir(path, kind)  # nothing else appeared there while we worked
        try:
            _publish_mode(tmp, 0o777)
            if os.path.isdir(path):
                # the previous build moves to a temp name (swept if we die before removing it)
                old = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=d)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except OSError as e:
            raise _named(e, path) from e
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
