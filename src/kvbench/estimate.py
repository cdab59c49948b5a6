"""Planning numbers for a config: jobs per study and estimated GPU hours.

    python -m kvbench validate config/paper.yaml      (prints both, per study and in total)

An estimate, not a measurement: every forward pass of the eval loop is priced as
    t = STEP_OVERHEAD_S + max(weights bytes / GPU_BANDWIDTH, 2 x params x tokens / GPU_FLOPS)
(decode is bound by reading the weights, a prefill chunk by arithmetic), with constants of an
A100-class card (HBM 1.5 TB/s, 150 TFLOP/s of dense bf16 actually reached: about half of the spec
sheet's 312) and a per-step framework overhead of 15 ms (Python and kernel launches of a ~30-layer
model, batch 1). Model size comes from the source: random architectures from their shapes, hub
repos from the size in their name (`7B`, `70m`), the builtin model from its recipe. Methods that
need attention scores cost 1.1x per step and quantized ones 1.3x (their CPU overheads in
bench/decode.py). The forward count per document follows each task's loop: streaming translation
and token-by-token perplexity of evicting methods take one forward per token, `full` perplexity
one per chunk, batch translation one per target token after a chunked prefill, latency a chunked
prefill plus warm-up and measured steps, and the long-context tasks (niah, ruler, longbench, ...) read
their context as perplexity does (chunks for `full`, token by token when evicting), then generate their
answer. The overhead is a ~30-layer model's, so tiny models (the
builtin one) are overestimated. Real runs differ with the card, the attention kernel and
the document lengths a dataset really gives.
"""

from __future__ import annotations

import re

GPU_BANDWIDTH = 1.5e12  # bytes/s
GPU_FLOPS = 150e12  # dense bf16 FLOP/s reached
STEP_OVERHEAD_S = 0.015
BUILTIN_PARAMS = 1.25e6


def model_params(source: str) -> float | None:
    """Parameter count of a model source, or None when it cannot be told without loading it."""
    scheme, _, rest = source.partition(":")
    if scheme == "builtin":
        return BUILTIN_PARAMS
    if scheme == "random":
        from .models import RANDOM_ARCHS

        a = RANDOM_ARCHS.get(rest)
        if a is None:
            return None
        h, layers, inter, vocab = a["hidden_size"], a["num_hidden_layers"], a["intermediate_size"], a["vocab_size"]
        kv = a.get("num_key_value_heads", a["num_attention_heads"]) / a["num_attention_heads"]
        per_layer = h * h * (2 + 2 * kv) + 3 * h * inter
        return layers * per_layer + vocab * h * (1 if a.get("tie_word_embeddings") else 2)
    m = re.search(r"(\d+(?:\.\d+)?)\s*([bBmM])(?![a-zA-Z])", rest.split("@")[0])
    if not m:
        return None
    return float(m.group(1)) * (1e9 if m.group(2).lower() == "b" else 1e6)


def _step(params: float, tokens: int, bytes_per_param: float) -> float:
    return STEP_OVERHEAD_S + max(params * bytes_per_param / GPU_BANDWIDTH, 2 * params * tokens / GPU_FLOPS)


def job_seconds(cfg: dict, job, params: float) -> float:
    """Estimated seconds of one eval job (all its documents) on one GPU."""
    from . import tasks
    from .methods import REGISTRY
    from .methods.haq_kv import QuantMethod

    bpp = 4 if cfg.get("dtype", "float32") == "float32" else 2
    chunk = int(cfg.get("chunk_size", 64))
    n_docs = int(cfg["datasets"][job.dataset].get("n_samples", 1))
    cls = REGISTRY[cfg["methods"][job.method]["type"]]
    factor = 1.3 if issubclass(cls, QuantMethod) else (1.1 if cls.needs_scores else 1.0)
    L = job.length
    one, prefill = _step(params, 1, bpp), _step(params, chunk, bpp) * -(-L // chunk)
    if job.task == "translate_stream":
        per_doc = L * one
    elif job.task == "translate_batch":
        per_doc = _step(params, chunk, bpp) * -(-(L // 2) // chunk) + (L // 2) * one
    elif job.task == "ppl":
        per_doc = prefill if job.budget.is_full else L * one
    elif job.task == "latency":
        t = cfg.get("tasks", {}).get("latency", {})
        per_doc = prefill + (int(t.get("warmup", 4)) + int(t.get("n_decode", 32))) * one
    elif tasks.get(job.task).reads_context:  # niah, ruler, the long-context benchmarks: read, then answer
        per_doc = (prefill if job.budget.is_full else L * one) + tasks.get(job.task).answer_tokens * one
    else:
        per_doc = L * one
    return per_doc * n_docs * factor


def study_estimates(cfg: dict) -> list[dict]:
    """[{study, jobs, gpu_hours (None if a model's size is unknown)}] in config order, plus a `total` row
    in which a job two studies share counts once."""
    from .config import job_table, study_jobs

    params = {m: model_params(spec["source"]) for m, spec in cfg["models"].items()}

    def hours(jobs) -> float | None:
        if any(params[j.model] is None for j in jobs):
            return None
        return sum(job_seconds(cfg, j, params[j.model]) for j in jobs) / 3600

    rows = []
    for name, st in cfg["studies"].items():
        jobs = study_jobs(cfg, st)
        rows.append({"study": name, "jobs": len(jobs), "gpu_hours": hours(jobs)})
    everything = job_table(cfg)
    rows.append({"study": "total (shared jobs once)", "jobs": len(everything), "gpu_hours": hours(everything)})
    return rows


def format_estimates(rows: list[dict]) -> str:
    width = max(len(r["study"]) for r in rows)
    lines = [f"{'study':<{width}}  {'jobs':>5}  {'est. GPU h':>10}"]
    for r in rows:
        h = "?" if r["gpu_hours"] is None else f"{r['gpu_hours']:.1f}"
        lines.append(f"{r['study']:<{width}}  {r['jobs']:>5}  {h:>10}")
    lines.append("GPU hours: an estimate for one A100-class GPU (kvbench/estimate.py says how), not a measurement")
    return "\n".join(lines)
