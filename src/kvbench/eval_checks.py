"""An eval job's inputs checked before any work (kvbench.evaluate runs them before the model loads):
task parameters, the output path and its resume folder, the documents (ids, lengths, words a
word-level tokenizer knows), the positions each sample needs, and that the output folder is writable."""

from __future__ import annotations

import os

import pyarrow.parquet as pq

from . import tasks
from .config import INT_MAX, warn
from .io import OutputError, check_out_file
from .resume import _SIDECAR_FILE


def check_task_params(task_params: dict, task: str | None = None) -> None:
    """Known keys (a parameter of any task), integers within range; with `task`, a warning for a
    parameter it does not read (unless it is the default value: the workflow passes every task's
    whole section)."""
    from .config.method_checks import _type_ok

    known = tasks.base.parameters()
    for k, v in task_params.items():
        if k not in known:
            raise ValueError(f"unknown task parameter {k!r}; known: {sorted(known)}")
        lo = known[k].metadata.get("minimum")
        if known[k].type not in (int, "int"):  # a task's own kind of parameter: its annotation
            if not _type_ok(v, known[k].type) or (lo is not None and v < lo):
                raise ValueError(f"task parameter {k} must be {known[k].type} >= {lo}, got {v!r}")
        elif not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or v > INT_MAX:
            raise ValueError(f"task parameter {k} must be an integer >= {lo} (at most {INT_MAX}), got {v!r}")
        reads = tasks.base.fields(task) if task in tasks.REGISTRY else None
        if reads is not None and k not in reads and v != known[k].default:
            warn(f"task parameter {k}={v} is ignored: {task} reads only {', '.join(reads)}")


def is_result_file(path: str) -> bool:
    """A Parquet file written by `kvbench eval` (its schema carries the kvbench schema version)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 - unreadable: not ours
        return False
    return b"kvbench_schema_version" in meta


def _check_out(out: str) -> None:
    check_out_file(out, is_result_file, "eval result (Parquet with kvbench_schema_version)")
    if not out.endswith(".parquet"):
        raise OutputError(f"--out {out!r}: an eval result is a Parquet file: give a name ending in .parquet")
    partial = out + ".partial"
    if os.path.lexists(partial):
        if os.path.islink(partial) or not os.path.isdir(partial):
            raise OutputError(f"{partial!r} (this job's resume folder) exists and is not a folder; "
                              f"refusing to replace it")
        foreign = sorted(n for n in os.listdir(partial) if not _SIDECAR_FILE.fullmatch(n))
        if foreign:
            raise OutputError(f"{partial!r} (this job's resume folder) holds files kvbench did not write "
                              f"({', '.join(foreign[:3])}); refusing to clear it")


def _check_docs(docs: list[dict], path: str, length: int) -> None:
    """Field types of each document (a number or null where text belongs is an error, not "None"),
    and that the documents were built for this length."""
    for d in docs:
        where = f"{path}: document {d['id']}"
        if d["id"] > INT_MAX:
            raise ValueError(f"{where}: document ids must be at most {INT_MAX}")
        if not isinstance(d["source"], str):
            raise ValueError(f"{where}: source must be text, got {d['source']!r} ({type(d['source']).__name__})")
        for key in ("target", "src_lang", "tgt_lang"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise ValueError(f"{where}: {key} must be text, got {d[key]!r} ({type(d[key]).__name__})")
        for key in ("length", "n_tokens"):
            v = d.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{where}: {key} must be an integer >= 0, got {v!r}")
        ends = d.get("sent_ends")
        if ends is not None and not (isinstance(ends, list) and all(isinstance(e, int) and not isinstance(e, bool)
                                                                    for e in ends)):
            raise ValueError(f"{where}: sent_ends must be a list of integers, got {ends!r}")
    built = sorted({d["length"] for d in docs if d.get("length") is not None})
    if built and built != [length]:
        raise ValueError(f"{path}: its documents were built for length {', '.join(map(str, built))}, not "
                         f"--length {length}; pass the matching --length (or build the data at {length})")
    over = [d for d in docs if d.get("n_tokens") is not None and d["n_tokens"] > length]
    if over:
        raise ValueError(f"{path}: document {over[0]['id']} has {over[0]['n_tokens']} tokens, more than "
                         f"--length {length}")


def _check_words(prompter, docs: list[dict], path: str, translation: bool) -> None:
    """A word-level tokenizer (the builtin model) knows a fixed vocabulary: report every unknown word
    of the file once, before the model loads (not sample by sample while it runs)."""
    if not prompter.single_token_words:
        return
    vocab = prompter.tok.get_vocab()
    unknown: dict[str, int] = {}
    for d in docs:
        for text in (d["source"], d.get("target") or ""):
            for w in text.split():
                if w not in vocab:
                    unknown.setdefault(w, d["id"])
    if unknown:
        shown = ", ".join(f"{w!r} (document {i})" for w, i in list(unknown.items())[:8])
        raise ValueError(f"{path}: {len(unknown)} word(s) not in the builtin model's vocabulary: {shown}"
                         f"{', ...' if len(unknown) > 8 else ''}")


def _check_positions(prompter, docs: list[dict], path: str, task: str, task_params: dict, length: int,
                     max_pos: int | None) -> None:
    """Count each document's tokens as the task feeds them: a document far longer than --length is an
    error (its rows would be labelled with the wrong length), and so is any position a sample needs
    at or past the model's maximum (RoPE models would run on silently, out of their trained range)."""
    t = tasks.from_params(task, task_params)
    slack = 0 if prompter.single_token_words else max(32, length // 8)  # other tokenizers: counted per word
    for d in docs:
        where = f"{path}: document {d['id']}"
        tokens, need = t.positions(prompter, d)
        if tokens > length + slack:
            raise ValueError(f"{where} has {tokens} tokens, far more than --length {length}: its rows would be "
                             f"labelled with the wrong length (build the data at this length)")
        if max_pos and need > max_pos:
            raise ValueError(f"{where}: {task} needs positions up to {need - 1}, past the model's maximum "
                             f"positions ({max_pos}); use a shorter length, target_offset, n_decode or warmup")


class _PositionGuard:
    """The session as tasks see it, refusing any position at or past the model's maximum (a decoding
    loop may run longer than any pre-check can know)."""

    def __init__(self, session, max_pos: int | None, sample_id: int):
        self._session, self._max, self._id = session, max_pos, sample_id

    def __getattr__(self, name):
        return getattr(self._session, name)

    def feed(self, ids, pos, role, *args, **kwargs):
        if self._max and len(pos) and int(max(pos)) >= self._max:
            raise ValueError(f"sample {self._id}: position {int(max(pos))} is past the model's maximum positions "
                             f"({self._max}); finished samples are kept: rerun with a shorter length or "
                             f"target_offset to resume")
        return self._session.feed(ids, pos, role, *args, **kwargs)


def _check_writable(out: str) -> None:
    """Fail now, naming the output, if its folder cannot take a new file (read-only, no permission);
    nothing is created: the probe goes into the nearest folder that exists and is removed."""
    import tempfile

    d = os.path.dirname(os.path.abspath(out))
    while not os.path.isdir(d) and os.path.dirname(d) != d:
        d = os.path.dirname(d)
    try:
        # named like the output's own temp files, so a probe orphaned by a SIGKILL is swept by its next write
        fd, probe = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(out) + "-", dir=d)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OSError(f"cannot write {out}: {e.strerror or e} ({d})") from None


