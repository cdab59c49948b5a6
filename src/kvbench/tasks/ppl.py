"""`ppl`: NLL per token of a document read through the method's cache (eviction applies while
reading). A translation document is the teacher-forced wait-k stream scored on target tokens; plain
text is scored on every token after the first. Fed in `chunk_size` pieces: the session evicts inside
a piece token by token (stepwise), so every scored token is predicted from at most B cached entries
per head (+ itself) and the value equals the token-by-token one (as StreamingLLM evaluates it)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .common import DocumentTask, document_stream


def perplexity(session, prompter, doc: dict, k: int, target_offset: int = 0) -> dict:
    import torch

    s, labels = document_stream(prompter, doc, k, target_offset)
    nll, n, c = 0.0, 0, session.chunk_size
    for a in range(0, len(s.ids), c):
        b = min(a + c, len(s.ids))
        logits = session.feed(s.ids[a:b], s.pos[a:b], s.role[a:b], logits="all").float()  # (n, V)
        lab = labels[a:b].to(logits.device)
        m = lab >= 0
        if bool(m.any()):
            lp = torch.log_softmax(logits[m], dim=-1)
            nll -= float(lp.gather(1, lab[m][:, None]).sum())
            n += int(m.sum())
    return dict(nll_sum=nll, n_scored_tokens=n, nll_per_token=nll / max(n, 1))


@register
@dataclass(frozen=True)
class Ppl(DocumentTask):
    name = "ppl"
    order = 2
    summary = "perplexity through the cache"
    columns = ("nll_sum", "n_scored_tokens", "nll_per_token")

    def run(self, session, prompter, doc: dict) -> dict:
        return perplexity(session, prompter, doc, self.wait_k, self.target_offset)

    def cell(self, g) -> dict:
        from ..metrics import perplexity as ppl

        if g["n_scored_tokens"].sum() <= 0:
            return {}
        return {"perplexity": ppl(float(g["nll_sum"].sum()), int(g["n_scored_tokens"].sum()))}

    def cell_ci(self, g, n_resamples: int, seed: int) -> dict:
        from ..stats import perplexity_ci

        if g["n_scored_tokens"].sum() <= 0:
            return {}
        return perplexity_ci(g["nll_sum"].astype(float), g["n_scored_tokens"].astype(float), n_resamples, seed)
