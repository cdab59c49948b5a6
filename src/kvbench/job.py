"""One eval job: the value that travels config -> rule -> CLI -> session -> row.

A `Job` names its cell (model, task, dataset, method variant, length, `Budget`) and carries the slice
of the config it depends on (`job_config`): seed, device, dtype, chunk size, and the entries of its
model, dataset, method and task. It knows its result path, its hash (the row's `config_hash`, so
editing an unrelated study never re-runs a finished job) and its JSON form, which is what the
evaluate rule hands to `kvbench eval --job`. The budget is parsed here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

INT_MAX = 2**31 - 1  # every integer in a config or on a command line (seeds, budgets, lengths, counts)


@dataclass(frozen=True)
class Budget:
    """KV budget in full-precision tokens per (layer, KV head); `tokens` None is the full cache."""

    tokens: int | None = None

    @classmethod
    def parse(cls, value) -> Budget:
        """'full' (or None) -> the full cache; a positive integer or its exact text -> that budget;
        anything else: ValueError naming the value."""
        if isinstance(value, Budget):
            return value
        if value in (None, "full"):
            return cls(None)
        bad = ValueError(f"budget must be a positive integer or 'full', got {value!r}")
        if isinstance(value, (bool, float)):
            raise bad
        try:
            b = int(value)
        except (TypeError, ValueError):
            raise bad from None
        if b <= 0 or str(b) != str(value).strip():
            raise bad
        if b > INT_MAX:
            raise ValueError(f"budget must be at most {INT_MAX} tokens, got {value!r}")
        return cls(b)

    @property
    def is_full(self) -> bool:
        return self.tokens is None

    def __str__(self) -> str:  # the path component and the row's `budget`
        return "full" if self.tokens is None else str(self.tokens)


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def job_config(cfg: dict, model: str, task: str, dataset: str, method: str) -> dict:
    """The part of a (validated) config one eval job depends on."""
    keys = ("seed", "device", "dtype", "chunk_size")
    return dict(
        {k: cfg.get(k) for k in keys}, model=cfg["models"][model], dataset=cfg["datasets"][dataset],
        method=cfg["methods"][method], task=cfg.get("tasks", {}).get(task, {}),
    )


@dataclass(frozen=True)
class Job:
    model: str
    task: str
    dataset: str
    method: str
    length: int
    budget: Budget
    config: dict = field(default_factory=dict, compare=False, hash=False, repr=False)  # job_config

    def __post_init__(self):
        object.__setattr__(self, "budget", Budget.parse(self.budget))

    @classmethod
    def from_config(cls, cfg: dict, model: str, task: str, dataset: str, method: str, length: int,
                    budget) -> Job:
        return cls(model, task, dataset, method, int(length), Budget.parse(budget),
                   job_config(cfg, model, task, dataset, method))

    @property
    def path(self) -> str:
        """Result file under results/raw/."""
        return f"{self.model}/{self.task}/{self.dataset}/{self.method}/L{self.length}_B{self.budget}.parquet"

    @property
    def hash(self) -> str:
        return config_hash(self.config)

    # ---- what the eval needs, read from the job's config slice -----------------------------------
    @property
    def method_type(self) -> str:
        return self.config["method"]["type"]

    @property
    def method_params(self) -> dict:
        return {k: v for k, v in self.config["method"].items() if k != "type"}

    @property
    def task_params(self) -> dict:
        return dict(self.config.get("task") or {})

    def eval_settings(self) -> dict:
        """run_eval's keyword arguments for this job (all but the files)."""
        c = self.config
        return dict(
            model_name=self.model, task=self.task, dataset=self.dataset, method=self.method,
            method_type=self.method_type, params=self.method_params, task_params=self.task_params,
            length=self.length, budget=self.budget, seed=c.get("seed", 0), device=c.get("device", "auto"),
            dtype=c.get("dtype", "float32"), chunk_size=c.get("chunk_size", 64), config_hash=self.hash,
            extrapolate=bool((c.get("model") or {}).get("extrapolate", False)),
        )

    # ---- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dict(model=self.model, task=self.task, dataset=self.dataset, method=self.method,
                               length=self.length, budget=str(self.budget), config=self.config), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Job:
        """A job from its JSON text, or from a file holding it."""
        if not text.lstrip().startswith("{") and os.path.isfile(text):
            with open(text, encoding="utf-8") as f:
                text = f.read()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--job: not a job's JSON nor a file holding one ({e})") from None
        keys = ("model", "task", "dataset", "method", "length", "budget", "config")
        missing = [k for k in keys if k not in d] if isinstance(d, dict) else list(keys)
        if missing:
            raise ValueError(f"--job: missing {', '.join(missing)}")
        extra = sorted(set(d) - set(keys))
        if extra:
            raise ValueError(f"--job: unknown keys {extra}")
        if not isinstance(d["config"], dict) or "method" not in d["config"]:
            raise ValueError("--job: config must be the job's config slice (seed, device, dtype, chunk_size, "
                             "model, dataset, method, task)")
        if not isinstance(d["length"], int) or isinstance(d["length"], bool):
            raise ValueError(f"--job: length must be an integer, got {d['length']!r}")
        return cls(d["model"], d["task"], d["dataset"], d["method"], d["length"], Budget.parse(d["budget"]),
                   d["config"])
