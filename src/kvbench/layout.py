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
ROLE_NAMES = {ROLE_INSTR: "instruction", ROLE_SOURCE: "source", ROLE_TARGET: "target"}
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
