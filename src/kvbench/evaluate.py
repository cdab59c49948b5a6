"""One eval job: (model, task, dataset, method, length, budget) -> one Parquet row per sample.

    python -m kvbench eval --model resources/models/tiny --task translate_stream \
        --data resources/data/synth/L1024.jsonl --method h2o --type h2o --param recent_ratio=0.5 \
        --budget 128 --out results/raw/.../L1024_B128.parquet

Everything is checked before the model is loaded: options, names, method fields, the output path
(a new file or a previous result, never a folder or another file), the data (field types; every
word known to a word-level tokenizer; documents built for this --length and no longer), the
positions every sample needs against the model's maximum, the model shape, the head profile, and
that the output folder is writable. Soft problems are warnings (a budget at or above the length, a
task parameter the task ignores). The model load refuses weights that do not match config.json. Finished samples are kept in a sidecar folder
(`<out>.partial/`), so a job killed at sample 97/100 restarts at 97; its `job.json` names the job
(method parameters, budget, model revision, data hash, config hash, ...): a sidecar folder of another
configuration is cleared, and an unreadable sample file is recomputed. The final Parquet is written
atomically and the sidecar removed. Rows carry provenance (versions, git commit, config hash).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pyarrow.parquet as pq
import torch

from . import __version__, schema, tasks
from .config import INT_MAX, check_int, check_name, parse_budget, warn
from .data import read_docs
from .engine.session import Session
from .io import OutputError, check_out_file, sha256_file
from .models import load_model, resolve_device
from .progress import progress

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _write_table(rows: list[dict], path: str) -> None:
    from .io import atomic_path

    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(schema.to_table(rows), tmp)


# provenance that may differ between the run that wrote a sidecar and the run that resumes it
_VOLATILE = ("git_commit", "kvbench_version", "torch_version", "transformers_version")
_SIDECAR_FILE = __import__("re").compile(r"(job\.json|sample_\d+\.parquet|\.tmp-.*)")


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


def _open_sidecar(partial: str, identity: dict, log=None) -> None:
    """Make `<out>.partial/` hold only samples of this very job: a folder made by another job
    (parameters, budget, model revision, data, config hash...) or without its `job.json` is cleared."""
    from .io import atomic_write_text

    ident_path = os.path.join(partial, "job.json")
    if os.path.isdir(partial):
        try:
            with open(ident_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if old != identity:
            if log and os.listdir(partial):
                print(f"{partial}: made by another job configuration (or unreadable): starting over", file=log)
            for n in os.listdir(partial):  # only what kvbench writes there (_check_out refused anything else)
                if _SIDECAR_FILE.fullmatch(n) and os.path.isfile(os.path.join(partial, n)):
                    os.remove(os.path.join(partial, n))
    os.makedirs(partial, exist_ok=True)
    if not os.path.exists(ident_path):
        atomic_write_text(ident_path, json.dumps(identity, sort_keys=True, indent=1))


def _finished_row(path: str, sample_id: int) -> dict | None:
    """The row of a finished sample's sidecar, or None (absent, truncated, corrupt: recompute it)."""
    if not os.path.exists(path):
        return None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception:  # noqa: BLE001 - an unreadable sidecar means "not finished"
        rows = []
    if len(rows) == 1 and rows[0].get("sample_id") == sample_id:
        return rows[0]
    os.remove(path)
    return None


def run_job(job, *, model_dir: str, data: str, out: str, profile: str | None = None,
            max_samples: int | None = None, log=None) -> str:
    """Run one `kvbench.job.Job` (the evaluate rule: `kvbench eval --job`); rows record its hash."""
    return run_eval(model_dir=model_dir, data=data, out=out, profile=profile, max_samples=max_samples, log=log,
                    **job.eval_settings())


def run_eval(*, model_dir: str, task: str, data: str, method: str, method_type: str, params: dict,
             budget, length: int, out: str, model_name: str = "model", dataset: str = "dataset",
             task_params: dict | None = None, seed: int = 0, device: str = "cpu", dtype: str = "float32",
             chunk_size: int = 64, config_hash: str = "", max_samples: int | None = None,
             profile: str | None = None, extrapolate: bool = False, log=None) -> str:
    from types import SimpleNamespace

    from .config import check_geometry, check_method
    from .models import check_device, check_dtype, folder_geometry
    from .prompt import Prompter, is_builtin

    task_params = task_params or {}
    # ---- checks before any work --------------------------------------------------------------
    task_cls = tasks.get(task)  # ValueError naming the registered tasks
    for value, what in ((model_name, "--model-name"), (dataset, "--dataset"), (method, "--method")):
        check_name(value, what)
    check_int(length, "--length", 1)
    check_int(seed, "--seed", 0)
    check_dtype(dtype)
    check_device(device, available=True)
    b = parse_budget(budget)
    pol = check_method(method_type, params, method)
    pol.validate(b)
    if not pol.evicts and b is not None:
        raise ValueError(f"method {method!r} ({method_type}) keeps everything: its budget must be 'full'")
    if pol.evicts and b is None:
        raise ValueError(f"method {method!r} ({method_type}) needs an integer budget, not 'full'")
    if pol.needs_profile and not profile:
        raise ValueError(f"method {method!r} ({method_type}) needs a head profile (--profile results/heads/...)")
    if profile and not pol.needs_profile:
        warn(f"--profile {profile} is ignored: method {method!r} ({method_type}) does not use head profiles")
    if profile and pol.needs_profile and os.path.isdir(profile):
        raise ValueError(f"--profile {profile!r} is a folder, not a head profile Parquet file")
    check_task_params(task_params, task)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    check_int(chunk_size, "chunk_size", 1)
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 (or left out for all documents), got {max_samples}")
    if pol.evicts and b is not None and b >= length:
        warn(f"budget {b} >= length {length}: method {method!r} keeps every token (the row equals the full cache)")
    _check_out(out)
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no model at {model_dir!r} (missing config.json); run build-model first")
    geom = folder_geometry(model_dir)
    model_max = geom["max_positions"]
    # --extrapolate: positions past max_position_embeddings are allowed (RoPE is defined for any
    # position; rows record the largest one given, so a table can tell extrapolated cells apart)
    max_pos = None if extrapolate else model_max
    if max_pos and length > max_pos:
        raise ValueError(f"length {length} is beyond the model's maximum positions ({max_pos}); "
                         f"--extrapolate (config: models/NAME/extrapolate: true) runs past it")
    check_geometry(pol, geom)
    if os.path.isdir(data):
        raise ValueError(f"--data {data!r} is a folder, not a JSONL dataset file")
    docs = read_docs(data)[:max_samples]
    _check_docs(docs, data, length)
    translation = task_cls.translation
    if not os.path.isdir(model_dir):
        raise ValueError(f"--model {model_dir!r} is not a folder")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - a missing or broken tokenizer: name the folder, before the load
        raise ValueError(f"cannot load the tokenizer in {model_dir!r} ({type(e).__name__}: {e})") from None
    if translation:
        no_ref = [d["id"] for d in docs if not str(d.get("target") or "").strip()]
        if no_ref:
            raise ValueError(f"{data}: task {task} needs documents with a reference target; "
                             f"document(s) {no_ref[:5]} have no target")
    # ppl and latency read a translation document as its teacher-forced wait-k stream: the prompt
    # names the languages then too (a chat model's instruction does)
    paired = translation or any(str(d.get("target") or "").strip() for d in docs)
    if paired:
        builtin = SimpleNamespace(builtin=is_builtin(model_dir))
        for pair in sorted({(d.get("src_lang"), d.get("tgt_lang")) for d in docs}, key=str):
            try:
                Prompter.check_pair(builtin, *pair)
            except ValueError as e:
                raise ValueError(f"{data}: {e}") from None
    prompter = Prompter(tok, model_dir, docs[0].get("src_lang") if paired else None, docs[0].get("tgt_lang"))
    _check_words(prompter, docs, data, translation)
    _check_positions(prompter, docs, data, task, task_params, length, max_pos)
    prof = None
    if pol.needs_profile:
        from .profiling import read_profile

        with open(cfg_path, encoding="utf-8") as f:
            mc = json.load(f)
        shape = (mc.get("num_hidden_layers"), mc.get("num_key_value_heads") or mc.get("num_attention_heads"))
        prof = read_profile(profile, shape=shape if None not in shape else None)
    _check_writable(out)

    # ---- work ---------------------------------------------------------------------------------
    torch.manual_seed(seed)
    dev = resolve_device(device)
    model, _, info = load_model(model_dir, dev, dtype)
    if pol.needs_profile:
        prof = read_profile(profile, model)
    base = dict(
        schema_version=schema.SCHEMA_VERSION, model=model_name, model_source=info.get("source"),
        revision=info.get("revision"), task=task, dataset=dataset, method=method, method_type=method_type,
        method_params=pol.params_json(), method_repr=repr(pol), length=length,
        budget="full" if b is None else str(b), budget_tokens=b,
        quality_meaningful=bool(info.get("quality_meaningful", True)), kvbench_version=__version__,
        torch_version=torch.__version__, transformers_version=__import__("transformers").__version__,
        git_commit=git_commit(), config_hash=config_hash, seed=seed, device=dev, dtype=dtype,
    )
    identity = json.loads(json.dumps(dict(
        {k: v for k, v in base.items() if k not in _VOLATILE}, chunk_size=chunk_size,
        task_params=task_params, data_sha256=sha256_file(data)), default=str))
    partial = out + ".partial"
    _open_sidecar(partial, identity, log)
    for doc in progress(docs, desc=f"{task} {method} L{length} B{base['budget']}", file=log):
        done = os.path.join(partial, f"sample_{int(doc['id']):06d}.parquet")
        if _finished_row(done, int(doc["id"])) is not None:
            continue
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        session = Session(model, pol, b, chunk_size, prof)
        t0 = time.perf_counter()
        fields = tasks.run_task(task, _PositionGuard(session, max_pos, int(doc["id"])), prompter, doc, task_params)
        wall = time.perf_counter() - t0
        row = dict(base, sample_id=int(doc["id"]), **fields, **session.memory.row(),
                   budget_bytes=session.budget_bytes(b), layout=session.layout(), compute=session.compute(),
                   tokens_processed=session.tokens, max_position=session.max_position,
                   model_max_positions=model_max, wall_seconds=wall, tokens_per_second=session.tokens / wall,
                   device_peak_bytes=int(torch.cuda.max_memory_allocated()) if dev == "cuda" else None)
        _write_table([row], done)
    rows = []  # read back from the sidecars, so resumed and uninterrupted runs write the same values
    for doc in sorted(docs, key=lambda d: int(d["id"])):
        rows += pq.read_table(os.path.join(partial, f"sample_{int(doc['id']):06d}.parquet")).to_pylist()
    _write_table(rows, out)
    shutil.rmtree(partial, ignore_errors=True)
    return out
