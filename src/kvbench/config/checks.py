"""Cross-checks a schema cannot make, on a schema-valid config with defaults filled in: method
parameters against their dataclasses (every defined method, used or not); model sources and dataset
entries (kvbench.config.sources); task parameters against the models' positions; and per study,
that every name it uses exists, budgets fit its methods, lengths fit its models. Soft problems are
one-line warnings (`warn`)."""

from __future__ import annotations

from .base import MAX_PROMPTS, MAX_SAMPLES, ConfigError, parse_budget, warn
from .jobs import study_jobs
from .method_checks import check_geometry, check_method
from .sources import check_datasets, check_models, check_synthetic_lengths

HF_ONLY = ("path", "name", "split", "data_files", "src_lang", "tgt_lang", "text_field")


def warn_task_params(cfg: dict) -> None:
    """Parameters a task section names that its task does not read (run on the keys the user wrote)."""
    from ..tasks.base import fields

    for task, params in (cfg.get("tasks") or {}).items():
        reads = fields(task)
        unused = [k for k in params or {} if k not in reads]
        if unused:
            warn(f"config key 'tasks/{task}': {task} does not use {', '.join(unused)} (it reads "
                 f"{', '.join(reads)})")


def check_semantics(cfg: dict) -> None:
    pols = _check_methods(cfg)
    geoms = check_models(cfg)
    check_datasets(cfg)
    _check_dataset_entries(cfg)
    if cfg.get("device") == "cuda":
        import torch

        if not torch.cuda.is_available():
            warn("config key 'device': cuda, but this machine has no CUDA device: jobs run here will fail "
                 "(fine if they run on GPU nodes; `device: auto` uses CUDA where there is one)")
    n_prompts = (cfg.get("profiling") or {}).get("n_prompts", 8)
    if n_prompts > MAX_PROMPTS:
        raise ConfigError(f"config key 'profiling/n_prompts': {n_prompts} probe prompts is more than {MAX_PROMPTS}")
    _check_task_positions(cfg, geoms)
    for sname, st in cfg["studies"].items():
        _check_study(cfg, sname, st, pols, geoms)


def _check_methods(cfg: dict) -> dict:
    pols = {}
    for name, m in cfg["methods"].items():  # every defined method, used by a study or not
        try:
            pols[name] = check_method(m["type"], {k: v for k, v in m.items() if k != "type"}, name)
        except ValueError as e:
            raise ConfigError(f"config key 'methods/{name}': {e}") from None
    return pols


BENCHMARK_KEYS = ("path", "split", "data_files")  # what a long-context benchmark source reads besides `subset`


def _check_dataset_entries(cfg: dict) -> None:
    from ..data import BENCHMARKS

    for name, ds in cfg["datasets"].items():
        src = ds.get("source", "synthetic")
        reads = HF_ONLY if src == "hf" else BENCHMARK_KEYS + ("subset",) if src in BENCHMARKS else ()
        unused = [k for k in HF_ONLY + ("subset",) if k in ds and k not in reads]
        if unused:
            warn(f"config key 'datasets/{name}': a {src} dataset ignores {', '.join(unused)}")
        if src in BENCHMARKS:
            _check_subset(name, src, ds.get("subset"))
        if ds.get("n_samples", 4) > MAX_SAMPLES:
            raise ConfigError(f"config key 'datasets/{name}/n_samples': {ds['n_samples']} documents per cell is "
                              f"more than {MAX_SAMPLES}")


def _check_subset(name: str, src: str, subset) -> None:
    """A long-context benchmark's subset is one whose official metric kvbench has (no download)."""
    from ..longctx import loaders

    if not subset:
        raise ConfigError(f"config key 'datasets/{name}/subset': a {src} dataset needs the benchmark's subset "
                          f"(e.g. hotpotqa)")
    known = {"longbench": loaders.LONGBENCH_METRICS, "infinitebench": loaders.INFINITEBENCH_METRICS,
             "loogle": loaders.LOOGLE_METRICS}[src]
    base = subset[:-2] if src == "longbench" and subset.endswith("_e") else subset
    if base not in known:
        raise ConfigError(f"config key 'datasets/{name}/subset': {src} subset {subset!r} is not supported (no "
                          f"official metric in kvbench.longctx.scoring, or unknown); supported: {sorted(known)}")


def _check_task_positions(cfg: dict, geoms: dict) -> None:
    """Positions a task adds after the document (latency's decode steps) stay within every model's."""
    from ..tasks import from_params

    for task, params in (cfg.get("tasks") or {}).items():
        t = from_params(task, params)
        steps = t.extra_positions()
        for model, g in geoms.items():
            mp = (g or {}).get("max_positions")
            if mp and steps >= mp:
                raise ConfigError(f"config key 'tasks/{task}': {' + '.join(t.extra_positions_from)} ({steps}) decode "
                                  f"steps run past the maximum positions of model {model!r} ({mp})")


def _check_study(cfg: dict, sname: str, st: dict, pols: dict, geoms: dict) -> None:
    _check_study_names(cfg, sname, st)
    _check_study_methods(sname, st, pols, geoms)
    for model in st["models"]:
        g = geoms.get(model) or {}
        too_long = [L for L in st["lengths"] if g.get("max_positions") and L > g["max_positions"]]
        if too_long and not cfg["models"][model].get("extrapolate"):
            raise ConfigError(f"config key 'studies/{sname}/lengths': length {too_long[0]} is beyond the maximum "
                              f"positions of model {model!r} ({g['max_positions']}); to run past them on "
                              f"purpose, set models/{model}/extrapolate: true")
    for ds in st["datasets"]:
        check_synthetic_lengths(cfg, sname, ds, st["lengths"])
    _check_target_offsets(cfg, sname, st, geoms)
    evicting = [m for m in st["methods"] if pols[m].evicts]
    for b in st["budgets"]:
        low = [L for L in st["lengths"] if parse_budget(b) is not None and parse_budget(b) >= L]
        if evicting and low:
            warn(f"config key 'studies/{sname}/budgets': budget {b} >= length {min(low)}: "
                 f"{', '.join(evicting)} keep every token there (those cells equal the full cache)")
    if not study_jobs(cfg, st):
        warn(f"config key 'studies/{sname}': it plans no job (no dataset of "
             f"{st['datasets']} offers tasks {st['tasks']}, or an empty list)")


def _check_study_names(cfg: dict, sname: str, st: dict) -> None:
    """Lists without repeats; every model, dataset and method named is defined (models and datasets
    default to all); budgets default to ['full'] and parse."""
    for key in ("tasks", "models", "datasets", "methods", "lengths", "budgets"):
        twice = sorted({str(x) for x in st.get(key) or [] if (st.get(key) or []).count(x) > 1})
        if twice:
            warn(f"config key 'studies/{sname}/{key}': {', '.join(twice)} listed more than once")
    for key, pool in (("models", cfg["models"]), ("datasets", cfg["datasets"]), ("methods", cfg["methods"])):
        st.setdefault(key, sorted(pool)) if key != "methods" else None
        unknown = [x for x in st.get(key, []) if x not in pool]
        if unknown:
            raise ConfigError(f"config key 'studies/{sname}/{key}': unknown {key} {unknown}; defined: {sorted(pool)}")
    st.setdefault("budgets", ["full"])
    for b in st["budgets"]:
        parse_budget(b)


def _check_study_methods(sname: str, st: dict, pols: dict, geoms: dict) -> None:
    """Each method fits each budget of the study and each model's shape."""
    for mname in st["methods"]:
        pol = pols[mname]
        for b in st["budgets"]:
            bb = parse_budget(b)
            if pol.evicts and bb is not None:
                try:
                    pol.validate(bb)
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"config key 'studies/{sname}': method {mname!r} at budget {b}: {e}") from None
        if pol.evicts and all(parse_budget(b) is None for b in st["budgets"]):
            raise ConfigError(f"config key 'studies/{sname}/budgets': method {mname!r} needs integer budgets")
        for model in st["models"]:
            try:
                check_geometry(pol, geoms.get(model))
            except ValueError as e:
                raise ConfigError(f"config key 'methods/{mname}': method {mname!r} with model {model!r}: {e}") from None


def _check_target_offsets(cfg: dict, sname: str, st: dict, geoms: dict) -> None:
    """Target tokens take positions target_offset, target_offset + 1, ...: a document of L tokens needs
    target_offset + L <= the model's maximum positions (translation documents: every task reads them)."""
    for task in st["tasks"]:
        off = (cfg.get("tasks") or {}).get(task, {}).get("target_offset", 0)
        if not off:
            continue
        for model in st["models"]:
            mp = (geoms.get(model) or {}).get("max_positions")
            if mp and off + max(st["lengths"]) > mp and not cfg["models"][model].get("extrapolate"):
                raise ConfigError(f"config key 'tasks/{task}/target_offset': {off} + length {max(st['lengths'])} "
                                  f"(study {sname!r}) is past the maximum positions of model {model!r} ({mp})")
