"""One eval job: (model, task, dataset, method, length, budget) -> one Parquet row per sample.

    python -m kvbench eval --model resources/models/tiny --task translate_stream \
        --data resources/data/synth/L1024.jsonl --method h2o --type h2o --param recent_ratio=0.5 \
        --budget 128 --out results/raw/.../L1024_B128.parquet

Everything is checked before the model is loaded (options, method fields, data, model shape, head
profile, that the output folder is writable). Finished samples are kept in a sidecar folder
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
from tqdm import tqdm

from . import __version__, schema, tasks
from .config import parse_budget  # noqa: F401  (kvbench.evaluate.parse_budget, as before)
from .data import read_docs
from .engine.session import Session
from .models import load_model, resolve_device

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


TASK_PARAMS = {"wait_k": 1, "target_offset": 0, "n_decode": 1, "warmup": 0}  # key -> minimum (integers)
# provenance that may differ between the run that wrote a sidecar and the run that resumes it
_VOLATILE = ("git_commit", "kvbench_version", "torch_version", "transformers_version")


def check_task_params(task_params: dict) -> None:
    for k, v in task_params.items():
        if k not in TASK_PARAMS:
            raise ValueError(f"unknown task parameter {k!r}; known: {sorted(TASK_PARAMS)}")
        if not isinstance(v, int) or isinstance(v, bool) or v < TASK_PARAMS[k]:
            raise ValueError(f"task parameter {k} must be an integer >= {TASK_PARAMS[k]}, got {v!r}")


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


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
            shutil.rmtree(partial)
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


def run_eval(*, model_dir: str, task: str, data: str, method: str, method_type: str, params: dict,
             budget, length: int, out: str, model_name: str = "model", dataset: str = "dataset",
             task_params: dict | None = None, seed: int = 0, device: str = "cpu", dtype: str = "float32",
             chunk_size: int = 64, config_hash: str = "", max_samples: int | None = None,
             profile: str | None = None, log=None) -> str:
    from types import SimpleNamespace

    from .config import check_geometry, check_method
    from .models import check_device, check_dtype, folder_geometry
    from .prompt import Prompter, is_builtin

    task_params = task_params or {}
    # ---- checks before any work --------------------------------------------------------------
    if task not in tasks.TASKS:
        raise ValueError(f"unknown task {task!r}; known: {list(tasks.TASKS)}")
    check_dtype(dtype)
    check_device(device)
    b = parse_budget(budget)
    pol = check_method(method_type, params, method)
    pol.validate(b)
    if not pol.evicts and b is not None:
        raise ValueError(f"method {method!r} ({method_type}) keeps everything: its budget must be 'full'")
    if pol.evicts and b is None:
        raise ValueError(f"method {method!r} ({method_type}) needs an integer budget, not 'full'")
    if pol.needs_profile and not profile:
        raise ValueError(f"method {method!r} ({method_type}) needs a head profile (--profile results/heads/...)")
    check_task_params(task_params)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 (or left out for all documents), got {max_samples}")
    docs = read_docs(data)[:max_samples]
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no model at {model_dir!r} (missing config.json); run build-model first")
    geom = folder_geometry(model_dir)
    max_pos = geom["max_positions"]
    if max_pos and length > max_pos:
        raise ValueError(f"length {length} is beyond the model's maximum positions ({max_pos})")
    check_geometry(pol, geom)
    translation = task.startswith("translate")
    if translation:
        no_ref = [d["id"] for d in docs if not str(d.get("target") or "").strip()]
        if no_ref:
            raise ValueError(f"{data}: task {task} needs documents with a reference target; "
                             f"document(s) {no_ref[:5]} have no target")
        builtin = SimpleNamespace(builtin=is_builtin(model_dir))
        for pair in sorted({(d.get("src_lang"), d.get("tgt_lang")) for d in docs}, key=str):
            try:
                Prompter.check_pair(builtin, *pair)
            except ValueError as e:
                raise ValueError(f"{data}: {e}") from None
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
    model, tok, info = load_model(model_dir, dev, dtype)
    if pol.needs_profile:
        prof = read_profile(profile, model)
    prompter = Prompter(tok, model_dir, docs[0].get("src_lang") if translation else None,
                        docs[0].get("tgt_lang"))
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
        task_params=task_params, data_sha256=_sha256(data)), default=str))
    partial = out + ".partial"
    _open_sidecar(partial, identity, log)
    for doc in tqdm(docs, desc=f"{task} {method} L{length} B{base['budget']}", file=log, mininterval=5):
        done = os.path.join(partial, f"sample_{int(doc['id']):06d}.parquet")
        if _finished_row(done, int(doc["id"])) is not None:
            continue
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        session = Session(model, pol, b, chunk_size, prof)
        t0 = time.perf_counter()
        fields = tasks.run_task(task, session, prompter, doc, task_params)
        wall = time.perf_counter() - t0
        row = dict(base, sample_id=int(doc["id"]), **fields, **session.memory.row(),
                   budget_bytes=session.budget_bytes(b), layout=session.layout(), compute=session.compute(),
                   tokens_processed=session.tokens, wall_seconds=wall, tokens_per_second=session.tokens / wall,
                   device_peak_bytes=int(torch.cuda.max_memory_allocated()) if dev == "cuda" else None)
        _write_table([row], done)
    rows = []  # read back from the sidecars, so resumed and uninterrupted runs write the same values
    for doc in sorted(docs, key=lambda d: int(d["id"])):
        rows += pq.read_table(os.path.join(partial, f"sample_{int(doc['id']):06d}.parquet")).to_pylist()
    _write_table(rows, out)
    shutil.rmtree(partial, ignore_errors=True)
    return out
