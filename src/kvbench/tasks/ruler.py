"""`ruler_niah_multikey`, `ruler_niah_multivalue`, `ruler_vt`, `ruler_cwe`: a RULER subset read
through the method's cache (kvbench.longctx.ruler), one registered task per subtask, seeded per
document, at the job's length, scored as RULER scores them (`string_match_all`: the share of the
reference answers found in the prediction, case-insensitive). The prompt is the chat template's user
message (RULER's context and question), then the assistant header and RULER's answer prefix; the context is fed first (the cache compresses
while reading it), then the question, and RULER's `tokens_to_generate` are decoded greedily through
the same session. Prompt + generation fit in the length. The NIAH subtasks hide their needles in the
document's text (a `source: haystack` dataset's filler, or any text document); vt and cwe make their
own noise. Meant for instruction-following hub models; the builtin model cannot read the English
instructions (refused before the model loads); a random-weight model runs it (scores near zero).

Row columns: subtask (`vt_zeroshot` where vt's one-shot example does not fit its 500 tokens: a
byte-level tokenizer), prediction, expected (the reference answers as a JSON list), score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..longctx import ruler as lruler
from ..longctx.ruler import TASKS as SUBTASKS
from .base import register
from .long_common import AccuracyCells, Sample, counter, decode_greedy, encode, frame, one_group, sample_seed


def ruler_sample(prompter, doc: dict, subtask: str) -> tuple[Sample, object]:
    from ..longctx import ruler
    from ..longctx.haystack import TextFiller
    from ..streams import ROLE_INSTR, ROLE_SOURCE

    if prompter.builtin:
        raise ValueError("ruler reads English instructions: it needs a hub (HF tokenizer) model, not the builtin one")
    head, tail = frame(prompter)
    room = int(doc["length"]) - len(head) - len(tail)  # RULER fits input + tokens_to_generate in it
    extra = {"filler": TextFiller([doc["source"]])} if subtask.startswith("niah") else {}
    label = subtask
    try:
        s = ruler.TASKS[subtask](counter(prompter), length=room, seed=sample_seed(doc), index=int(doc["id"]), **extra)
    except ValueError as e:
        if "vt example" not in str(e):
            raise
        # RULER fits vt's one-shot example to 500 tokens, which 5 noise blocks pass under a byte-level
        # tokenizer (the random-weight twins): such a model reads vt without it, labelled in the row
        s = ruler.vt(counter(prompter), length=room, seed=sample_seed(doc), index=int(doc["id"]), fewshot=False)
        label = "vt_zeroshot"
    parts = [head + encode(prompter, s.context), encode(prompter, s.question), tail + encode(prompter, s.answer_prefix)]
    feeds = one_group(parts, [ROLE_SOURCE, ROLE_SOURCE, ROLE_INSTR])
    n = sum(len(p) for p in parts)
    return Sample(feeds, next_pos=n, gen_role=ROLE_SOURCE, n_new=ruler.TOKENS_TO_GENERATE[subtask],
                  info={"subtask": label}), s


@dataclass(frozen=True)
class RulerTask(AccuracyCells):
    """One RULER subtask; the four are registered below as `ruler_<subtask>`, so a study can list
    several and each gets its own cells (a parameter would give one subtask per config)."""

    subtask = ""
    kinds = ("haystack",)
    builtin = False  # English instructions: refused on the builtin model (`positions`, before it loads)
    columns = ("subtask", "prediction", "expected", "score")
    reads_context = True

    def positions(self, prompter, doc: dict) -> tuple[int, int]:
        s, _ = ruler_sample(prompter, doc, self.subtask)
        return s.n_tokens + s.n_new - 1, s.positions_needed()

    def run(self, session, prompter, doc: dict) -> dict:
        from ..longctx.scoring import score

        s, r = ruler_sample(prompter, doc, self.subtask)
        prediction = prompter.decode(decode_greedy(session, prompter, s))
        return dict(subtask=s.info["subtask"], prediction=prediction, expected=json.dumps(list(r.answers)),
                    score=score(r.metric, prediction, r.answers))


for _i, (_sub, _summary) in enumerate((
        ("niah_multikey", "RULER multi-key NIAH: one of four keys asked"),
        ("niah_multivalue", "RULER multi-value NIAH: the four values of one key"),
        ("vt", "RULER variable tracking: every variable of a 4-hop chain"),
        ("cwe", "RULER common-words extraction: the 10 most frequent words"))):
    assert _sub in SUBTASKS
    register(dataclass(frozen=True)(type(f"Ruler_{_sub}", (RulerTask,), {
        "name": f"ruler_{_sub}", "order": 6 + _i, "summary": _summary, "subtask": _sub,
        "answer_tokens": lruler.TOKENS_TO_GENERATE[_sub],
        "__module__": __name__, "__doc__": f"`ruler_{_sub}`: {_summary}."})))
