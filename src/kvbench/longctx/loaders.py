"""LongBench, InfiniteBench and LooGLE through `datasets.load_dataset`, as uniform samples.

Each loader makes the real call (hub repository, config or split as the benchmark documents it) and
maps the dataset's own column layout to `LongSample` (context, question, answers, subset, metric name
in `scoring.METRICS`). `path`/`data_files` override the source: with `data_files` and no `path`, the
files are read by the `json` builder, so tests and offline runs use local JSONL in the real layout.

Layouts and official metrics:
- LongBench (THUDM/LongBench, config = subset, split "test"; LongBench-E configs end in "_e"): one row
  per sample, {input, context, answers, length, dataset, language, all_classes, _id}; `input` is the
  question. Metric per subset from LongBench's `eval.py` (`LONGBENCH_METRICS`). The Chinese subsets
  (multifieldqa_zh, dureader, vcsum, lsht, passage_retrieval_zh) need jieba-based metrics that
  `scoring` does not have: they raise.
- InfiniteBench (xinrongzhang2022/InfiniteBench, split = task): {id, context, input, answer, options},
  read with InfiniteBench's explicit features (answer and options are lists of strings). For En.MC the
  answers become [option text, letter], as InfiniteBench's `get_answer` builds them. Supported: the
  retrieval, English book QA / choice / summary and dialogue tasks (`INFINITEBENCH_METRICS`).
- LooGLE (bigainlco/LooGLE, config = task, split "test"): one row per document, {input, title,
  qa_pairs, output}; `qa_pairs` is a string holding a Python list of {"Q", "A", "S"[, "type"]} (or
  "none" for summarisation, whose reference is `output`). A document gives one sample per pair. Cloze
  answers are mask -> entity dicts, kept as JSON text.

Note: the hub repositories of LongBench and LooGLE are built by loading scripts, which `datasets` >= 4
no longer runs; point `data_files` at their released JSONL files (LongBench's data.zip, LooGLE's
data.zip) or at a parquet conversion when the hub call refuses.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import scoring

LONGBENCH_PATH = "THUDM/LongBench"
INFINITEBENCH_PATH = "xinrongzhang2022/InfiniteBench"
LOOGLE_PATH = "bigainlco/LooGLE"

LONGBENCH_METRICS = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1", "musique": "qa_f1", "triviaqa": "qa_f1",
    "gov_report": "rouge_l", "qmsum": "rouge_l", "multi_news": "rouge_l", "samsum": "rouge_l",
    "trec": "classification", "passage_retrieval_en": "retrieval", "passage_count": "count",
    "lcc": "code_sim", "repobench-p": "code_sim",
}
LONGBENCH_UNSUPPORTED = {
    "multifieldqa_zh": "qa_f1_zh", "dureader": "rouge_zh", "vcsum": "rouge_zh", "lsht": "classification (zh)",
    "passage_retrieval_zh": "retrieval_zh",
}
INFINITEBENCH_METRICS = {
    "passkey": "first_int", "number_string": "first_int", "kv_retrieval": "kv_retrieval",
    "longbook_qa_eng": "qa_f1", "longbook_choice_eng": "choice", "longbook_sum_eng": "rouge_lsum",
    "longdialogue_qa_eng": "dialogue",
}
INFINITEBENCH_UNSUPPORTED = ("longbook_qa_chn", "math_find", "math_calc", "code_run", "code_debug")
LOOGLE_METRICS = {
    "shortdep_qa": "rouge_l_recall", "longdep_qa": "rouge_l_recall", "longdep_summarization": "rouge_l_recall",
    "shortdep_cloze": "cloze_exact_match",
}

LONGBENCH_COLUMNS = ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id")
INFINITEBENCH_COLUMNS = ("id", "context", "input", "answer", "options")
LOOGLE_COLUMNS = ("input", "title", "qa_pairs", "output")


@dataclass(frozen=True)
class LongSample:
    """One sample of a real long-context benchmark, whatever its source layout.

    `answers` are the references `scoring.score(metric, ...)` expects; `options` the choices of a
    multiple-choice task; `all_classes` a classification task's label set; `meta` the rest worth
    keeping (LongBench's length and language, LooGLE's title and question type).
    """

    benchmark: str
    subset: str
    id: str
    context: str
    question: str
    answers: tuple[str, ...]
    metric: str
    options: tuple[str, ...] = ()
    all_classes: tuple[str, ...] = ()
    meta: Mapping = field(default_factory=dict)

    def score(self, prediction: str) -> float:
        """This sample's official per-sample score of `prediction`, in [0, 1]."""
        first_line = _longbench_base(self.subset) if self.benchmark == "longbench" else None
        return scoring.score(self.metric, prediction, self.answers, all_classes=self.all_classes, subset=first_line)


def _longbench_base(subset: str) -> str:
    return subset[:-2] if subset.endswith("_e") else subset


def _rows(path: str | None, default_path: str, *, name: str | None, data_files, split: str, features=None):
    import datasets

    kw = {}
    if data_files is not None:
        kw["data_files"] = data_files if isinstance(data_files, Mapping) else {split: data_files}
        path = path or "json"
    else:
        path = path or default_path
        if name is not None:
            kw["name"] = name
    if features is not None:
        kw["features"] = features
    try:
        return datasets.load_dataset(path, split=split, **kw)
    except Exception as e:  # noqa: BLE001 - offline, missing file, wrong layout: say what was asked for
        where = f"{path!r}" + (f" config {name!r}" if "name" in kw else "") + f" split {split!r}" \
            + (f" data_files {kw['data_files']!r}" if "data_files" in kw else "")
        raise ValueError(f"cannot load {where}: {type(e).__name__}: {e}") from e


def _check_columns(ds, expected: Sequence[str], what: str) -> None:
    missing = [c for c in expected if c not in ds.column_names]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; the layout is {list(expected)}, "
                         f"the data has {ds.column_names}")


def _take(ds, limit: int | None):
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def load_longbench(subset: str, *, path: str | None = None, data_files=None, split: str = "test",
                   limit: int | None = None) -> list[LongSample]:
    """LongBench (or LongBench-E, subset "<name>_e") as uniform samples with the subset's metric."""
    base = _longbench_base(subset)
    if base in LONGBENCH_UNSUPPORTED:
        raise ValueError(f"LongBench subset {subset!r} needs the jieba-based metric "
                         f"{LONGBENCH_UNSUPPORTED[base]!r}, which kvbench does not have; "
                         f"supported: {sorted(LONGBENCH_METRICS)}")
    if base not in LONGBENCH_METRICS:
        raise ValueError(f"unknown LongBench subset {subset!r}; supported: {sorted(LONGBENCH_METRICS)}")
    ds = _rows(path, LONGBENCH_PATH, name=subset, data_files=data_files, split=split)
    _check_columns(ds, LONGBENCH_COLUMNS, f"LongBench {subset}")
    out = []
    for row in _take(ds, limit):
        if row["dataset"] not in (None, subset, base):
            raise ValueError(f"LongBench {subset}: a row of dataset {row['dataset']!r} (id {row['_id']!r})")
        answers = tuple(str(a) for a in row["answers"])
        if not answers:
            raise ValueError(f"LongBench {subset}: row {row['_id']!r} has no answers")
        classes = tuple(row["all_classes"] or ())
        if LONGBENCH_METRICS[base] == "classification" and not classes:
            raise ValueError(f"LongBench {subset}: row {row['_id']!r} has no all_classes")
        out.append(LongSample(benchmark="longbench", subset=subset, id=str(row["_id"]), context=row["context"],
                              question=row["input"] or "", answers=answers, metric=LONGBENCH_METRICS[base],
                              all_classes=classes, meta={"length": row["length"], "language": row["language"]}))
    return out


def _infinitebench_features():
    from datasets import Features, List, Value

    return Features({"id": Value("int64"), "context": Value("string"), "input": Value("string"),
                     "answer": List(Value("string")), "options": List(Value("string"))})


def load_infinitebench(task: str, *, path: str | None = None, data_files=None, split: str | None = None,
                       limit: int | None = None) -> list[LongSample]:
    """InfiniteBench task (the hub split of that name) as uniform samples with the task's metric."""
    if task in INFINITEBENCH_UNSUPPORTED:
        raise ValueError(f"InfiniteBench task {task!r} has no metric in kvbench.longctx.scoring; "
                         f"supported: {sorted(INFINITEBENCH_METRICS)}")
    if task not in INFINITEBENCH_METRICS:
        raise ValueError(f"unknown InfiniteBench task {task!r}; supported: {sorted(INFINITEBENCH_METRICS)}")
    ds = _rows(path, INFINITEBENCH_PATH, name=None, data_files=data_files, split=split or task,
               features=_infinitebench_features())
    _check_columns(ds, INFINITEBENCH_COLUMNS, f"InfiniteBench {task}")
    out = []
    for row in _take(ds, limit):
        answers, options = tuple(row["answer"] or ()), tuple(row["options"] or ())
        if not answers:
            raise ValueError(f"InfiniteBench {task}: row {row['id']} has no answer")
        if task == "longbook_choice_eng":
            answers = _choice_labels(answers, options, row["id"])
        out.append(LongSample(benchmark="infinitebench", subset=task, id=str(row["id"]), context=row["context"],
                              question=row["input"] or "", answers=answers, metric=INFINITEBENCH_METRICS[task],
                              options=options))
    return out


def _choice_labels(answers: tuple[str, ...], options: tuple[str, ...], row_id) -> tuple[str, str]:
    # InfiniteBench's get_answer: [text, letter], the letter being the option's position
    if len(answers) == 2 and answers[1] in ("A", "B", "C", "D"):
        return answers
    if len(answers) == 1 and answers[0] in options[:4]:
        return answers[0], "ABCD"[options.index(answers[0])]
    raise ValueError(f"InfiniteBench longbook_choice_eng: row {row_id}: answer {list(answers)} is not one of the "
                     f"options {list(options)}")


def load_loogle(task: str, *, path: str | None = None, data_files=None, split: str = "test",
                limit: int | None = None) -> list[LongSample]:
    """LooGLE task as uniform samples, one per question of each document (`limit` counts documents)."""
    if task not in LOOGLE_METRICS:
        raise ValueError(f"unknown LooGLE task {task!r}; supported: {sorted(LOOGLE_METRICS)}")
    ds = _rows(path, LOOGLE_PATH, name=task, data_files=data_files, split=split)
    _check_columns(ds, LOOGLE_COLUMNS, f"LooGLE {task}")
    out = []
    for d, row in enumerate(_take(ds, limit)):
        meta = {"title": row["title"]}
        if task == "longdep_summarization":
            out.append(LongSample(benchmark="loogle", subset=task, id=f"{d}", context=row["input"], question="",
                                  answers=(row["output"],), metric=LOOGLE_METRICS[task], meta=meta))
            continue
        for q, pair in enumerate(_qa_pairs(row["qa_pairs"], task, d)):
            answer = pair["A"]
            answer = json.dumps(answer, ensure_ascii=False) if isinstance(answer, dict) else str(answer)
            out.append(LongSample(benchmark="loogle", subset=task, id=f"{d}-{q}", context=row["input"],
                                  question=pair["Q"], answers=(answer,), metric=LOOGLE_METRICS[task],
                                  meta={**meta, "type": pair.get("type"), "evidence": list(pair.get("S") or [])}))
    return out


def _qa_pairs(raw, task: str, doc: int) -> list[dict]:
    # the hub stores the list as a Python literal string; parse it without executing it
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"LooGLE {task}: document {doc}: qa_pairs is not a list literal: {e}") from e
    if not isinstance(raw, list) or not all(isinstance(p, dict) and "Q" in p and "A" in p for p in raw):
        raise ValueError(f"LooGLE {task}: document {doc}: qa_pairs must be a list of {{'Q', 'A', 'S'}} dicts")
    return raw


LOADERS = {"longbench": load_longbench, "infinitebench": load_infinitebench, "loogle": load_loogle}
