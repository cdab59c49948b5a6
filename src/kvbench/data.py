"""Datasets: documents built to a target token length, saved as JSONL with a fixed schema.

Each line: {"id", "src_lang", "tgt_lang", "source", "target", "sent_ends", "n_tokens", "length"}.
`source`/`target` are space-joined words; `sent_ends` the word index where each sentence ends;
perplexity-only corpora (WikiText, PG19) have an empty target. Sources:
- `synthetic`: the builtin language pair (kvbench.synth), seeded, offline; one token per word.
- `hf`: anything `datasets.load_dataset` reads, in the real datasets' own column layout:
  translation pairs ({"translation": {"en": ..., "fr": ...}}, IWSLT-17 / WMT) are concatenated
  sentence by sentence into documents; text corpora ({"text": ...}, WikiText-103 / PG19) are
  concatenated and cut at sentence ends. Lengths are counted with the model's tokenizer.
"""

from __future__ import annotations

import json

from . import synth
from .io import atomic_path

FIELDS = ("id", "src_lang", "tgt_lang", "source", "target", "sent_ends", "n_tokens", "length")


def _dump(docs: list[dict], out: str) -> None:
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({k: d[k] for k in FIELDS}, ensure_ascii=False, sort_keys=True) + "\n")


def synthetic_docs(length: int, n: int, seed: int) -> list[dict]:
    lex = synth.lexicon()
    out = []
    for i in range(n):
        d = synth.make_document(i, length, seed, lex)
        out.append(dict(id=i, src_lang=synth.SRC_LANG, tgt_lang=synth.TGT_LANG, source=" ".join(d.source),
                        target=" ".join(d.target), sent_ends=d.sent_ends, n_tokens=d.n_tokens(), length=length))
    return out


def _rows(cfg: dict):
    import datasets

    kw = {k: cfg[k] for k in ("name", "data_files", "split") if cfg.get(k) is not None}
    kw.setdefault("split", "test")
    try:
        return datasets.load_dataset(cfg["path"], **kw)
    except Exception as e:  # noqa: BLE001 - missing file, bad encoding, offline: name what was asked for
        where = f"{cfg['path']!r}" + (f" (data_files {cfg['data_files']!r})" if cfg.get("data_files") else "")
        cause = e
        while cause.__cause__ is not None and not isinstance(cause, UnicodeDecodeError):  # the real reason
            cause = cause.__cause__
        why = f"{type(e).__name__}: {e}" + (f"; caused by {type(cause).__name__}: {cause}" if cause is not e else "")
        raise ValueError(f"cannot load dataset {where}: {why}") from e


def hf_docs(cfg: dict, length: int, n: int, tokenizer) -> list[dict]:
    """Documents from a datasets.load_dataset corpus, each as long as fits in `length` tokens."""
    rows = _rows(cfg)
    src_lang, tgt_lang = cfg.get("src_lang"), cfg.get("tgt_lang")
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    overhead = 32  # prompt and markers: a conservative allowance
    docs, cur = [], dict(src=[], tgt=[], ends=[], tokens=overhead)
    translation = "translation" in rows.column_names
    if translation:
        if not (src_lang and tgt_lang):
            raise ValueError(f"dataset {cfg.get('path')!r} holds translation pairs: give src_lang and tgt_lang")
        have = sorted(rows[0]["translation"]) if len(rows) else []
        for key, lang in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
            if lang not in have:
                raise ValueError(f"dataset {cfg.get('path')!r}: {key} {lang!r} is not among its languages {have}")

    def flush():
        if cur["src"]:
            docs.append(dict(id=len(docs), src_lang=src_lang, tgt_lang=tgt_lang, source=" ".join(cur["src"]),
                             target=" ".join(cur["tgt"]), sent_ends=list(cur["ends"]), n_tokens=cur["tokens"],
                             length=length))
        cur.update(src=[], tgt=[], ends=[], tokens=overhead)

    for row in rows:
        if translation:
            s, t = row["translation"][src_lang].split(), row["translation"][tgt_lang].split()
        else:
            s, t = row[cfg.get("text_field", "text")].split(), []
        if not s:
            continue
        need = count(" ".join(s)) + (count(" ".join(t)) if t else 0)
        if need + overhead > length:
            continue  # one sentence longer than a whole document: skip it
        if cur["tokens"] + need > length:
            flush()
            if len(docs) == n:
                break
        cur["src"] += s
        cur["tgt"] += t
        cur["ends"].append(len(cur["src"]))
        cur["tokens"] += need
    if len(docs) < n:
        flush()
    if not docs:
        raise ValueError(f"dataset {cfg.get('path')!r} gave no document of at most {length} tokens")
    return docs[:n]


def make_data(cfg: dict, length: int, n: int, seed: int, out: str, tokenizer=None,
              max_positions: int | None = None) -> int:
    """Build and save the documents of one (dataset, length); returns the number written."""
    if max_positions is not None and length > max_positions:
        raise ValueError(f"length {length} is beyond the model's maximum positions ({max_positions})")
    if n < 1:
        raise ValueError(f"n_samples must be >= 1, got {n}")
    src = cfg.get("source", "synthetic")
    if src == "synthetic":
        docs = synthetic_docs(length, n, seed)
    elif src == "hf":
        if tokenizer is None:
            raise ValueError("hf datasets are built to a token length: pass the model (--model DIR)")
        try:
            docs = hf_docs(cfg, length, n, tokenizer)
        except UnicodeDecodeError as e:  # raised while reading rows lazily: name what was read
            where = f"{cfg.get('path')!r}" + (f" (data_files {cfg['data_files']!r})" if cfg.get("data_files") else "")
            raise ValueError(f"dataset {where}: not UTF-8 text ({e})") from None
    else:
        raise ValueError(f"unknown dataset source {src!r}; use 'synthetic' or 'hf'")
    _dump(docs, out)
    return len(docs)


def read_docs(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            docs = [json.loads(line) for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a kvbench JSONL dataset ({e})") from e
    if not docs:
        raise ValueError(f"{path}: no documents")
    seen = set()
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise ValueError(f"{path}: line {i + 1} is not a document (a JSON object)")
        missing = [k for k in ("id", "source") if k not in d]
        if missing:
            raise ValueError(f"{path}: document without {missing}")
        if not isinstance(d["id"], int) or isinstance(d["id"], bool) or d["id"] < 0:
            raise ValueError(f"{path}: document ids must be integers >= 0, got {d['id']!r}")
        if d["id"] in seen:
            raise ValueError(f"{path}: duplicate document id {d['id']} (each sample needs its own id)")
        seen.add(d["id"])
        if not str(d["source"]).strip():
            raise ValueError(f"{path}: document {d['id']} is empty")
    return docs
