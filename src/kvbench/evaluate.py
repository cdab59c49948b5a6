"""One eval job: (model, task, dataset, method, length, budget) -> one Parquet row per sample.

    python -m kvbench eval --model resources/models/tiny --task translate_stream \
        --data resources/data/synth/L1024.jsonl --method h2o --type h2o --param recent_ratio=0.5 \
        --budget 128 --out results/raw/.../L1024_B128.parquet

Everything is checked before the model is loaded. Finished samples are kept in a sidecar folder
(`<out>.partial/`), so a job killed at sample 97/100 restarts at 97; the final Parquet is written
atomically and the sidecar removed. Rows carry provenance (versions, git commit, config hash).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import time

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from . import __version__, schema, tasks
from .data import read_docs
from .engine.session import Session
from .methods import method_from_config
from .models import load_model, resolve_device
from .prompt import Prompter

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_budget(budget: str | int | None) -> int | None:
    if budget in (None, "full"):
        return None
    try:
        b = int(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a positive integer or 'full', got {budget!r}") from None
    if b <= 0 or str(b) != str(budget).strip():
        raise ValueError(f"budget must be a positive integer or 'full', got {budget!r}")
    return b


def _write_table(rows: list[dict], path: str) -> None:
    from .io import atomic_path

    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(schema.to_table(rows), tmp)


def run_eval(*, model_dir: str, task: str, data: str, method: str, method_type: str, params: dict,
             budget, length: int, out: str, model_name: str = "model", dataset: str = "dataset",
             task_params: dict | None = None, seed: int = 0, device: str = "cpu", dtype: str = "float32",
             chunk_size: int = 64, config_hash: str = "", max_samples: int | None = None,
             profile: str | None = None, log=None) -> str:
    task_params = task_params or {}
    # ---- checks before any work --------------------------------------------------------------
    if task not in tasks.TASKS:
        raise ValueError(f"unknown task {task!r}; known: {list(tasks.TASKS)}")
    b = parse_budget(budget)
    pol = method_from_config(method_type, params)
    pol.validate(b)
    if not pol.evicts and b is not None:
        raise ValueError(f"method {method!r} ({method_type}) keeps everything: its budget must be 'full'")
    if pol.evicts and b is None:
        raise ValueError(f"method {method!r} ({method_type}) needs an integer budget, not 'full'")
    if pol.needs_profile and not profile:
        raise ValueError(f"method {method!r} ({method_type}) needs a head profile (--profile results/heads/...)")
    if int(task_params.get("wait_k", 5)) < 1:
        raise ValueError(f"wait_k must be >= 1, got {task_params.get('wait_k')}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    docs = read_docs(data)[:max_samples]
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no model at {model_dir!r} (missing config.json); run build-model first")
    with open(cfg_path) as f:
        mcfg = json.load(f)
    max_pos = mcfg.get("max_position_embeddings")
    if max_pos and length > max_pos:
        raise ValueError(f"length {length} is beyond the model's maximum positions ({max_pos})")
    if task.startswith("translate") and not docs[0].get("target"):
        raise ValueError(f"{data}: task {task} needs documents with a reference target")
    if os.path.exists(out) and not os.access(os.path.dirname(os.path.abspath(out)), os.W_OK):
        raise PermissionError(f"results directory of {out} is not writable")

    # ---- work ---------------------------------------------------------------------------------
    torch.manual_seed(seed)
    dev = resolve_device(device)
    model, tok, info = load_model(model_dir, dev, dtype)
    prof = None
    if pol.needs_profile:
        from .profiling import read_profile

        prof = read_profile(profile, model)
    prompter = Prompter(tok, model_dir, docs[0].get("src_lang") if task.startswith("translate") else None,
                        docs[0].get("tgt_lang"))
    partial = out + ".partial"
    os.makedirs(partial, exist_ok=True)
    base = dict(
        schema_version=schema.SCHEMA_VERSION, model=model_name, model_source=info.get("source"),
        revision=info.get("revision"), task=task, dataset=dataset, method=method, method_type=method_type,
        method_params=pol.params_json(), method_repr=repr(pol), length=length,
        budget="full" if b is None else str(b), budget_tokens=b,
        quality_meaningful=bool(info.get("quality_meaningful", True)), kvbench_version=__version__,
        torch_version=torch.__version__, transformers_version=__import__("transformers").__version__,
        git_commit=git_commit(), config_hash=config_hash, seed=seed, device=dev, dtype=dtype,
    )
    for doc in tqdm(docs, desc=f"{task} {method} L{length} B{base['budget']}", file=log, mininterval=5):
        done = os.path.join(partial, f"sample_{int(doc['id']):06d}.parquet")
        if os.path.exists(done):
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
    rows = []
    for p in sorted(glob.glob(os.path.join(partial, "sample_*.parquet"))):
        rows += pq.read_table(p).to_pylist()
    _write_table(rows, out)
    shutil.rmtree(partial, ignore_errors=True)
    return out

