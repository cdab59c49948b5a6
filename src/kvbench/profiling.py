"""Attention-head profiling: retrieval / induction / local scores and a type per head.

    python -m kvbench profile --model resources/models/tiny --out results/heads/tiny.parquet

Probes (all through the engine's own attention function, full cache, explicit probabilities):
- copy probe: a random sequence of the model's own tokens, repeated. Induction score (Olsson et al.
  2022): mean attention from a token in the second copy to the token after its previous occurrence.
  Retrieval score (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
  Factuality"): fraction of copy steps where the head's argmax attention lands on the earlier
  occurrence of the token being produced and the model produces it.
- for the builtin model, retrieval is scored where it matters: at the name steps of synthetic
  documents (a reference translated as a name bound far back): argmax on an earlier occurrence of
  the name being produced (its target form, or its source form) or on the words binding it there
  ("ROLE is called"). The model may read the name itself or the binding its earlier layers wrote
  the name into; either way the head needs those far-back keys, which is what a KV policy must know.
- local / sink mass: attention within the last `local_window` keys / on the first 4 tokens.
Types: retrieval if retrieval >= thr_retrieval, else induction if induction >= thr_induction, else
local. A KV head takes the strongest type among its query heads (GQA: its cache serves them all).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import streams
from .engine.hf import model_geometry
from .io import atomic_path

TYPES = ("retrieval", "induction", "local")  # priority order
COLUMNS = ("layer", "q_head", "kv_head", "retrieval", "induction", "local", "sink", "type", "kv_type")
BINDING_SPAN = 4  # "ROLE is called FIRST LAST": the last name is 4 words after the role
DEFAULTS = dict(thr_retrieval=0.3, thr_induction=0.3, local_window=8, copy_len=48, doc_length=768)


def _record(model, ids, pos, role) -> list[torch.Tensor]:
    """Attention probabilities (Hq, T, T) per layer for one stream, full cache, one chunk."""
    from .engine.session import Session
    from .methods import method_from_config

    sess = Session(model, method_from_config("full", {}), None, chunk_size=len(ids))
    for s in sess.stores:
        s.recorded = []
    logits = sess.feed(ids, pos, role, logits="all")
    return [s.recorded[0] for s in sess.stores], logits.argmax(-1).tolist()


def copy_probe(model, tok, rng: random.Random, n: int):
    special = set(tok.all_special_ids)
    pool = [i for i in range(len(tok)) if i not in special]
    a = rng.sample(pool, n)
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + a + a
    off = len(ids) - 2 * n
    probs, pred = _record(model, ids, list(range(len(ids))), [streams.ROLE_SOURCE] * len(ids))
    # query at the copy of a[j] (index off+n+j) produces a[j+1], first seen at index off+j+1
    q = torch.tensor([off + n + j for j in range(n - 1)])
    src = torch.tensor([off + j + 1 for j in range(n - 1)])
    correct = torch.tensor([pred[int(qi)] == ids[int(qi) + 1] for qi in q])
    ind, ret = copy_scores(probs, q, src, correct)
    return ind, ret, probs


def copy_scores(probs: list[torch.Tensor], q: torch.Tensor, src: torch.Tensor, correct: torch.Tensor):
    """Induction (mean attention on `src` from `q`) and retrieval (argmax lands on `src` and the
    copy is produced) per layer and query head, from attention maps probs[l]: (Hq, T, T)."""
    ind = torch.stack([p[:, q, src].mean(-1) for p in probs])
    ret = torch.stack([((p[:, q].argmax(-1) == src) & correct).float().mean(-1) for p in probs])
    return ind, ret  # (L, Hq) each


def local_sink_scores(probs: list[torch.Tensor], window: int, n_sink: int = 4):
    """Attention mass within the last `window` keys and on the first `n_sink` tokens: (L, Hq)."""
    t = probs[0].shape[-1]
    near = torch.arange(t)[None, :] > torch.arange(t)[:, None] - window - 1  # (T, T)
    local = torch.stack([(p * near).sum(-1).mean(-1) for p in probs])
    sink = torch.stack([p[..., :n_sink].sum(-1).mean(-1) for p in probs])
    return local, sink


def classify(ret: float, ind: float, thr_retrieval: float, thr_induction: float) -> str:
    return "retrieval" if ret >= thr_retrieval else "induction" if ind >= thr_induction else "local"


def name_probe(model, tok, model_dir, rng: random.Random, length: int):
    """Retrieval at the builtin task's name steps: (L, Hq) scores, or None for other models."""
    from . import synth
    from .prompt import Prompter
    from .tasks import document_stream

    doc = synth.make_document(rng.randrange(10**6), length, seed=rng.randrange(10**6))
    p = Prompter(tok, model_dir, synth.SRC_LANG, synth.TGT_LANG)
    d = dict(id=0, source=" ".join(doc.source), target=" ".join(doc.target))
    s, labels = document_stream(p, d, k=5)
    # a name is written in its target form; the same name read earlier in the source (its source
    # form, the target form without the marker "x") is an equally valid place to retrieve it from
    lex = synth.lexicon()
    alias = {tok.convert_tokens_to_ids(t): tok.convert_tokens_to_ids(s)
             for tp, sp in ((lex.tfirst, lex.first), (lex.tlast, lex.last))
             for tpool, spool in zip(tp, sp) for t, s in zip(tpool, spool)}
    ids = torch.tensor(s.ids)
    pos = torch.tensor(s.pos)
    role = torch.tensor(s.role)
    steps = []  # (query index, keys that hold the name or bind it)
    for t, lab in enumerate(labels.tolist()):  # a name produced here that already occurred earlier
        if lab not in alias:
            continue
        seen = (((ids[:t] == lab) | (ids[:t] == alias[lab]))).nonzero().flatten()
        if len(seen) == 0:
            continue
        # each earlier occurrence with the words before it on its side (ROLE is called FIRST LAST):
        # a head may read the name itself or the binding that carries it
        span = torch.zeros(t, dtype=torch.bool)
        for i in seen.tolist():
            span |= (role[:t] == role[i]) & (pos[:t] >= pos[i] - BINDING_SPAN) & (pos[:t] <= pos[i])
        steps.append((t, span))
    probs, _ = _record(model, s.ids, s.pos, s.role)
    if not steps:
        return None
    hits = []
    for p in probs:
        hits.append(torch.stack([span[p[:, t, :t].argmax(-1)] for t, span in steps], -1).float().mean(-1))
    return torch.stack(hits)


@dataclass
class HeadProfile:
    frame: pd.DataFrame
    types: list[list[str]]  # per layer, per KV head


def run_profile(model_dir: str, out: str, seed: int = 0, n_prompts: int = 8, log=None, **opts) -> pd.DataFrame:
    from .models import load_model
    from .prompt import is_builtin

    o = {**DEFAULTS, **opts}
    if not isinstance(n_prompts, int) or n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts!r}")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"no model at {model_dir!r} (missing config.json); run build-model first")
    model, tok, info = load_model(model_dir)
    rng = random.Random(seed)
    with torch.inference_mode():
        runs = [copy_probe(model, tok, rng, o["copy_len"]) for _ in range(n_prompts)]
        ind = torch.stack([r[0] for r in runs]).mean(0)  # (L, Hq)
        ret = torch.stack([r[1] for r in runs]).mean(0)
        local, sink = local_sink_scores(runs[0][2], o["local_window"])
        if is_builtin(model_dir):
            named = [name_probe(model, tok, model_dir, rng, o["doc_length"]) for _ in range(max(1, n_prompts // 2))]
            named = [x for x in named if x is not None]
            if named:
                ret = torch.stack(named).mean(0)
    n_l, hq = ind.shape
    hkv = model_geometry(model)["n_kv_heads"]  # GPT-NeoX configs have no num_key_value_heads
    g = hq // hkv
    rows = []
    for li in range(n_l):
        for h in range(hq):
            typ = classify(float(ret[li, h]), float(ind[li, h]), o["thr_retrieval"], o["thr_induction"])
            rows.append(dict(layer=li, q_head=h, kv_head=h // g, retrieval=float(ret[li, h]),
                             induction=float(ind[li, h]), local=float(local[li, h]), sink=float(sink[li, h]),
                             type=typ))
    df = pd.DataFrame(rows)
    kv_type = df.groupby(["layer", "kv_head"])["type"].agg(lambda ts: min(ts, key=TYPES.index))
    df["kv_type"] = [kv_type[(r.layer, r.kv_head)] for r in df.itertuples()]
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = {"kvbench_profile": json.dumps({**o, "seed": seed, "n_prompts": n_prompts, "model": model_dir,
                                           "revision": info.get("revision")})}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{k: v.encode() for k, v in meta.items()}})
    with atomic_path(out, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    if log:
        print(df.to_string(), file=log)
        if not (df["type"] == "retrieval").any():
            print(f"warning: no head reached the retrieval threshold ({o['thr_retrieval']}); head-aware methods "
                  "will treat every head by its induction/local type", file=log)
    return df


def read_profile(path: str, model=None, shape: tuple[int, int] | None = None) -> HeadProfile:
    """Read and check a head profile; `model` (or `shape` = (layers, KV heads), known from config.json
    before the model is loaded) must match its layers and KV heads."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"head profile {path!r} does not exist; run `kvbench profile` first")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"head profile {path!r} is not a readable Parquet file ({e})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"head profile {path!r} lacks columns {missing}")
    n_l = int(df["layer"].max()) + 1
    hkv = int(df["kv_head"].max()) + 1
    want = shape
    if model is not None:
        c = model.config
        want = (c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    if want is not None:
        if (n_l, hkv) != tuple(want):
            raise ValueError(f"head profile {path!r} has {n_l} layers x {hkv} KV heads, the model {want[0]} x {want[1]}")
    kv = df.drop_duplicates(["layer", "kv_head"]).sort_values(["layer", "kv_head"])
    types = [kv[kv["layer"] == li]["kv_type"].tolist() for li in range(n_l)]
    return HeadProfile(df, types)
