"""Atomic writes: every output appears complete or not at all.

Files are written to a temporary name in the destination directory and renamed (os.replace is
atomic on POSIX within a file system); directories are built under a temporary name and renamed.
A writer killed with SIGKILL cannot clean up its temporary name (`.tmp-<name>-<random>`): the next
write of the same output sweeps such leftovers first. An OSError while writing (a full disk, a
read-only folder) is re-raised naming the destination.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile


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


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary file path next to `path`; on success rename it to `path`."""
    d = os.path.dirname(os.path.abspath(path))
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
def atomic_dir(path: str):
    """Yield a temporary directory next to `path`; on success it replaces `path`."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _sweep(path)
    shutil.rmtree(path + ".old", ignore_errors=True)  # left by a writer killed between its two renames
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=os.path.dirname(path))
    try:
        yield tmp
        if os.path.isdir(path):
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
