"""Token streams for simultaneous translation: wait-k schedule and Group Position Encoding (GPE).

A stream is the sequence of tokens in the order the model sees them, with per-token role and
position. Training (builtin model) and inference (engine) build streams with the same code, so the
model is trained on exactly the layout it is evaluated on.

- Roles: INSTR (prompt), SOURCE, TARGET.
- GPE (Zhao et al. 2024, "LLMs can achieve high-quality simultaneous machine translation as
  efficiently as offline"): the instruction and source form one position group (0, 1, 2, ...);
  target tokens form another, starting at `target_offset`. Source tokens never attend to target
  tokens, so reading more source never re-encodes anything already cached.
- wait-k (Ma et al. 2019): read k source words, then alternate WRITE one target word / READ one
  source word until the source is exhausted, then write the rest.
- The target side is fed as a decoder-only LM feeds it: a start marker, then each target word once
  it is chosen. The token fed at target index j predicts target word j, so its query sits in the
  target position group right after the words it continues, with the source read so far (k + j
  words) in the cache. `labels` holds, for every target token, the next target token (EOS last).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROLE_INSTR, ROLE_SOURCE, ROLE_TARGET = 0, 1, 2
WAIT_INF = 10**9  # k >= |source|: the oracle (batch) layout


@dataclass
class Stream:
    ids: list[int]
    pos: list[int]
    role: list[int]
    # for each target token: number of source words read when it was fed
    delay: list[int]
    labels: list[int] | None = None  # next target token for target tokens, -100 elsewhere

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.tensor(self.ids, dtype=torch.long),
            torch.tensor(self.pos, dtype=torch.long),
            torch.tensor(self.role, dtype=torch.long),
        )


def reads_before_write(j: int, k: int, n_src: int) -> int:
    """Source words read before target word j (0-based) is written under wait-k."""
    return min(k + j, n_src)


def build_stream(
    instr: list[int],
    src_words: list[list[int]],
    tgt_words: list[list[int]],
    k: int,
    target_offset: int = 0,
    eos: int | None = None,
) -> Stream:
    """Interleave source and target words by wait-k. `tgt_words` are the fed target words: the start
    marker first, then the translation (EOS is only ever a label, given by `eos`)."""
    if k < 1:
        raise ValueError(f"wait-k needs k >= 1, got {k}")
    s = Stream([], [], [], [])
    src_pos = 0
    tgt_pos = target_offset

    def put(tokens: list[int], role: int) -> None:
        nonlocal src_pos, tgt_pos
        for t in tokens:
            s.ids.append(t)
            s.role.append(role)
            if role == ROLE_TARGET:
                s.pos.append(tgt_pos)
                tgt_pos += 1
            else:
                s.pos.append(src_pos)
                src_pos += 1

    put(instr, ROLE_INSTR)
    read = 0
    for j, word in enumerate(tgt_words):
        want = reads_before_write(j, k, len(src_words))
        while read < want:
            put(src_words[read], ROLE_SOURCE)
            read += 1
        put(word, ROLE_TARGET)
        s.delay.extend([read] * len(word))
    while read < len(src_words):
        put(src_words[read], ROLE_SOURCE)
        read += 1
    tgt_idx = [i for i, r in enumerate(s.role) if r == ROLE_TARGET]
    s.labels = [-100] * len(s.ids)
    for a, b in zip(tgt_idx, tgt_idx[1:]):
        s.labels[a] = s.ids[b]
    if tgt_idx and eos is not None:
        s.labels[tgt_idx[-1]] = eos
    return s


def stream_mask(role: torch.Tensor) -> torch.Tensor:
    """Boolean (T, T) mask, True = may attend: causal in stream order, and non-target queries
    never see target keys (GPE)."""
    t = role.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    q_is_tgt = (role == ROLE_TARGET).unsqueeze(-1)  # (T, 1)
    k_is_tgt = (role == ROLE_TARGET).unsqueeze(-2)  # (1, T)
    return causal & (q_is_tgt | ~k_is_tgt)


# ---- re-indexed positions (StreamingLLM under eviction) -------------------------------------------
REINDEX_MODES = ("shifted", "cache")


@dataclass(frozen=True)
class PositionRule:
    """How a method re-indexes RoPE positions once entries are evicted (declared by the method, applied
    by the engine to unrotated keys at every forward, so nothing drifts).

    - `shifted` (GPE-consistent): the first `n_sink` tokens of the stream (the sinks) keep their
      positions; every other entry takes its original position minus one shift `s` shared by both
      position groups, `s` = the smallest advance among the groups, where a group's advance is how
      far its oldest cached non-sink entry is past the group's first non-sink position. Every offset
      between non-sink entries, within a group and across groups (source - target), keeps its value
      without eviction. With one group this is StreamingLLM's rank in the cache. `max_lead` W bounds
      how far one group's advance may run ahead of the other's (only the oracle layout, the whole
      source before the target, comes near it): beyond W the leading group is shifted further, so
      its offsets to the other group shrink to W. Positions then stay in [0, B + W] (+ the target
      group's first position, `target_offset`) for a one-token step at budget B, and in
      [0, B + W + n - 1] for a chunk of n new tokens.
    - `cache` (per-group ranks; an ablation): every entry takes its rank among the cached entries
      of its own group, from the group's first position. The source group loses more entries than
      the target group, so the source-target offset the model was trained on collapses.
    """

    mode: str
    n_sink: int = 0
    max_lead: int | None = None  # W in positions; None: the budget

    def __post_init__(self):
        if self.mode not in REINDEX_MODES:
            raise ValueError(f"position re-indexing mode must be one of {REINDEX_MODES}, got {self.mode!r}")

    def bound(self, budget: int, target_offset: int = 0) -> int:
        """Largest position a query or key can be given under this rule at budget B (per-head budgets:
        the largest), whatever the stream's length: B + W + target_offset for `shifted` (W = max_lead,
        default B), B + target_offset for `cache` (ranks)."""
        if self.mode == "cache":
            return budget + target_offset
        return budget + (self.max_lead if self.max_lead is not None else budget) + target_offset


def reindexed_positions(rule: PositionRule, pos: torch.Tensor, seq: torch.Tensor, role: torch.Tensor,
                        valid: torch.Tensor, first: dict, max_lead: int, ordered: bool = True) -> torch.Tensor:
    """Positions (H, C) long of the cached entries of one layer under `rule`.

    pos, seq, role, valid: (H, C) slot metadata (original position, stream index, role, live); slots
    of each head in stream order when `ordered`, else ranked by seq. `first[(g, sink)]`: for group g (True = target), the original
    position of the group's first token (`("all", g)`) and of its first non-sink token
    (`("nonsink", g)`), as seen by the session. Padding slots get their original position."""
    is_t = role == ROLE_TARGET
    out = pos.clone()
    if rule.mode == "cache":
        by_age = None if ordered else torch.argsort(seq, dim=1, stable=True)
        for g in (False, True):
            m = valid & (is_t == g)
            if by_age is None:
                rank = torch.cumsum(m, dim=1) - 1
            else:  # cumsum in stream order, scattered back to the slots
                rank = torch.empty_like(seq).scatter_(1, by_age, torch.cumsum(m.gather(1, by_age), dim=1) - 1)
            out = torch.where(m, first.get(("all", g), 0) + rank, out)
        return out
    sink = seq < rule.n_sink
    ns = valid & ~sink
    big = torch.iinfo(torch.long).max // 4
    adv = []
    for g in (False, True):
        m = ns & (is_t == g)
        lo = torch.where(m, pos, big).min(dim=1, keepdim=True).values  # (H, 1)
        adv.append(torch.where(lo < big, lo - first.get(("nonsink", g), 0), big))
    s = torch.minimum(adv[0], adv[1])
    s = torch.where(s < big, s, 0).clamp(min=0)  # (H, 1) shared shift
    extra = [torch.where(a < big, (a - s - max_lead).clamp(min=0), 0) for a in adv]  # beyond W
    shift = s + torch.where(is_t, extra[1], extra[0])
    return torch.where(ns, pos - shift, out)
