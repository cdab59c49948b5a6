"""`longbench`, `infinitebench`, `loogle`: the real long-context benchmarks read through the method's cache,
one registered task per benchmark, each on datasets of its own source (`source: longbench` etc., with the
benchmark's `subset`; kvbench.longctx.loaders reads them through `datasets.load_dataset`).

A sample is the benchmark's context, then its question: the context is fed first (the cache compresses
while it reads, before the question is known), then the question and the assistant header, and the
answer is decoded greedily through the same session, up to the benchmark's own generation length for
the subset (`max_new_tokens: 0`) or the task parameter. `query_first` puts the question before the
context (for query-aware methods), labelled in every row.

Length: the job's length L bounds prompt + generation, as LongBench's `max_length` bounds the prompt.
A context that does not fit is cut in the middle (its first and last halves of the room kept), the cut
LongBench's `pred.py` makes; rows record the context tokens fed and the context's full token count. The
prompt's wording is kvbench's own (one template per metric family, not the benchmarks' prompt files);
LongBench's few-shot and code-completion subsets (trec, triviaqa, samsum, lsht, lcc, repobench-p) are
fed without the chat template, as LongBench feeds them.

Scores: the benchmark's official per-sample metric for the subset (kvbench.longctx.scoring, in [0, 1]);
rows carry it (`metric`), cells report its mean (`score`) with a bootstrap CI. Hub models only: the
builtin model cannot read English (refused before it loads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .base import param, register
from .long_common import Sample, ScoreCells, decode_greedy, encode, frame, one_group

# generation lengths of the benchmarks' own scripts (LongBench config/dataset2maxlen.json; InfiniteBench's
# max new tokens per task); LooGLE's are kvbench's choice (a short answer, a long summary)
MAX_NEW = {
    "longbench": {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
                  "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32,
                  "samsum": 128, "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64},
    "infinitebench": {"passkey": 6, "number_string": 12, "kv_retrieval": 50, "longbook_qa_eng": 40,
                      "longbook_choice_eng": 40, "longbook_sum_eng": 1200, "longdialogue_qa_eng": 40},
    "loogle": {"shortdep_qa": 64, "longdep_qa": 64, "shortdep_cloze": 64, "longdep_summarization": 512},
}
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})  # LongBench: raw completion

# (before the context, between context and question (holds {question}), answer cue); kvbench's wording
TEMPLATES = {
    "qa": ("Read the text below, then answer the question after it.\n\n", "\n\nQuestion: {question}\n"
           "Answer with the answer only, as briefly as possible.", "\nAnswer:"),
    "summary": ("Read the text below, then write a summary of it.\n\n", "\n\n{question}", "\nSummary:"),
    "fewshot": ("", "\n{question}", ""),
    "retrieval": ("Below are numbered paragraphs, then an abstract of one of them.\n\n", "\n\nAbstract: {question}\n"
                  "Which paragraph is the abstract from? Answer in the form \"Paragraph N\".", "\nAnswer:"),
    "count": ("Below are paragraphs, some of them repeated.\n\n", "\n\nHow many different paragraphs are there? "
              "Answer with one number.", "\nAnswer:"),
    "code": ("", "{question}", ""),
    "choice": ("Read the text below, then answer the question after it.\n\n", "\n\nQuestion: {question}\n{options}"
               "Answer with the letter of the correct option.", "\nAnswer:"),
    "cloze": ("Read the text below, then fill in the masks of the sentence after it.\n\n", "\n\nSentence: "
              "{question}\nGive each mask's entity as a JSON object from mask to entity.", "\nAnswer:"),
}
FAMILY = {"qa_f1": "qa", "rouge_l_recall": "qa", "first_int": "qa", "kv_retrieval": "qa", "dialogue": "qa",
          "rouge_l": "summary", "rouge_lsum": "summary", "classification": "fewshot", "retrieval": "retrieval",
          "count": "count", "code_sim": "code", "choice": "choice", "cloze_exact_match": "cloze"}


def long_sample(doc: dict):
    """The document's benchmark sample (kvbench.longctx.loaders.LongSample)."""
    from ..longctx.loaders import LongSample

    s = doc.get("sample")
    if not isinstance(s, dict):
        raise ValueError(f"sample {doc['id']}: not a long-context benchmark document (no `sample`: make it from a "
                         f"longbench / infinitebench / loogle dataset)")
    tup = ("answers", "options", "all_classes")
    return LongSample(context=doc["source"], **{k: tuple(v) if k in tup else v for k, v in s.items()})


def _template(ls, base: str) -> tuple[str, str, str]:
    family = "summary" if base == "longdep_summarization" else FAMILY[ls.metric]
    if ls.benchmark == "longbench" and base in ("trec", "triviaqa", "samsum"):
        family = "fewshot"
    before, mid, cue = TEMPLATES[family]
    options = "".join(f"{'ABCD'[i]}. {o}\n" for i, o in enumerate(ls.options[:4]))
    return before, mid.format(question=ls.question, options=options), cue


def middle_cut(ids: list[int], room: int) -> list[int]:
    """The first room // 2 and the last room - room // 2 tokens of ids (all of them if they fit)."""
    if len(ids) <= room:
        return ids
    half = room // 2
    return ids[:half] + (ids[len(ids) - (room - half):] if room - half else [])


def bench_sample(prompter, doc: dict, max_new_tokens: int, query_first: bool) -> tuple[Sample, object]:
    from ..streams import ROLE_INSTR, ROLE_SOURCE

    if prompter.builtin:
        raise ValueError("the long-context benchmarks are English (or code): they need a hub (HF tokenizer) model, "
                         "not the builtin one")
    ls = long_sample(doc)
    base = ls.subset.removesuffix("_e")  # LongBench-E subsets read as their LongBench subset
    n_new = max_new_tokens or MAX_NEW[ls.benchmark].get(base, 64)
    head, tail = (list(prompter.bos), []) if ls.benchmark == "longbench" and base in NO_CHAT else frame(prompter)
    before, mid, cue = _template(ls, base)
    pre, post = encode(prompter, before), encode(prompter, mid)
    tail = tail + encode(prompter, cue)
    context = encode(prompter, ls.context)
    room = int(doc["length"]) - len(head) - len(pre) - len(post) - len(tail) - n_new + 1
    if room < 1:
        raise ValueError(f"sample {doc['id']} ({ls.benchmark} {ls.subset}): length {doc['length']} leaves no room "
                         f"for the context after the prompt ({len(head) + len(pre) + len(post) + len(tail)} tokens) "
                         f"and {n_new} generated tokens")
    kept = middle_cut(context, room)
    if query_first:  # [head pre question] [context] [tail]
        parts, roles = [head + pre + post, kept, tail], [ROLE_SOURCE, ROLE_SOURCE, ROLE_INSTR]
    else:  # [head pre context] [question tail]
        parts, roles = [head + pre + kept, post + tail], [ROLE_SOURCE, ROLE_SOURCE]
    n = sum(len(p) for p in parts)
    info = dict(subtask=ls.subset, metric=ls.metric, context_tokens=len(kept), context_tokens_total=len(context))
    return Sample(one_group(parts, roles), next_pos=n, gen_role=ROLE_SOURCE, n_new=n_new, info=info), ls


class _Long:
    """What the three benchmark tasks share (each registered below as a `ScoreCells` dataclass)."""

    reads_context = True
    answer_tokens = 128  # GPU-hour estimates: between the QA subsets' 32-64 and the summaries' 512
    builtin = False
    columns = ("subtask", "metric", "prediction", "expected", "score", "query_first", "context_tokens",
               "context_tokens_total")

    def positions(self, prompter, doc: dict) -> tuple[int, int]:
        s, _ = bench_sample(prompter, doc, self.max_new_tokens, self.query_first)
        return s.n_tokens + s.n_new - 1, s.positions_needed()

    def run(self, session, prompter, doc: dict) -> dict:
        s, ls = bench_sample(prompter, doc, self.max_new_tokens, self.query_first)
        prediction = prompter.decode(decode_greedy(session, prompter, s))
        return dict(s.info, prediction=prediction, expected=json.dumps(list(ls.answers), ensure_ascii=False),
                    score=ls.score(prediction), query_first=self.query_first)


def _make(bench: str, order: int, summary: str):
    cls = type(f"Bench_{bench}", (_Long, ScoreCells), {
        "__module__": __name__, "__doc__": f"`{bench}`: {summary}.", "name": bench, "order": order,
        "summary": summary, "kinds": (bench,),
        "__annotations__": {"max_new_tokens": "int", "query_first": "bool"},
        "max_new_tokens": param(0, minimum=0, help="tokens generated at most (0: the benchmark's own length for "
                                                    "the subset)"),
        "query_first": param(False, help="the question before the context (for query-aware methods); labelled "
                                         "in every row"),
    })
    return register(dataclass(frozen=True)(cls))


for _i, (_b, _s) in enumerate((
        ("longbench", "LongBench (THUDM): QA, summaries, few-shot, retrieval, code; the subset's official metric"),
        ("infinitebench", "InfiniteBench: retrieval, book QA / choice / summary, dialogue; its official metric"),
        ("loogle", "LooGLE: short- and long-dependency QA, cloze, summaries; ROUGE-L recall / exact match"))):
    _make(_b, 10 + _i, _s)
