"""Datasets: documents built to a target token length, saved as JSONL with a fixed schema.

Each line: {"id", "src_lang", "tgt_lang", "source", "target", "sent_ends", "n_tokens", "length"}.
`source`/`target` are space-joined words; `sent_ends` the word index where each sentence (pair or
paragraph) ends; perplexity-only corpora (WikiText, PG19) have an empty target; `n_tokens` counts the
text with the model's tokenizer plus a fixed allowance for prompt and markers, never above `length`.
Sources:
- `synthetic`: the builtin language pair (kvbench.synth), seeded, offline; one token per word.
- `haystack`: filler for the long-context tasks (kvbench.tasks.niah, kvbench.tasks.ruler), seeded,
  offline, filled to the length: for the builtin model (its tokenizer knows the builtin language),
  sentence pairs of the builtin language with no name binding and no reference (`source`, `target`,
  `sent_ends`; `n_tokens` counts the teacher-forced stream as for `synthetic`); for any other
  tokenizer, the plain English sentences of `kvbench.longctx.haystack.SyntheticFiller` (`target`
  empty). The tasks place their needle (or RULER's needles) in this filler at run time.
- `longbench`, `infinitebench`, `loogle`: one document per sample of that benchmark's `subset`
  (`kvbench.longctx.loaders`: the hub dataset, or `path`/`data_files`/`split` in its real layout),
  in the order the split holds them: `source` is the sample's whole context (the task cuts it to the
  job's length at run time, in the middle, as LongBench does), and `sample` holds the rest (question,
  reference answers, metric, options, classes). `n_tokens` counts the context, capped at `length`.
- `hf`: anything `datasets.load_dataset` reads, in the real datasets' own column layout. The
  dataset's `kind` says how rows become documents (config key; inferred from the layout if absent):
  - `translation`: rows are sentence pairs ({"translation": {"en": ..., "fr": ...}}, IWSLT-17 /
    WMT); pairs are appended, kept intact, until the next one would overflow the length.
  - `paragraphs`: rows are the lines of one text stream (WikiText-103: blank rows between
    paragraphs, ` = Heading = ` lines); paragraphs are concatenated, across articles, until the next
    one would overflow (a paragraph longer than a whole document is cut at a word).
  - `books`: each row is one whole document (PG19: a book per row); a row is cut, from its start,
    into documents filled to the length at a word boundary; a row (or remainder) shorter than that
    gives none, and rows are never joined.
  Inferred kind: `translation` if the rows have a `translation` column; `paragraphs` if one of the
  first rows is blank or a ` = Heading = ` line; `books` otherwise. Only full documents are kept (a
  stream's or book's tail that does not fill one is dropped). make_data prints how many documents it
  made against how many were asked for, and fails when fewer were made unless `allow_fewer: true`.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re

from . import synth
from .io import atomic_path

FIELDS = ("id", "src_lang", "tgt_lang", "source", "target", "sent_ends", "n_tokens", "length")
OPTIONAL = ("sample",)  # written when a document has it (the long-context benchmarks' samples)
BENCHMARKS = ("longbench", "infinitebench", "loogle")  # dataset sources read by kvbench.longctx.loaders
KINDS = ("translation", "paragraphs", "books")
OVERHEAD = 32  # tokens allowed for the prompt and markers: a conservative allowance
INFER_ROWS = 200  # rows looked at to tell a paragraph stream from one-document-per-row


def _dump(docs: list[dict], out: str) -> None:
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for d in docs:
                keep = FIELDS + tuple(k for k in OPTIONAL if k in d)
                f.write(json.dumps({k: d[k] for k in keep}, ensure_ascii=False, sort_keys=True) + "\n")


def synthetic_docs(length: int, n: int, seed: int) -> list[dict]:
    lex = synth.lexicon()
    out = []
    for i in range(n):
        d = synth.make_document(i, length, seed, lex)
        out.append(dict(id=i, src_lang=synth.SRC_LANG, tgt_lang=synth.TGT_LANG, source=" ".join(d.source),
                        target=" ".join(d.target), sent_ends=d.sent_ends, n_tokens=d.n_tokens(), length=length))
    return out


def is_builtin_tokenizer(tokenizer) -> bool:
    """Does this tokenizer read the builtin language (the builtin model's word-level tokenizer)?"""
    vocab = tokenizer.get_vocab()
    return all(w in vocab for w in synth.INSTRUCTION + [synth.TARGET_START])


def haystack_docs(length: int, n: int, seed: int, tokenizer) -> list[dict]:
    """`n` filler documents of at most `length` tokens (see the module docstring)."""
    import random

    out = []
    if is_builtin_tokenizer(tokenizer):
        lex = synth.lexicon()
        overhead = synth.Document(0, [], [], []).n_tokens()
        for i in range(n):
            rng = random.Random(f"haystack|{seed}|{length}|{i}")
            src, tgt, ends = [], [], []
            while True:
                s, t, _ = synth._sentence(rng, lex, {}, [])  # no role: no binding, no reference
                if overhead + len(src) + len(s) + len(tgt) + len(t) > length:
                    break
                src, tgt = src + s, tgt + t
                ends.append(len(src))
            if not src:
                raise ValueError(f"length {length} is too small for one filler sentence pair")
            out.append(dict(id=i, src_lang=synth.SRC_LANG, tgt_lang=synth.TGT_LANG, source=" ".join(src),
                            target=" ".join(tgt), sent_ends=ends, n_tokens=overhead + len(src) + len(tgt),
                            length=length))
        return out
    from .longctx.haystack import SyntheticFiller

    counter = _Counter(tokenizer)
    for i in range(n):
        sentences = SyntheticFiller().sentences(random.Random(f"haystack|{seed}|{length}|{i}"))
        words, ends, total = [], [], 0
        for sent in sentences:  # per-word counts estimate; the text is counted exactly below
            w = sent.split()
            total += sum(counter.words(w))
            if total > length:
                break
            words += w
            ends.append(len(words))
        m, tok = counter.fit(words, length)
        out.append(dict(id=i, src_lang=None, tgt_lang=None, source=" ".join(words[:m]), target="",
                        sent_ends=[e for e in ends if e < m] + [m], n_tokens=tok, length=length))
    return out


def benchmark_docs(cfg: dict, length: int, n: int, tokenizer) -> list[dict]:
    """The first `n` samples of a long-context benchmark's subset as documents (module docstring)."""
    import dataclasses

    from .longctx.loaders import LOADERS

    src = cfg["source"]
    if not cfg.get("subset"):
        raise ValueError(f"a {src} dataset needs `subset` (the benchmark's task, e.g. hotpotqa)")
    kw = {k: cfg[k] for k in ("path", "data_files", "split") if k in cfg}
    samples = LOADERS[src](cfg["subset"], limit=n, **kw)
    counter = _Counter(tokenizer)
    out = []
    for i, s in enumerate(samples):
        if not s.context.strip():
            raise ValueError(f"{src} {cfg['subset']}: sample {s.id!r} has an empty context")
        sample = {k: v for k, v in dataclasses.asdict(s).items() if k != "context"}
        sample = json.loads(json.dumps(sample, ensure_ascii=False, default=list))  # tuples -> lists, JSON-safe
        out.append(dict(id=i, src_lang=None, tgt_lang=None, source=s.context, target="", sent_ends=[],
                        n_tokens=min(length, counter.text(s.context)), length=length, sample=sample))
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


def _label(cfg: dict) -> str:
    """The dataset as the config names it: path, config name, split, data files."""
    out = repr(cfg.get("path"))
    for key in ("name", "split", "data_files"):
        if cfg.get(key) is not None:
            out += f" {key} {cfg[key]!r}"
    return out


def _is_heading(line: str) -> bool:
    s = line.strip()
    return len(s) > 2 and s.startswith("= ") and s.endswith(" =")  # WikiText: " = Title = ", " = = Sub = = "


def dataset_kind(cfg: dict, rows) -> str:
    """The config's `kind`, checked against the rows' layout, or the kind the layout implies."""
    field, cols = cfg.get("text_field", "text"), rows.column_names
    kind = cfg.get("kind")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"dataset {_label(cfg)}: kind must be one of {list(KINDS)}, got {kind!r}")
    if kind == "translation" or (kind is None and "translation" in cols):
        if "translation" not in cols:
            raise ValueError(f"dataset {_label(cfg)}: kind translation needs a `translation` column; it has {cols}")
        return "translation"
    if field not in cols:
        raise ValueError(f"dataset {_label(cfg)}: no text column {field!r} (columns {cols}); set text_field")
    if kind is None:
        head = (r[field] or "" for r in itertools.islice(iter(rows), INFER_ROWS))
        kind = "paragraphs" if any(not t.strip() or _is_heading(t) for t in head) else "books"
    return kind


class _Counter:
    """Token counts with the model's tokenizer: exact for a text, and per word (with its leading
    space, cached) to place cuts, where a document's count is the sum of its words' counts for
    tokenizers that split at spaces; every document is then counted exactly and trimmed if over."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def text(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def words(self, words: list[str]) -> list[int]:
        new = sorted(set(words) - self.cache.keys())
        if new:
            ids = self.tok([" " + w for w in new], add_special_tokens=False)["input_ids"]
            self.cache.update(zip(new, map(len, ids)))
        return [self.cache[w] for w in words]

    def fit(self, words: list[str], room: int) -> tuple[int, int]:
        """(m, tokens): the longest prefix words[:m] (m <= len(words)) whose text fits in `room`."""
        m = len(words)
        while m > 0:
            n = self.text(" ".join(words[:m]))
            if n <= room:
                return m, n
            m -= max(1, n - room)  # a word is at least one token
        return 0, 0


def _paragraphs(rows, field: str, by_blank_rows: bool):
    """Word lists of the paragraphs in a column: for a line stream, consecutive non-blank rows up to
    a blank row (a heading line stands alone); for one document per row, its blank-line paragraphs."""
    cur = []
    for row in rows:
        text = row[field] or ""
        if by_blank_rows:
            if _is_heading(text):
                if cur:
                    yield cur
                yield text.split()
                cur = []
            elif text.strip():
                cur += text.split()
            elif cur:
                yield cur
                cur = []
        else:
            yield [p.split() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if by_blank_rows and cur:
        yield cur


def _text_docs(rows, kind: str, field: str, room: int, n: int, counter: _Counter) -> list[tuple[list, list, int]]:
    """(words, paragraph ends, tokens) of up to n full documents of at most `room` tokens."""
    out = []

    def cut(words: list[str], ends: list[int], est: list[int]) -> int:
        """Cut full documents from the front of words; returns how many words they used."""
        prefix = [0, *itertools.accumulate(est)]
        a = 0
        while len(out) < n:
            b = bisect.bisect_right(prefix, prefix[a] + room) - 1  # words[a:b] fit by the estimate
            if b >= len(words):
                break  # the rest does not fill a document
            m, tok = counter.fit(words[a:b], room)
            if m == 0:  # one word longer than a document: skip it
                a += 1
                continue
            out.append((words[a:a + m], [e - a for e in ends if a < e < a + m] + [m], tok))
            a += m
        return a

    if kind == "books":
        for book in _paragraphs(rows, field, by_blank_rows=False):
            words = [w for p in book for w in p]
            ends = list(itertools.accumulate(len(p) for p in book))
            cut(words, ends, counter.words(words))
            if len(out) == n:
                break
        return out
    cur, ends, est, total = [], [], [], 0  # paragraph stream: the document being filled
    for para in _paragraphs(rows, field, by_blank_rows=True):
        c = counter.words(para)
        if cur and total + sum(c) > room:  # full: the next paragraph would overflow it
            m, tok = counter.fit(cur, room)
            if m:
                out.append((cur[:m], [e for e in ends if e < m] + [m], tok))
            cur, ends, est, total = [], [], [], 0
            if len(out) == n:
                break
        cur += para
        est += c
        total += sum(c)
        ends.append(len(cur))
        if total > room:  # a paragraph longer than a whole document: cut it, the rest goes on
            used = cut(cur, ends, est)
            cur, est = cur[used:], est[used:]
            ends, total = [e - used for e in ends if e > used], sum(est)
            if len(out) == n:
                break
    return out


def _hf_docs(cfg: dict, length: int, n: int, tokenizer) -> tuple[list[dict], str]:
    rows = _rows(cfg)
    kind = dataset_kind(cfg, rows)
    src_lang, tgt_lang = cfg.get("src_lang"), cfg.get("tgt_lang")
    counter = _Counter(tokenizer)
    room = length - OVERHEAD
    if room < 1:
        raise ValueError(f"length {length} leaves no room for text after the {OVERHEAD}-token prompt allowance")
    if kind != "translation":
        made = _text_docs(rows, kind, cfg.get("text_field", "text"), room, n, counter)
        return [dict(id=i, src_lang=src_lang, tgt_lang=tgt_lang, source=" ".join(words), target="",
                     sent_ends=ends, n_tokens=OVERHEAD + tok, length=length)
                for i, (words, ends, tok) in enumerate(made)], kind

    count = counter.text
    docs, cur = [], dict(src=[], tgt=[], ends=[], tokens=OVERHEAD)
    if not (src_lang and tgt_lang):
        raise ValueError(f"dataset {_label(cfg)} holds translation pairs: give src_lang and tgt_lang")
    have = sorted(rows[0]["translation"]) if len(rows) else []
    for key, lang in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
        if lang not in have:
            raise ValueError(f"dataset {cfg.get('path')!r}: {key} {lang!r} is not among its languages {have}")

    def flush():
        if cur["src"]:
            docs.append(dict(id=len(docs), src_lang=src_lang, tgt_lang=tgt_lang, source=" ".join(cur["src"]),
                             target=" ".join(cur["tgt"]), sent_ends=list(cur["ends"]), n_tokens=cur["tokens"],
                             length=length))
        cur.update(src=[], tgt=[], ends=[], tokens=OVERHEAD)

    for row in rows:
        s, t = row["translation"][src_lang].split(), row["translation"][tgt_lang].split()
        if not s:
            continue
        need = count(" ".join(s)) + (count(" ".join(t)) if t else 0)
        if need + OVERHEAD > length:
            continue  # one sentence pair longer than a whole document: skip it
        if cur["tokens"] + need > length:
            flush()  # full: the next pair would overflow it
            if len(docs) == n:
                break
        cur["src"] += s
        cur["tgt"] += t
        cur["ends"].append(len(cur["src"]))
        cur["tokens"] += need
    return docs[:n], kind  # a last document the pairs ran out before filling is not kept


def _shortfall(kind: str) -> str:
    return {"books": "full documents from each row's start; a shorter row gives none, rows are not joined",
            "paragraphs": "the text stream holds fewer full documents at this length",
            "translation": "the split holds too few sentence pairs for that many full documents",
            **{b: "the subset holds fewer samples" for b in BENCHMARKS}}.get(kind, "")


def make_data(cfg: dict, length: int, n: int, seed: int, out: str, tokenizer=None,
              max_positions: int | None = None, name: str | None = None) -> int:
    """Build and save the documents of one (dataset, length); returns the number written.

    Prints (stdout: make-data's output and the Snakemake job's log) how many documents were made
    against how many were asked for; raises ValueError when an hf dataset gives fewer, unless its
    config says `allow_fewer: true` (never when it gives none). `name` is the dataset's name in the
    config, for the messages."""
    if max_positions is not None and length > max_positions:
        raise ValueError(f"length {length} is beyond the model's maximum positions ({max_positions})")
    if n < 1:
        raise ValueError(f"n_samples must be >= 1, got {n}")
    src = cfg.get("source", "synthetic")
    label = (f"{name!r} ({_label(cfg)})" if name else _label(cfg)) if src == "hf" else repr(name or src)
    kind = "synthetic"
    if src == "synthetic":
        docs = synthetic_docs(length, n, seed)
    elif src == "haystack":
        if tokenizer is None:
            raise ValueError("haystack documents are built to a token length: pass the model (--model DIR)")
        docs, kind = haystack_docs(length, n, seed, tokenizer), "haystack"
    elif src in BENCHMARKS:
        if tokenizer is None:
            raise ValueError(f"{src} documents are counted in tokens: pass the model (--model DIR)")
        docs, kind = benchmark_docs(cfg, length, n, tokenizer), src
    elif src == "hf":
        if tokenizer is None:
            raise ValueError("hf datasets are built to a token length: pass the model (--model DIR)")
        try:
            docs, kind = _hf_docs(cfg, length, n, tokenizer)
        except UnicodeDecodeError as e:  # raised while reading rows lazily: name what was read
            where = f"{cfg.get('path')!r}" + (f" (data_files {cfg['data_files']!r})" if cfg.get("data_files") else "")
            raise ValueError(f"dataset {where}: not UTF-8 text ({e})") from None
    else:
        raise ValueError(f"unknown dataset source {src!r}; use 'synthetic', 'hf', 'haystack' or one of {list(BENCHMARKS)}")
    if len(docs) < n and (not cfg.get("allow_fewer", False) or not docs):
        raise ValueError(f"dataset {label}, length {length}: made {len(docs)} of {n} documents asked for "
                         f"(kind {kind}: {_shortfall(kind)}); lower n_samples or the length, use a larger split, "
                         f"or set allow_fewer: true" + ("" if docs else " (which needs at least one)"))
    note = f" (allow_fewer: {n - len(docs)} short)" if len(docs) < n else ""
    print(f"make-data: dataset {label}, kind {kind}, length {length}: made {len(docs)} of {n} documents "
          f"asked for{note}", flush=True)
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
