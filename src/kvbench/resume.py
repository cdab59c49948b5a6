"""Resume: an eval job keeps each finished sample in `<out>.partial/` (one Parquet row per sample, and
`job.json` naming the job), so a killed job restarts at its first unfinished sample; a folder made by
another job configuration is cleared, an unreadable sample file recomputed."""

from __future__ import annotations

import json
import os
import re

import pyarrow.parquet as pq

from . import schema


def _write_table(rows: list[dict], path: str) -> None:
    from .io import atomic_path

    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(schema.to_table(rows), tmp)


# provenance that may differ between the run that wrote a sidecar and the run that resumes it
_VOLATILE = ("git_commit", "kvbench_version", "torch_version", "transformers_version")
_SIDECAR_FILE = re.compile(r"(job\.json|sample_\d+\.parquet|\.tmp-.*)")


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


