"""Result-row schema: the contract between eval jobs and aggregation.

One eval job writes one Parquet file with one row per sample. Aggregation refuses any file whose
`schema_version` is not in `KNOWN_VERSIONS`. Bump `SCHEMA_VERSION` when a column changes meaning.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 6
KNOWN_VERSIONS = (1, 2, 3, 4, 5, 6)
# columns a version added: a file of an older known version reads with them null
ADDED_IN = {2: ("max_position", "model_max_positions"), 3: ("transient_bytes_peak",),
            4: ("depth", "depth_actual", "needle_position", "prediction", "expected", "score", "query_first",
                "subtask"),
            5: ("metric", "context_tokens", "context_tokens_total"), 6: ("attention_kernel",)}

# name -> arrow type. Nullable everywhere: a column that does not apply to a task is null
# (e.g. BLEU inputs for `ppl`, NLL for `translate_stream`).
COLUMNS: dict[str, pa.DataType] = {
    "schema_version": pa.int32(),
    # identifiers
    "model": pa.string(),  # model name in the config (path component)
    "model_source": pa.string(),  # builtin:/path:/hub:/random: source string
    "revision": pa.string(),  # hub revision or content hash of the local folder
    "task": pa.string(),  # a registered task (kvbench.tasks): translate_stream, translate_batch, ppl, latency, niah,
    # ruler_<subtask>
    "dataset": pa.string(),  # dataset name in the config (path component)
    "method": pa.string(),  # variant name in the config (path component), e.g. "sink4"
    "method_type": pa.string(),  # registered type, e.g. "streaming_llm"
    "method_params": pa.string(),  # JSON of the policy dataclass fields
    "method_repr": pa.string(),  # repr() of the policy dataclass
    "length": pa.int64(),  # target document length in tokens
    "budget": pa.string(),  # "full" or the integer budget as text (path component)
    "budget_tokens": pa.int64(),  # null for full
    "sample_id": pa.int64(),
    # text (translation tasks)
    "source": pa.string(),
    "hypothesis": pa.string(),
    "reference": pa.string(),
    "delays": pa.list_(pa.float64()),  # source words read when each target word was written
    "src_words": pa.int64(),
    "ref_words": pa.int64(),
    "hyp_words": pa.int64(),
    "stop_reason": pa.string(),  # eos | length_cap
    "wait_k": pa.int64(),
    # lagging (words)
    "al": pa.float64(),
    "laal": pa.float64(),
    # quality (ppl task)
    "nll_sum": pa.float64(),
    "n_scored_tokens": pa.int64(),
    "nll_per_token": pa.float64(),
    # long-context tasks (niah, ruler_*)
    "depth": pa.float64(),  # niah: the needle's depth asked, a fraction of the context (0 = start, 1 = end)
    "depth_actual": pa.float64(),  # niah: share of the filler tokens before the needle (where it really is)
    "needle_position": pa.int64(),  # niah: index of the needle's first token in the token stream fed
    "prediction": pa.string(),  # the generated answer
    "expected": pa.string(),  # niah: the value; ruler, longbench, infinitebench, loogle: the references as a JSON list
    "score": pa.float64(),  # per-sample score in [0, 1] (niah: 0/1 exact match; ruler: string_match_all; benchmarks: `metric`)
    "metric": pa.string(),  # longbench, infinitebench, loogle: the subset's official metric (kvbench.longctx.scoring)
    "context_tokens": pa.int64(),  # longbench, infinitebench, loogle: context tokens fed (after the middle cut)
    "context_tokens_total": pa.int64(),  # ... and the whole context's tokens
    "query_first": pa.bool_(),  # niah: the question came before the context
    "subtask": pa.string(),  # ruler: the RULER task; longbench, infinitebench, loogle: the benchmark's subset
    "quality_meaningful": pa.bool_(),  # False for random-weight models
    # memory: summed from the tensors the cache really holds
    "tokens_processed": pa.int64(),  # tokens fed through the model for this sample
    "max_position": pa.int64(),  # largest RoPE position a query or key was given (re-indexed: after the rule)
    "model_max_positions": pa.int64(),  # the model's max_position_embeddings (past it only with `extrapolate`)
    "retained_tokens_peak": pa.int64(),  # max over steps of live entries per (layer, kv head), averaged over layers x heads
    "retained_tokens_mean": pa.float64(),
    "cache_bytes_peak": pa.int64(),  # allocated K/V storage incl. padding, scales, zero-points
    "cache_bytes_mean": pa.float64(),
    "cache_bytes_live_peak": pa.int64(),  # bytes of live entries only (no padding)
    "metadata_bytes_peak": pa.int64(),  # positions, roles, scores kept beside the tensors
    # largest full-precision K/V working copy one attention call made, not held between calls: a
    # dequantized block (quantized storage), the rotated keys (re-indexed positions), up-cast copies
    "transient_bytes_peak": pa.int64(),
    # what read quantized storage in attention: "c" (engine/deq.c: codes read in C; sums in its own
    # order, equal to the torch path's to float32 rounding) or "torch" (torch ops); null: dense storage
    "attention_kernel": pa.string(),
    "budget_bytes": pa.int64(),  # budget x layers x kv_heads x head_dim x 2 x bytes/elem (null for full)
    "layout": pa.string(),  # dense | grouped_per_head | packed_quant (rows before 2026-12-01: padded_per_head)
    "compute": pa.string(),  # exact | dequantized  (how attention consumes the cache)
    "device_peak_bytes": pa.int64(),  # torch.cuda.max_memory_allocated, null on CPU
    # speed
    "wall_seconds": pa.float64(),
    "tokens_per_second": pa.float64(),
    "decode_ms_median": pa.float64(),
    "decode_ms_p90": pa.float64(),
    # provenance
    "kvbench_version": pa.string(),
    "torch_version": pa.string(),
    "transformers_version": pa.string(),
    "git_commit": pa.string(),
    "config_hash": pa.string(),
    "seed": pa.int64(),
    "device": pa.string(),
    "dtype": pa.string(),
}

ARROW_SCHEMA = pa.schema(
    [pa.field(n, t) for n, t in COLUMNS.items()],
    metadata={b"kvbench_schema_version": str(SCHEMA_VERSION).encode()},
)


class SchemaError(ValueError):
    """A results file that this version of kvbench cannot read."""


def to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts) -> Arrow table with exactly the schema's columns; unknown keys are an error."""
    for r in rows:
        extra = set(r) - set(COLUMNS)
        if extra:
            raise KeyError(f"result row has columns not in the schema: {sorted(extra)}")
    cols = {n: [r.get(n) for r in rows] for n in COLUMNS}
    return pa.table(cols, schema=ARROW_SCHEMA)


def missing_ok(version: int | None) -> set[str]:
    """Columns a file of `version` may lack (added by later versions; they read as null)."""
    return {c for v, cols in ADDED_IN.items() if version is not None and version < v for c in cols}


def check_version(table_or_meta_version: int | None, path: str) -> None:
    if table_or_meta_version not in KNOWN_VERSIONS:
        raise SchemaError(
            f"{path}: schema version {table_or_meta_version!r} is not one this kvbench reads "
            f"(known: {list(KNOWN_VERSIONS)}); re-run its eval job or upgrade kvbench"
        )
