"""Command line: `python -m kvbench <command> --help`. Each command is what one Snakemake rule calls.

    build-model SOURCE --out DIR     builtin:/path:/hub:/random: -> a HF folder
    make-data   --config C --dataset NAME --length L --out FILE
    profile     --model DIR --out results/heads/MODEL.parquet
    eval        --model DIR --task T --data FILE --method NAME ... --out FILE.parquet
    aggregate   --config C --raw FILES... --out results
    methods     list registered methods with their fields and defaults
    validate    check a config file and print the job count
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _kv(items: list[str]) -> dict:
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep:
            raise SystemExit(f"--param expects key=value, got {it!r}")
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


def cmd_build_model(a) -> None:
    from .models import build_model

    info = build_model(a.source, a.out, seed=a.seed, steps=a.steps, log=sys.stderr, retrain=a.train)
    print(json.dumps(info, indent=2, default=str))


def cmd_make_data(a) -> None:
    from .config import load_config
    from .data import make_data

    if a.dataset_json:
        ds, seed = _json_object("--dataset-json", a.dataset_json), a.seed or 0
    else:
        cfg = load_config(a.config)
        if a.dataset not in cfg["datasets"]:
            raise SystemExit(f"dataset {a.dataset!r} is not in {a.config} (has: {sorted(cfg['datasets'])})")
        ds, seed = cfg["datasets"][a.dataset], cfg.get("seed", 0) if a.seed is None else a.seed
    tok, max_pos = None, None
    if a.model:
        import json as _j
        import os

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.model)
        max_pos = _j.load(open(os.path.join(a.model, "config.json"))).get("max_position_embeddings")
    n = make_data(ds, a.length, ds.get("n_samples", 4), seed, a.out, tokenizer=tok, max_positions=max_pos)
    print(f"wrote {n} documents to {a.out}")


def cmd_eval(a) -> None:
    from .evaluate import run_eval

    params = {**_json_object("--params-json", a.params_json), **_kv(a.param)}
    task_params = {**_json_object("--task-params-json", a.task_params_json), **_kv(a.task_param)}
    run_eval(model_dir=a.model, task=a.task, data=a.data, method=a.method, method_type=a.type or a.method,
             params=params, budget=a.budget, length=a.length, out=a.out, model_name=a.model_name,
             dataset=a.dataset, task_params=task_params, seed=a.seed, device=a.device, dtype=a.dtype,
             chunk_size=a.chunk_size, config_hash=a.config_hash, max_samples=a.max_samples,
             profile=a.profile, log=sys.stderr)


def cmd_methods(a) -> None:
    from .methods import REGISTRY

    for name, cls in sorted(REGISTRY.items()):
        inst = cls()
        flags = [f for f in ("needs_scores", "needs_profile") if getattr(inst, f)]
        print(f"{name}  ({cls.paper}){'  needs: ' + ', '.join(flags) if flags else ''}")
        for f in dataclasses.fields(cls):
            print(f"    {f.name}: {f.type} = {f.default!r}")


def cmd_profile(a) -> None:
    from .profiling import run_profile

    run_profile(a.model, a.out, seed=a.seed, n_prompts=a.n_prompts, log=sys.stderr)


def cmd_validate(a) -> None:
    from .config import job_table, load_config

    cfg = load_config(a.config)
    print(f"{a.config}: valid, {len(job_table(cfg))} eval jobs")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="kvbench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("build-model", help="build a model folder from a source")
    s.add_argument("source", help="builtin:<name> | path:<dir> | hub:<repo>@<rev> | random:<arch>")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=None, help="override the builtin recipe's training steps")
    s.add_argument("--train", action="store_true",
                   help="builtin only: train from scratch (checkpointed, resumable) instead of copying the "
                        "weights shipped in the package")
    s.set_defaults(fn=cmd_build_model)

    s = sub.add_parser("make-data", help="build the documents of one dataset at one length")
    s.add_argument("--config", help="config file naming the dataset")
    s.add_argument("--dataset", help="dataset name in the config")
    s.add_argument("--dataset-json", help="the dataset's config entry as JSON (instead of --config/--dataset)")
    s.add_argument("--length", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--model", help="model folder (tokenizer for token lengths, max positions)")
    s.add_argument("--seed", type=int, default=None)
    s.set_defaults(fn=cmd_make_data)

    s = sub.add_parser("eval", help="run one eval job into a Parquet file")
    s.add_argument("--model", required=True)
    s.add_argument("--model-name", default="model")
    s.add_argument("--task", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--dataset", default="dataset")
    s.add_argument("--method", required=True, help="variant name (path component)")
    s.add_argument("--type", help="registered method type (default: the variant name)")
    s.add_argument("--param", action="append", help="method parameter key=value (repeatable)")
    s.add_argument("--params-json", default="{}", help="method parameters as one JSON object")
    s.add_argument("--task-param", action="append", help="task parameter key=value (wait_k, n_decode, ...)")
    s.add_argument("--task-params-json", default="{}", help="task parameters as one JSON object")
    s.add_argument("--budget", default="full")
    s.add_argument("--length", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--profile", help="head profile Parquet (head-aware methods)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="float32")
    s.add_argument("--chunk-size", type=int, default=64)
    s.add_argument("--max-samples", type=int, default=None)
    s.add_argument("--config-hash", default="")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("profile", help="profile attention heads (retrieval / induction / local)")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-prompts", type=int, default=8)
    s.set_defaults(fn=cmd_profile)

    sub.add_parser("aggregate", help="tables, figures and all.parquet from raw results (see its --help)")

    s = sub.add_parser("methods", help="list registered methods")
    s.set_defaults(fn=cmd_methods)

    s = sub.add_parser("validate", help="validate a config file")
    s.add_argument("config")
    s.set_defaults(fn=cmd_validate)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "aggregate":  # its own options (see its --help), the same error handling
        from .aggregate import main as agg_main

        a = argparse.Namespace(cmd="aggregate", fn=lambda _: agg_main(argv[1:]))
    else:
        a = p.parse_args(argv)
    try:
        a.fn(a)
    except (ValueError, OSError, KeyError) as e:
        if __import__("os").environ.get("KVBENCH_TRACEBACK"):
            raise
        raise SystemExit(f"kvbench {a.cmd}: error: {e}") from None
