"""The tasks an eval job can run on one sample, each returning the task's row fields.

One module per task (translate_stream, translate_batch, ppl, latency), each a dataclass registered
in `base.REGISTRY` whose fields are its parameters (see kvbench.tasks.base); every module of this
package is imported here (pkgutil), so adding a task is adding its file. `TASKS` lists them in table
order; `run_task(name, session, prompter, doc, params)` runs one sample.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, Task, from_params, get, names, ordered, param, register
from .common import document_stream, max_word_tokens
from .ppl import perplexity
from .translation import translate

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

TASKS = names()


def run_task(task: str, session, prompter, doc: dict, params: dict) -> dict:
    """One sample through task `task` with the parameters of its config section (others ignored)."""
    t = from_params(task, params)
    fields = t.run(session, prompter, doc)
    extra = sorted(set(fields) - set(t.columns))
    if extra:
        raise RuntimeError(f"task {task} returned {extra}, which it does not declare in `columns`")
    return fields


__all__ = ["REGISTRY", "TASKS", "Task", "document_stream", "from_params", "get", "max_word_tokens", "names",
           "ordered", "param", "perplexity", "register", "run_task", "translate"]
