"""Task registry: a task is a frozen dataclass registered by name; its fields are its parameters.

A field's default and minimum are written once, here in the class (`param`); the config schema
(`kvbench.schemagen`), the config checks, `kvbench eval` and the README read them from the class.
Class attributes say what the rest of the pipeline needs to know, so nothing branches on task names:

- `name`, `order` (position in tables), `summary` (one line for --help);
- `translation`: reads documents with a reference target and a language pair; its cells are corpus
  BLEU/chrF with the paired tests against `full`;
- `kinds`: the dataset kinds it runs on by default (`parallel`: translation pairs, synthetic
  included; `text`: plain text such as WikiText or PG19; `haystack`: the generated filler documents of
  a `source: haystack` dataset, which the long-context tasks build their samples from; `longbench`,
  `infinitebench`, `loogle`: the samples of that benchmark's datasets);
- `columns`: the row columns `run` fills (each one a column of kvbench.schema);
- `extra_positions_from`: parameters that add positions after the document (latency's decode steps);
- `reads_context`, `answer_tokens`: a long context read, then a short answer (GPU-hour estimates).

Task parameters form one namespace: a config's `tasks.NAME` section may name the parameter of any
task (a task ignores, with a warning, those it does not read), so a name declared by two tasks must
mean the same thing, with the same default and minimum (checked at registration).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

REGISTRY: dict[str, type[Task]] = {}
KINDS = ("parallel", "text", "haystack", "longbench", "infinitebench", "loogle")


def param(default, *, minimum: int | None = None, help: str = "", filled: bool = False):
    """A task parameter. `filled`: the schema fills this default into every task section a config
    writes. It is true only for the four parameters of the first schema (wait_k, target_offset,
    n_decode, warmup), whose filled values are part of existing jobs' hashes; a new parameter keeps
    it false (method parameters work the same way), so adding one never changes an existing hash."""
    return dataclasses.field(default=default, metadata={"minimum": minimum, "help": help, "filled": filled})


@dataclass(frozen=True)
class Task:
    name: ClassVar[str] = ""
    order: ClassVar[int] = 100
    summary: ClassVar[str] = ""
    translation: ClassVar[bool] = False
    kinds: ClassVar[tuple[str, ...]] = ("parallel", "text")
    builtin: ClassVar[bool] = True  # runs on the builtin model (False: needs a hub model's tokenizer)
    columns: ClassVar[tuple[str, ...]] = ()
    extra_positions_from: ClassVar[tuple[str, ...]] = ()
    # a long context read, then a short answer (niah, ruler, the benchmarks): `full` prefills it in chunks,
    # evicting methods read it token by token; about `answer_tokens` are generated (kvbench.estimate)
    reads_context: ClassVar[bool] = False
    answer_tokens: ClassVar[int] = 0

    # ---- running one sample ------------------------------------------------------------------------
    def run(self, session, prompter, doc: dict) -> dict:
        """The row fields of one sample (a subset of `columns`)."""
        raise NotImplementedError

    def positions(self, prompter, doc: dict) -> tuple[int, int]:
        """(tokens the task feeds for this document, positions it needs): checked before the model loads."""
        raise NotImplementedError

    def extra_positions(self) -> int:
        return sum(int(getattr(self, k)) for k in self.extra_positions_from)

    # ---- aggregation: one cell = the rows of one (model, task, dataset, method, length, budget) ------
    def cell(self, g) -> dict:
        """The task's scores of one cell (g: a pandas DataFrame of its rows)."""
        return {}

    def cell_ci(self, g, n_resamples: int, seed: int) -> dict:
        """Bootstrap 95% CIs of the cell's scores (n_resamples >= 1)."""
        return {}

    def versus_full(self, g, full, n_resamples: int, seed: int) -> dict:
        """Paired tests of a compressed cell against the `full` cell of the same samples."""
        return {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: add a task; its parameters must agree with same-named ones of other tasks."""
    if not cls.name:
        raise TypeError(f"{cls.__name__}: a task needs a name")
    bad = [k for k in cls.kinds if k not in KINDS]
    if bad:
        raise TypeError(f"task {cls.name}: unknown dataset kinds {bad}; known: {list(KINDS)}")
    known = parameters()
    for f in dataclasses.fields(cls):
        if f.name in known and _spec(known[f.name]) != _spec(f):
            raise TypeError(f"task {cls.name}: parameter {f.name} differs from the one other tasks declare "
                            f"(type, default, minimum, filled); task parameters form one namespace")
    REGISTRY[cls.name] = cls
    return cls


def _spec(f: dataclasses.Field) -> tuple:
    return (str(f.type), f.default, f.metadata.get("minimum"), f.metadata.get("filled"))


def ordered() -> list[type[Task]]:
    """Registered tasks in table order."""
    return sorted(REGISTRY.values(), key=lambda c: (c.order, c.name))


def names() -> tuple[str, ...]:
    return tuple(c.name for c in ordered())


def get(name: str) -> type[Task]:
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; known: {list(names())}")
    return REGISTRY[name]


def fields(name: str) -> tuple[str, ...]:
    """The parameters a task reads."""
    return tuple(f.name for f in dataclasses.fields(get(name)))


def parameters() -> dict[str, dataclasses.Field]:
    """Every task parameter (the union over tasks, in table order), name -> its field."""
    out: dict[str, dataclasses.Field] = {}
    for cls in ordered():
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, f)
    return out


def readers(param_name: str) -> list[str]:
    """Tasks that read a parameter."""
    return [c.name for c in ordered() if param_name in {f.name for f in dataclasses.fields(c)}]


def from_params(name: str, params: dict) -> Task:
    """The task with its parameters from a config section (keys of other tasks are ignored)."""
    cls = get(name)
    own = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (params or {}).items() if k in own})


def defaults_for_kind(kind: str) -> list[str]:
    """Tasks a dataset of this kind offers when its config entry lists none."""
    return [c.name for c in ordered() if kind in c.kinds]
