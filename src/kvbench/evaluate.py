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
The checks live in kvbench.eval_checks, the sidecar in kvbench.resume; this module is the loop.
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
from .config import check_int, check_name, parse_budget, warn
from .data import read_docs
from .engine.session import Session
from .eval_checks import (  # the checks run before any work
    _check_docs,
    _check_out,
    _check_positions,
    _check_words,
    _check_writable,
    _PositionGuard,
    check_task_params,
)
from .io import sha256_file
from .models import load_model, resolve_device
from .progress import progress
from .resume import _VOLATILE, _finished_row, _open_sidecar, _write_table

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
    pol = check_method(method_type, params, method, b)  # built and validated once for the job
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
        session = Session(model, pol, b, chunk_size, prof, validated=True)
        t0 = time.perf_counter()
        fields = tasks.run_task(task, _PositionGuard(session, max_pos, int(doc["id"])), prompter, doc, task_params)
        wall = time.perf_counter() - t0
        row = dict(base, sample_id=int(doc["id"]), **fields, **session.memory.row(),
                   budget_bytes=session.budget_bytes(b), layout=session.layout(), compute=session.compute(),
                   transient_bytes_peak=session.cache.transient_peak, attention_kernel=session.cache.quant_reader,
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
