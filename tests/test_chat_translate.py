"""Streaming translation through the chat-model route (multi-token words) on a random-weight twin: a
model that never writes a word start still ends each word within the word cap, and the document
within its word cap, so no decoding loop can run away."""

import pytest

from kvbench import tasks
from kvbench.engine.session import Session
from kvbench.methods import REGISTRY
from kvbench.models import build_model, load_model
from kvbench.prompt import Prompter


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("twin") / "m")
    build_model("random:tiny-llama", d, seed=0)
    model, tok, _ = load_model(d)
    return model, tok, d


class Counting:
    """The session as the task sees it, failing once more tokens were fed than the caps allow."""

    def __init__(self, session, limit):
        self.s, self.limit, self.fed = session, limit, 0

    def __getattr__(self, name):
        return getattr(self.s, name)

    def feed(self, ids, *a, **kw):
        self.fed += len(ids)
        assert self.fed <= self.limit, f"{self.fed} tokens fed: the decoding loop ran past its caps"
        return self.s.feed(ids, *a, **kw)


@pytest.mark.parametrize("method,budget", [("full", None), ("h2o", 64)])
def test_words_and_documents_end_within_their_caps(twin, method, budget):
    model, tok, d = twin
    p = Prompter(tok, d, "en", "fr")
    doc = {"id": 0, "source": "The old house sleeps .", "target": "x"}
    src = p.words(doc["source"])
    words_cap = -(-3 * len(src) // 2) + 5
    limit = len(p.instruction()) + sum(map(len, src)) + len(p.target_start()) + words_cap * tasks.max_word_tokens(src)
    session = Counting(Session(model, REGISTRY[method](), budget, 16), limit)
    out = tasks.translate(session, p, doc, k=3)
    assert out["hyp_words"] <= words_cap and len(out["delays"]) == out["hyp_words"]
    assert out["stop_reason"] in ("eos", "length_cap")


def test_word_cap():
    assert tasks.max_word_tokens([[1, 2], [3]]) == 16
    assert tasks.max_word_tokens([[0] * 10]) == 40


@pytest.mark.parametrize("task", ["ppl", "latency"])
def test_ppl_and_latency_read_translation_documents_through_the_chat_prompt(twin, task, tmp_path):
    """A translation dataset scored for perplexity or latency is the teacher-forced wait-k stream,
    whose chat instruction names both languages (the paper grid runs ppl on IWSLT): a hand-run eval
    on a chat model must not lose the source language."""
    import json

    import pandas as pd

    from kvbench.evaluate import run_eval

    _, _, d = twin
    data = tmp_path / "L128.jsonl"
    doc = dict(id=0, source="the cat sat on the mat today", target="le chat est assis sur le tapis",
               src_lang="en", tgt_lang="fr")
    data.write_text(json.dumps(doc) + "\n")
    out = run_eval(model_dir=d, task=task, data=str(data), method="h2o", method_type="h2o", params={},
                   budget=16, length=128, out=str(tmp_path / "r.parquet"),
                   task_params={"wait_k": 3, "n_decode": 2, "warmup": 1})
    row = pd.read_parquet(out).iloc[0]
    assert (row["n_scored_tokens"] > 0) if task == "ppl" else (row["decode_ms_median"] > 0)


@pytest.mark.parametrize("k", [3, 10**6])
def test_a_degenerate_translation_stops_at_the_token_cap(twin, k):
    """max_len_a * |src| + max_len_b in target tokens: the twin never ends a translation by itself;
    with one long word in the source, the word cap alone would let it write ~5x the source's tokens.
    Streaming and batch end within 2 x the source's tokens + 10 (batch exactly there), labelled
    length_cap."""
    from kvbench.tasks.translation import TOKEN_CAP_A, TOKEN_CAP_B

    model, tok, d = twin
    p = Prompter(tok, d, "en", "fr")
    doc = {"id": 0, "source": " ".join(["extraordinarily", "a", "of", "to", "an"] * 6), "target": "x"}
    src_tokens = sum(map(len, p.words(doc["source"])))
    token_cap = TOKEN_CAP_A * src_tokens + TOKEN_CAP_B
    limit = len(p.instruction()) + src_tokens + len(p.target_start()) + token_cap
    session = Counting(Session(model, REGISTRY["full"](), None, 16), limit)
    out = tasks.translate(session, p, doc, k=k)
    assert out["stop_reason"] == "length_cap"  # Counting fails beyond the token cap
    if k > len(doc["source"].split()):  # batch: the word cap would allow more, the token cap binds
        assert session.fed == limit - 1, (session.fed, limit)  # token_cap written; the last one is never fed
