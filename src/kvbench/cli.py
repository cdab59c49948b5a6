"""Command line: `python -m kvbench <command> --help`. Each command is what one Snakemake rule calls.

    build-model SOURCE --out DIR     builtin:/path:/hub:/random: -> a HF folder
    make-data   --config C --dataset NAME --length L --out FILE
    profile     --model DIR --out results/heads/MODEL.parquet
    eval        --model DIR --task T --data FILE --method NAME ... --out FILE.parquet
    aggregate   --config C --raw FILES... --out results
    methods     list registered methods with their fields, defaults and allowed values
    validate    check a config file and print the job count

Every command checks its inputs before it does any work and fails with one line naming the bad
option, key, file or value (KVBENCH_TRACEBACK=1 shows the traceback instead); soft problems are
one-line warnings on stderr. No command replaces anything but its own kind of output: `--out` may
be new or a previous output of the same command, never another folder or file. Ctrl-C ends with
"interrupted; rerun to resume" (eval keeps finished samples; Snakemake: `snakemake --unlock`, then
rerun).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

INT_MAX = 2**31 - 1  # kvbench.config.INT_MAX (not imported: `--help` stays import-light)


EXTRAPOLATE_HELP = ("allow lengths and positions past the model's max_position_embeddings (RoPE is defined for any "
                    "position; each row records max_position, the largest one given; config: models/NAME/extrapolate)")

def _int(minimum: int | None = None, maximum: int = INT_MAX, key: str = ""):
    """argparse type: an integer in [minimum, maximum] (argparse names the option when it fails;
    `key` names the config key it stands for)."""
    name = f"{key} " if key else ""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}expected an integer, got {text!r}") from None
        if minimum is not None and v < minimum:
            raise argparse.ArgumentTypeError(f"{name}must be >= {minimum}, got {v}")
        if v > maximum:
            raise argparse.ArgumentTypeError(f"{name}must be at most {maximum}, got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def _kv(items: list[str], option: str = "--param") -> dict:
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise SystemExit(f"{option} expects key=value, got {it!r}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _json_object(option: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{option}: not valid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option}: expected a JSON object {{...}}, got {text!r}")
    return value


def _merge(json_option: str, from_json: dict, kv_option: str, from_kv: dict) -> dict:
    """--param/--task-param win over the JSON object; a value they change is a warning, not silent."""
    from .config import warn

    for k, v in from_kv.items():
        if k in from_json and from_json[k] != v:
            warn(f"{kv_option} {k}={json.dumps(v)} overrides {k}={json.dumps(from_json[k])} from {json_option}")
    return {**from_json, **from_kv}


def _is_data_file(path: str) -> bool:
    """A JSONL dataset written by make-data (its first line is a document with an id and a source)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        d = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "id" in d and "source" in d


def _is_profile_file(path: str) -> bool:
    """A head profile written by `kvbench profile` (its Parquet metadata carries kvbench_profile)."""
    try:
        import pyarrow.parquet as pq

        return b"kvbench_profile" in (pq.read_schema(path).metadata or {})
    except Exception:  # noqa: BLE001 - unreadable: not ours
        return False


def _check_model_dir(model: str, option: str = "--model") -> None:
    if not os.path.isdir(model):
        raise ValueError(f"{option} {model!r}: no such model folder; run build-model first")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"{option} {model!r}: no config.json there (not a model folder); run build-model first")


def cmd_build_model(a) -> None:
    from .models import build_model

    info = build_model(a.source, a.out, seed=a.seed, steps=a.steps, log=sys.stderr, retrain=a.train)
    print(json.dumps(info, indent=2, default=str))


def cmd_make_data(a) -> None:
    from .config import MAX_SAMPLES, _check_values, check_int, load_config
    from .data import make_data
    from .io import OutputError, check_out_file

    check_out_file(a.out, _is_data_file, "dataset (JSONL written by make-data)")
    if not a.out.endswith(".jsonl"):
        raise OutputError(f"--out {a.out!r}: documents are written as JSONL: give a name ending in .jsonl")
    if a.dataset_json:
        ds, seed = _json_object("--dataset-json", a.dataset_json), a.seed or 0
    else:
        if not (a.config and a.dataset):
            raise ValueError("give --config and --dataset (or --dataset-json)")
        cfg = load_config(a.config)
        if a.dataset not in cfg["datasets"]:
            raise SystemExit(f"dataset {a.dataset!r} is not in {a.config} (has: {sorted(cfg['datasets'])})")
        ds, seed = cfg["datasets"][a.dataset], cfg.get("seed", 0) if a.seed is None else a.seed
    if not isinstance(ds, dict):
        raise ValueError(f"the dataset entry must be a mapping, got {ds!r}")
    _check_values(ds, "dataset")
    n_samples = check_int(ds.get("n_samples", 4), "n_samples", 1, MAX_SAMPLES)
    tok, max_pos = None, None
    if a.model:
        from .models import folder_geometry

        _check_model_dir(a.model)
        max_pos = folder_geometry(a.model)["max_positions"]
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(a.model)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot load the tokenizer in {a.model!r} ({type(e).__name__}: {e})") from None
    n = make_data(ds, a.length, n_samples, seed, a.out, tokenizer=tok,
                  max_positions=None if a.extrapolate else max_pos)
    print(f"wrote {n} documents to {a.out}")


# eval's per-field options and their defaults (None: required without --job)
EVAL_FIELDS = {"model_name": "model", "task": None, "dataset": "dataset", "method": None, "type": "",
               "param": [], "params_json": "{}", "task_param": [], "task_params_json": "{}", "budget": "full",
               "length": None, "seed": 0, "device": "auto", "dtype": "float32", "chunk_size": 64, "config_hash": "",
               "extrapolate": False}


def cmd_eval(a) -> None:
    from .evaluate import run_eval, run_job

    given = [k for k in EVAL_FIELDS if getattr(a, k) is not None]
    if a.job:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"--job carries every setting of the job: drop {flags} (or drop --job)")
        from .job import Job

        run_job(Job.from_json(a.job), model_dir=a.model, data=a.data, out=a.out, profile=a.profile,
                max_samples=a.max_samples, log=sys.stderr)
        return
    missing = ["--" + k.replace("_", "-") for k, v in EVAL_FIELDS.items() if v is None and getattr(a, k) is None]
    if missing:
        raise ValueError(f"give --job, or the job field by field: missing {', '.join(missing)}")
    for k, v in EVAL_FIELDS.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    params = _merge("--params-json", _json_object("--params-json", a.params_json), "--param", _kv(a.param))
    task_params = _merge("--task-params-json", _json_object("--task-params-json", a.task_params_json),
                         "--task-param", _kv(a.task_param, "--task-param"))
    run_eval(model_dir=a.model, task=a.task, data=a.data, method=a.method, method_type=a.type or a.method,
             params=params, budget=a.budget, length=a.length, out=a.out, model_name=a.model_name,
             dataset=a.dataset, task_params=task_params, seed=a.seed, device=a.device, dtype=a.dtype,
             chunk_size=a.chunk_size, config_hash=a.config_hash, max_samples=a.max_samples,
             extrapolate=a.extrapolate,
             profile=a.profile, log=sys.stderr)


def cmd_methods(a) -> None:
    from .config import IGNORED_FIELDS, string_choices
    from .methods import REGISTRY

    for name, cls in sorted(REGISTRY.items()):
        inst = cls()
        flags = [f for f in ("needs_scores", "needs_profile") if getattr(inst, f)]
        print(f"{name}  ({cls.paper}){'  needs: ' + ', '.join(flags) if flags else ''}")
        ignored = (*getattr(cls, "ignored_fields", ()), *IGNORED_FIELDS.get(name, ()))
        for f in dataclasses.fields(cls):
            choices = string_choices(cls, f) if f.type in (str, "str") else None
            note = f"  (one of: {', '.join(choices)})" if choices else ""
            note += "  (accepted, ignored)" if f.name in ignored else ""
            print(f"    {f.name}: {getattr(f.type, '__name__', f.type)} = {f.default!r}{note}")


def cmd_profile(a) -> None:
    from .io import OutputError, check_out_file
    from .profiling import run_profile

    check_out_file(a.out, _is_profile_file, "head profile (Parquet written by kvbench profile)")
    if not a.out.endswith(".parquet"):
        raise OutputError(f"--out {a.out!r}: a head profile is a Parquet file: give a name ending in .parquet")
    _check_model_dir(a.model)
    run_profile(a.model, a.out, seed=a.seed, n_prompts=a.n_prompts, log=sys.stderr)


def cmd_validate(a) -> None:
    from .config import job_table, load_config

    from .estimate import format_estimates, study_estimates

    cfg = load_config(a.config, *a.overlay)
    print(f"{' + '.join([a.config, *a.overlay])}: valid, {len(job_table(cfg))} eval jobs")
    print(format_estimates(study_estimates(cfg)))


def _task_help() -> str:
    from .tasks import ordered

    items = [f"{c.name} ({c.summary})" for c in ordered()]
    return ", ".join(items[:-1]) + " or " + items[-1] if len(items) > 1 else items[0]


def _task_param_help() -> str:
    from .tasks.base import parameters, readers

    items = []
    for k, f in parameters().items():
        lo = f.metadata["minimum"]
        items.append(f"{k} ({f.metadata['help']}{'' if lo is None else f', >= {lo}'}; {'/'.join(readers(k))})")
    return "task parameter: " + ", ".join(items)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="kvbench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = "(default: %(default)s)"
    s = sub.add_parser("build-model", help="build a model folder from a source")
    s.add_argument("source", help="builtin:<name> | path:<dir> | hub:<repo>@<rev> | random:<arch>")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="model folder to write: new, empty, or a previous build (never another folder)")
    s.add_argument("--seed", type=_int(0), default=0, help=f"seed for random weights and training {d}")
    s.add_argument("--steps", type=_int(1, key="steps"), default=None,
                   help="override the builtin recipe's training steps (>= 1)")
    s.add_argument("--train", action="store_true",
                   help="builtin only: train from scratch (checkpointed, resumable) instead of copying the "
                        "weights shipped in the package")
    s.set_defaults(fn=cmd_build_model)

    s = sub.add_parser("make-data", help="build the documents of one dataset at one length")
    s.add_argument("--config", help="config file naming the dataset")
    s.add_argument("--dataset", help="dataset name in the config")
    s.add_argument("--dataset-json", help="the dataset's config entry as JSON (instead of --config/--dataset)")
    s.add_argument("--length", type=_int(1), required=True, help="document length in tokens (prompt included)")
    s.add_argument("--out", required=True, metavar="FILE.jsonl", help="JSONL file to write (new or a previous one)")
    s.add_argument("--model", metavar="DIR", help="model folder (tokenizer for token lengths, max positions)")
    s.add_argument("--seed", type=_int(0), default=None, help="data seed (default: the config's seed, else 0)")
    s.add_argument("--extrapolate", action="store_true", help=EXTRAPOLATE_HELP)
    s.set_defaults(fn=cmd_make_data)

    s = sub.add_parser("eval", help="run one eval job into a Parquet file",
                       description="Run one eval job: every document of --data through one method at one budget, "
                                   "one Parquet row per sample. Everything is checked before the model loads; a "
                                   "killed job resumes from <out>.partial/.")
    s.add_argument("--model", required=True, metavar="DIR", help="model folder made by build-model")
    s.add_argument("--job", metavar="JSON|FILE",
                   help="the job as the workflow passes it (kvbench.job.Job: cell, budget and its config slice), "
                        "instead of the per-field options below; its hash is recorded as config_hash")
    s.add_argument("--data", required=True, metavar="FILE.jsonl", help="documents made by make-data at --length")
    s.add_argument("--out", required=True, metavar="FILE.parquet",
                   help="result file: new or a previous eval result (never another file or a folder)")
    s.add_argument("--profile", metavar="FILE.parquet", help="head profile from `kvbench profile` (head-aware methods)")
    s.add_argument("--max-samples", type=_int(1, key="max_samples"), default=None, help="only the first N documents (default: all)")
    f = s.add_argument_group("the job, field by field (a hand run; the workflow passes --job instead)")
    f.add_argument("--model-name", help="model name recorded in each row (default: model)")
    f.add_argument("--task", metavar="TASK", help=_task_help())
    f.add_argument("--dataset", help="dataset name recorded in each row (default: dataset)")
    f.add_argument("--method", help="variant name recorded in each row (a path component, e.g. sink4)")
    f.add_argument("--type", help="registered method type, see `kvbench methods` (default: the variant name)")
    f.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="method parameter, the value as JSON (repeatable; wins over --params-json, with a warning)")
    f.add_argument("--params-json", metavar="JSON", help="method parameters as one JSON object")
    f.add_argument("--task-param", action="append", metavar="KEY=VALUE", help=_task_param_help())
    f.add_argument("--task-params-json", metavar="JSON", help="task parameters as one JSON object")
    f.add_argument("--budget",
                   help="KV budget in tokens per (layer, KV head), a positive integer; 'full' (the default) keeps "
                        "every token: the only budget of method type full, and none of an evicting method")
    f.add_argument("--length", type=_int(1),
                   help="document length in tokens the data was built for (recorded in each row; checked)")
    f.add_argument("--seed", type=_int(0), help="torch seed (default: 0)")
    f.add_argument("--device", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:<index> "
                                    "or mps; it must exist on this machine (default: auto)")
    f.add_argument("--dtype", metavar="DTYPE", help="model and cache precision: float32, float16 or bfloat16 "
                                                    "(default: float32)")
    f.add_argument("--chunk-size", type=_int(1, key="chunk_size"),
                   help="prefill chunk in tokens: one forward while nothing is evicted inside it, stepwise (exact, "
                        "at most budget + 1 entries per head) past the budget (default: 64)")
    f.add_argument("--config-hash", help="hash of the job's config, recorded in each row (default: none)")
    f.add_argument("--extrapolate", action="store_true", default=None, help=EXTRAPOLATE_HELP)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("profile", help="profile attention heads (retrieval / induction / local)",
                       description="Score every attention head as retrieval / induction / local from probe prompts "
                                   "(full cache) and write one row per (layer, query head).")
    s.add_argument("--model", required=True, metavar="DIR", help="model folder made by build-model")
    s.add_argument("--out", required=True, metavar="FILE.parquet",
                   help="head profile to write: new or a previous profile (never another file or a folder)")
    s.add_argument("--seed", type=_int(0), default=0, help=f"seed of the probe prompts {d}")
    s.add_argument("--n-prompts", type=_int(1, 100000, key="n_prompts"), default=8,
                   help=f"probe prompts averaged per score (more: steadier scores, slower) {d}")
    s.set_defaults(fn=cmd_profile)

    sub.add_parser("aggregate", help="tables, figures and all.parquet from raw results (see its --help)")

    s = sub.add_parser("methods", help="list registered methods, their fields, defaults and allowed values")
    s.set_defaults(fn=cmd_methods)

    s = sub.add_parser("validate", help="validate a config file (and overlays, merged as Snakemake merges them)")
    s.add_argument("config")
    s.add_argument("overlay", nargs="*", help="config files merged over it in order, as snakemake --configfile "
                                               "config overlay... (e.g. config/paper_smoke.yaml)")
    s.set_defaults(fn=cmd_validate)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "aggregate":  # its own options (see its --help), the same error handling
        from .aggregate import main as agg_main

        a = argparse.Namespace(cmd="aggregate", fn=lambda _: agg_main(argv[1:]))
    else:
        a = p.parse_args(argv)
    from .config import reset_warnings

    reset_warnings()
    try:
        a.fn(a)
    except KeyboardInterrupt:
        if os.environ.get("KVBENCH_TRACEBACK"):
            raise
        print(f"kvbench {a.cmd}: interrupted; rerun to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError, KeyError) as e:
        if os.environ.get("KVBENCH_TRACEBACK"):
            raise
        raise SystemExit(f"kvbench {a.cmd}: error: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - anything else still ends in one line (the traceback on request)
        if os.environ.get("KVBENCH_TRACEBACK"):
            raise
        raise SystemExit(f"kvbench {a.cmd}: error: {type(e).__name__}: {_one_line(e)} "
                         f"(KVBENCH_TRACEBACK=1 shows where)") from None


def _one_line(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    return " ".join(text.split())
