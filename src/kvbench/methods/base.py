"""Method registry and the base class every KV policy extends.

A method is a small dataclass registered by type name; its fields are its config keys and its repr
goes into every result row. It declares what it needs as class attributes, and the engine reads
those (never the method's name):
- `needs_scores`: the attention function hands accumulated attention to the store.
- `needs_profile`: the eval job needs `results/heads/{model}.parquet` (head-aware methods).
- `evicts`: False only for the full cache.
- `cache_positions`: keys are re-rotated to their rank within the cache after eviction (StreamingLLM).
- `entries_only`: `select` reads only the entries and the budgets (no scores, types or layer index),
  so layers holding the same entries keep the same ones (the engine reuses the mask, after checking).
- `rowwise`: `select` decides each head's row from that row alone, so the engine may select for
  several layers at once, their heads stacked into one view (`layer` is then -1).
- `storage`: "dense" or "quant" (bit-packed storage, see kvbench.quant). A "quant" method says what
  it wants stored as data, `quant_spec(layer, n_heads, types) -> QuantSpec`; the engine builds the store from
  it and converts the budget into tokens per head (kvbench.engine.budget). A method never imports
  the engine and keeps no state of a session: what it needs at selection time comes in the view.

The one method-specific hook is `select(view, budgets)`: given one layer's live entries, return
which to keep, at most budgets[h] per KV head h (tokens, after the engine's byte conversion).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import torch

REGISTRY: dict[str, type["Method"]] = {}


@dataclass(frozen=True)
class HiRule:
    """Which tokens a quantized store keeps at high precision: the first `n_sink` of the stream and,
    with `detect`, key-norm outliers (norm > threshold x the running EMA of norms, decay `decay`)."""

    n_sink: int
    decay: float
    threshold: float
    detect: bool


@dataclass(frozen=True)
class QuantSpec:
    """The storage a quantized method asks for in one layer (data only; kvbench.engine.qstore):
    bits per KV head for keys and values (16 = unquantized), group size G, a full-precision window of
    the last `residual` tokens, and a high-precision tier of at most `max_hi` tokens per head chosen
    by `hi_rule`, stored at `hi_bits` (keys, values)."""

    key_bits: tuple[int, ...]
    value_bits: tuple[int, ...]
    group_size: int
    residual: int
    hi_bits: tuple[int, int] = (16, 16)
    max_hi: int = 0
    hi_rule: HiRule | None = None


def register(cls):
    REGISTRY[cls.type_name] = cls
    return cls


@dataclass
class Method:
    type_name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_scores: ClassVar[bool] = False
    needs_profile: ClassVar[bool] = False
    evicts: ClassVar[bool] = True
    storage: ClassVar[str] = "dense"
    layout: ClassVar[str] = "dense"  # "grouped_per_head": heads stored in groups of equal budget
    # select() reads only the view's entries (seq, pos, role, valid, ordered) and the budgets, never
    # scores, head types or the layer index: the engine may reuse one layer's mask for another
    # holding the same entries under the same budgets (it checks that they are the same)
    entries_only: ClassVar[bool] = False
    # select() decides each KV head's row from that row alone (and its budget, type and the view's
    # slot order): the engine may stack the rows of several layers into one view
    rowwise: ClassVar[bool] = False

    @property
    def cache_positions(self) -> bool:
        return False

    def validate(self, budget: int | None) -> None:
        """Raise ValueError for parameter values that cannot work at this budget."""

    def head_budgets(self, budget: int, n_layers: int, n_heads: int, profile=None) -> torch.Tensor:
        """(L, H) integer token budget per layer and KV head; uniform unless overridden."""
        return torch.full((n_layers, n_heads), budget, dtype=torch.long)

    def select(self, view: "LayerView", budgets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quant_spec(self, layer: int, n_heads: int, types: list[str] | None) -> QuantSpec | None:
        """The storage of `layer` (storage "quant" only): n_heads KV heads, their profiled types."""
        return None

    def params(self) -> dict:
        return dataclasses.asdict(self)

    def params_json(self) -> str:
        return json.dumps(self.params(), sort_keys=True)


@dataclass
class LayerView:
    """What a selection rule sees of one layer: (H, C) tensors, live entries where valid.
    `ordered`: the store keeps each head's slots in stream order (then ranks are a cumsum).
    `types`: the layer's profiled head types as (H,) bool masks by type name (None: no profile);
    `kinds`: the same on the host, one type name per head (a rule may skip what no head needs)."""

    seq: torch.Tensor
    pos: torch.Tensor
    role: torch.Tensor
    valid: torch.Tensor
    score: torch.Tensor | None
    layer: int = -1
    ordered: bool = False
    types: dict[str, torch.Tensor] | None = None
    kinds: tuple[str, ...] | None = None

    def is_type(self, name: str) -> torch.Tensor:
        """(H, 1) bool: the heads profiled as `name`."""
        if self.types is None:
            raise ValueError(f"layer {self.layer}: no head profile, cannot tell {name!r} heads")
        m = self.types.get(name)
        return (m if m is not None else self.valid.new_zeros(self.valid.shape[0]))[:, None]

    def age_order(self) -> torch.Tensor:
        """(H, C) slots of each head from its oldest live entry to its newest, invalid slots last
        (a view whose slots are out of stream order, `ordered` False; computed once per view)."""
        order = self.__dict__.get("_order")
        if order is None:
            big = torch.iinfo(torch.long).max
            key = torch.where(self.valid, self.seq, torch.full_like(self.seq, big))
            order = self.__dict__["_order"] = torch.argsort(key, dim=1)
        return order

    def age_rank(self) -> torch.Tensor:
        """(H, C): 0 for the oldest live entry of each head, counting up; invalid slots get C."""
        rank = self.__dict__.get("_rank")  # computed once per view: rules composed on it share it
        if rank is None:
            c = self.seq.shape[1]
            if self.ordered:
                rank = torch.where(self.valid, torch.cumsum(self.valid, dim=1) - 1, c)
            else:
                order = self.age_order()
                rank = torch.empty_like(order)
                rank.scatter_(1, order, torch.arange(c, device=order.device).expand_as(order))
                rank = torch.where(self.valid, rank, torch.full_like(rank, c))
            self.__dict__["_rank"] = rank
        return rank

    def n_live(self) -> torch.Tensor:
        """(H, 1) live entries per head."""
        live = self.__dict__.get("_live")
        if live is None:
            live = self.__dict__["_live"] = self.valid.sum(dim=1, keepdim=True)
        return live

    def recent(self, n: torch.Tensor | int) -> torch.Tensor:
        """(H, C) bool: the n most recent live entries of each head (n scalar or (H,))."""
        n = torch.as_tensor(n, device=self.seq.device).reshape(-1, 1)
        return self.valid & (self.age_rank() >= self.n_live() - n)

    def oldest(self, n: torch.Tensor | int) -> torch.Tensor:
        n = torch.as_tensor(n, device=self.seq.device).reshape(-1, 1)
        return self.valid & (self.age_rank() < n)


def top_by(score: torch.Tensor, candidates: torch.Tensor, n: torch.Tensor | int,
           by_age: torch.Tensor | None = None) -> torch.Tensor:
    """(H, C) bool: per head, the n candidates with the highest score (ties: older first). Slots are
    taken as stream order unless `by_age` (H, C) is given: the slots sorted by age, every candidate
    among them in stream order (`LayerView.age_order`, for a store out of stream order)."""
    h, c = score.shape
    n = torch.as_tensor(n, device=score.device).reshape(-1, 1).expand(h, 1)
    s = torch.where(candidates, score.float(), torch.full_like(score, float("-inf"), dtype=torch.float))
    if by_age is None:
        order = torch.argsort(s, dim=1, descending=True, stable=True)
    else:  # by age first, then a stable sort by score: ties stay oldest first
        order = by_age.gather(1, torch.argsort(s.gather(1, by_age), dim=1, descending=True, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(c, device=score.device).expand_as(order))
    return candidates & (rank < n)


def method_from_config(type_name: str, params: dict) -> Method:
    """Build a method from its config entry; unknown types and keys are errors naming the choices."""
    if type_name not in REGISTRY:
        raise ValueError(f"unknown method type {type_name!r}; registered: {sorted(REGISTRY)}")
    cls = REGISTRY[type_name]
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = set(params) - fields
    if extra:
        raise ValueError(
            f"method {type_name!r} has no parameter(s) {sorted(extra)}; its fields are {sorted(fields)}"
        )
    return cls(**params)
