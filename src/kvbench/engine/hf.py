"""The one module that touches transformers' cache and attention internals.

Two supported seams of transformers 5.23 (pinned in pyproject; `check_transformers` refuses others):
- `Cache(layers=[...])` with one `StoreLayer` (a `CacheLayerMixin`) per model layer: `update`
  appends the new K/V and metadata to the layer's store and returns everything the store holds.
- `AttentionInterface.register("kvbench", kvbench_attention)`: our attention function reads the
  store of `module.layer_idx` from the cache passed through the forward kwargs (`kvbench_cache=`),
  builds the per-head mask from the store's metadata (so eviction and GPE need no 4-D mask from
  the model), and hands attention probabilities to the store when its policy needs them, computed
  from the same q.K as the output. The mask interface for "kvbench" returns None.
Registration happens in `prepare_model`, never on import.

Re-indexed positions (StreamingLLM, `StoreCache.positioner` set): the session runs the model at
position 0, where RoPE is the identity (cos 1, sin 0: q and k come out exactly unrotated, scaled by
the RoPE type's attention factor), so the store keeps keys before RoPE, as StreamingLLM's own code
does. The attention function then rotates the queries and every cached key to the positions the
positioner gives for this forward, in float32 from the unrotated keys: one rotation per key per
forward, never a rotation of an already rotated key, so no error accumulates over evictions.
Only RoPE types whose frequencies do not depend on the positions fed can be re-indexed this way.
"""

from __future__ import annotations

import torch
import transformers
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from ..streams import ROLE_TARGET
from . import ckernel

SUPPORTED_TRANSFORMERS = ("5.23.",)
ATTN_NAME = "kvbench"


def check_transformers() -> None:
    if not transformers.__version__.startswith(SUPPORTED_TRANSFORMERS):
        raise RuntimeError(
            f"kvbench's cache engine is written against transformers {SUPPORTED_TRANSFORMERS}, "
            f"found {transformers.__version__}; install the pinned version (pip install -e .)"
        )


class StoreLayer(CacheLayerMixin):
    """Adapter from transformers' per-layer cache protocol to a kvbench store."""

    is_compileable = False
    is_sliding = False

    def __init__(self, store, owner: "StoreCache"):
        super().__init__()
        self.store = store
        self.owner = owner
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # storage exists already
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.owner.stepwise is not None:  # the attention function appends them one at a time
            return key_states, value_states  # (1, H, n, D): the new tokens only
        seq, pos, role = self.owner.pending
        self.store.append(key_states[0], value_states[0], seq, pos, role)  # (H, n, D)
        parts = self.store.parts()
        if len(parts) > 1 or parts[0][1].blockwise:  # attention reads the store itself: part by part
            return key_states, value_states  # (head groups) or block by block (quantized)
        k, v = parts[0][1].keys_values()
        return k[None], v[None]  # (1, H, C, D)

    def get_seq_length(self) -> int:
        return max((int(p.seq.max()) + 1 if p.seq.numel() else 0 for _, p in self.store.parts()), default=0)

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return max(p.seq.shape[1] for _, p in self.store.parts()) + query_length, 0

    def get_max_length(self) -> int:
        return -1


class StoreCache(Cache):
    """A transformers Cache whose layers are kvbench stores; `pending` carries the metadata of the
    tokens in the current forward pass (set by the session before each call).

    `positioner`: None (keys arrive rotated at their positions), or a callable store -> (H, C)
    positions at which attention rotates unrotated queries and keys (re-indexed positions).
    `stepwise`: None, or the session, when a forward of n tokens must evict inside it: `update` then
    returns the new K/V unstored, and the attention function runs the n tokens one at a time per
    layer: append token i, attend its query, let the session evict the layer (exactly what n one-token
    forwards do, layer by layer; the projections and MLPs still run on the n tokens at once).
    `trace`: None, or a list to which attention appends what it consumed, per layer and forward:
    dict(layer, q (Hq, n, D), k (H, C, D) as rotated for attention, kseq, kvalid, kpos (H, C): the
    positions attention used, qseq (n,); with heads grouped by budget, one dict per part and `heads`:
    the layer's KV heads it holds)
    (tests and debugging; costs a copy per layer)."""

    # tokens per dequantized block when attention reads a blockwise (quantized) store: bounds the
    # working copy; each block costs a fixed ~40 small ops, so 512 ran 1.3x slower at 2,900 tokens
    block = 1024

    def __init__(self, stores, model=None):
        self.pending = None
        self.pending_target = None  # (the `pending` tuple, [query is a target token, per token]): see _visible
        self.transient_peak = 0  # largest K/V working copy one attention call made (bytes): see _attend
        self.quant_reader = None  # "c-avx2", "c" or "torch" (ckernel.reader): what read a quantized store's codes (None: none read yet)
        self.stepwise = None  # a session: tokens of this forward are appended, attended and evicted one by one
        self.model = model  # for its RoPE frequencies (re-indexed positions)
        self.positioner = None
        self.trace = None
        self._tables = {}  # step -> (seq, valid, positions, cos, sin) of the last layer rotated, reused while equal
        self._last_positions = None
        self.max_position = -1  # largest re-indexed position attention has rotated a query or key to
        super().__init__(layers=[StoreLayer(s, self) for s in stores])

    def rotation(self, store, step: int = 0, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """cos, sin (H, C, D) float32 of the positions the positioner gives for `store`, as `rope_wide`
        lays them out, and R/2 (the rotated pairs); a layer
        holding the same entries as the previous one (every layer, under a layer-independent rule)
        shares its table (positions are a function of the entries and the session's state, which
        does not change within a forward). `layer_type`: the layer's RoPE when the model has one per
        layer type (Gemma 3), else None; tables are shared only within a type."""
        t = self._tables.get((step, layer_type))
        if t is not None and same_entries(t, store):
            self._last_positions = t[2]
            return t[3], t[4], t[5]  # same entries as the previous layer at this step: same positions
        p = self.positioner(store)
        self.max_position = max(self.max_position, int(p[store.valid].max()))
        cos, sin = rope_tables(self.model, p, layer_type)
        t = self._tables[step, layer_type] = (*entries_snapshot(store), p,
                                              *rope_wide(cos, sin, store.d), cos.shape[-1])
        self._last_positions = p
        return t[3], t[4], t[5]


def entries_snapshot(store) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq, valid) copies of a store part: a store evicting in place changes its own tensors later on."""
    return store.seq.clone(), store.valid.clone()


def same_entries(snap, store) -> bool:
    """Whether a store part holds, slot for slot, the entries of an `entries_snapshot` (the first two
    items of `snap`): what lets a later layer reuse a table or a mask computed for an earlier one."""
    return snap[0].shape == store.seq.shape and torch.equal(snap[0], store.seq) and torch.equal(snap[1], store.valid)


def _no_mask(*args, **kwargs):
    return None


def kvbench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (1, Hq, n, D); key/value (1, Hkv, C, D) as returned by StoreLayer.update (stepwise: the
    n new tokens' (1, Hkv, n, D), appended here one at a time)."""
    cache = kwargs.get("kvbench_cache")
    if cache is None:
        raise RuntimeError("kvbench attention needs kvbench_cache=... in the forward call")
    li = module.layer_idx
    store = cache.layers[li].store
    seq, _, role = cache.pending
    scaling = module.scaling if scaling is None else scaling
    if cache.stepwise is None:
        if len(store.parts()) == 1 and not store.blockwise:  # key, value: the store's, from StoreLayer.update
            return _attend(module, query, key, value, store, cache, seq, role, scaling), None
        return _attend_parts(module, query, store, cache, seq, role, scaling), None
    outs = []
    for i in range(query.shape[2]):
        cache.stepwise.step_append(li, i, key[0][:, i:i + 1], value[0][:, i:i + 1])
        outs.append(_attend_parts(module, query[:, :, i:i + 1], store, cache, seq[i:i + 1], role[i:i + 1],
                                  scaling, step=i))
        cache.stepwise.step_evict(li, i)
    return torch.cat(outs, dim=1), None  # (1, n, Hq, D)


def _attend_parts(module, query, store, cache, seq, role, scaling, step: int = 0):
    """query (1, Hq, n, D) against every part of a layer's store (one, or one per head group) ->
    (1, n, Hq, D); a part's KV heads are served by their own query heads."""
    parts = store.parts()
    if len(parts) == 1:
        return _attend_part(module, query, parts[0][1], cache, seq, role, scaling, step)
    g = query.shape[1] // store.h
    out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
    for (heads, part), qh in zip(parts, store.query_heads(g)):
        out[:, :, qh] = _attend_part(module, query[:, qh], part, cache, seq, role, scaling, step)
        if cache.trace is not None:
            cache.trace[-1]["heads"] = heads.tolist()  # the layer's KV heads this part holds
    return out


def _attend_part(module, query, part, cache, seq, role, scaling, step: int = 0):
    if part.blockwise:
        return _attend_blocks(module, query, part, cache, seq, role, scaling, step)
    k, v = part.keys_values()
    return _attend(module, query, k[None], v[None], part, cache, seq, role, scaling, step)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _visible(store, cache, seq, role, step: int) -> torch.Tensor:
    """(Hkv, n, C) bool: which of the store's slots each query sees (`Store.mask`). One query that is
    the newest token of the stream (a decode step, or token `step` of a stepwise forward, appended
    just before its attention) follows every live key, so the causal term is void: the live slots,
    less the target keys for a non-target query, from the session's host-side roles of the forward
    (`cache.pending_target`, valid while `cache.pending` is the tuple it was made with)."""
    pt = cache.pending_target
    if seq.shape[0] == 1 and pt is not None and pt[0] is cache.pending:
        m = store.valid if pt[1][step] else store.valid & (store.role != ROLE_TARGET)
        return m[:, None, :]
    return store.mask(seq, role == ROLE_TARGET, ROLE_TARGET)


def _window_mask(module, store, mask):
    """The store's (Hkv, n, C) mask, narrowed on a sliding layer (the last `window` original
    positions, whatever is cached); and the layer's logit soft-cap (None: none)."""
    window, softcap = attention_variant(module)
    if window is not None:
        qpos = store.pos.gather(1, store.new_slots)  # (Hkv, n): the new tokens' original positions
        mask = mask & (qpos[:, :, None] - store.pos[:, None, :] < window)
    return mask, softcap


def _attend_blocks(module, query, store, cache, seq, role, scaling, step: int = 0):
    """query (1, Hq, n, D) against a store read piece by piece (`store.pieces(h, cache.block)`: at most
    a block of one head's K or V in float32 at a time) -> (1, n, Hq, D), per KV head, in float32.
    When a head's logits (g * n x C floats) are no larger than a block of K and V, or attention
    probabilities are wanted (H2O's scores, profiling), two passes: every piece's keys into the
    head's logits, one softmax, then every piece's values weighted by its columns; on the CPU with
    the C kernel, every tier of the head is read straight from its codes in one call for the logits
    and one for the values (`store.tiers`: no float32 block at all, one dequantized row at a time).
    Otherwise (long chunks of queries) an
    online softmax over the pieces (running max, denominator and weighted sum per query row,
    rescaled whenever a piece raises the max)."""
    if cache.positioner is not None:
        raise ValueError("re-indexed positions need dense storage")
    hq, n, d = query.shape[1:]
    hkv = store.h
    g = hq // hkv
    cache.quant_reader = ckernel.reader() if query.is_cpu else "torch"
    mask, softcap = _window_mask(module, store, _visible(store, cache, seq, role, step))  # (Hkv, n, C)
    want_p = store.score is not None or store.recorded is not None
    probs = query.new_zeros(hkv, g * n, mask.shape[-1], dtype=torch.float32) if want_p else None
    # query heads grouped by KV head (row = i * n + t), scaled once: logits come out scaled
    q = query[0].reshape(hkv, g * n, d).float() * scaling
    out = torch.empty(hkv, g * n, d, dtype=torch.float32, device=query.device)
    whole = want_p or g * n * mask.shape[-1] <= 2 * cache.block * d
    for h in range(hkv):
        qh = q[h]
        hidden = ~mask[h, :, :store.n_live[h]]  # (n, L): live slots are a prefix
        if whole:
            x = q.new_empty(g * n, hidden.shape[1])  # (g * n, L) logits
            tiers = store.tiers(h)  # every tier read from its codes in one C call, else block by block
            if tiers is not None:
                tiers, nbytes = tiers
                _note(cache, nbytes)
                ckernel.qk_tiers(qh, tiers, x)
            else:
                pieces = store.pieces(h, cache.block)
                for s0, w, keys, _ in pieces:
                    torch.mm(qh, _read(keys, cache).T, out=x[:, s0:s0 + w])
            p = torch.softmax(_masked(x, softcap, hidden, g), dim=-1)
            acc = out[h].zero_()
            if tiers is not None:
                ckernel.pv_tiers(p, tiers, acc)
            else:
                for s0, w, _, values in pieces:
                    acc.addmm_(p[:, s0:s0 + w], _read(values, cache))
            if want_p:
                probs[h, :, :p.shape[1]] = p
        else:
            out[h] = _online_softmax(qh, store.pieces(h, cache.block), cache, softcap, hidden, g)
    if want_p:
        p = probs.reshape(hkv, g, n, -1)
        store.observe(p.sum(dim=1))
        if store.recorded is not None:  # head profiling: keep every query's attention row
            store.recorded.append(p.reshape(hq, n, -1))
    if cache.trace is not None:
        cache.trace.append(dict(layer=module.layer_idx, q=query[0].detach().clone(), k=store.keys_values()[0],
                                kseq=store.seq.clone(), kvalid=store.valid.clone(), qseq=seq.clone(),
                                kpos=store.pos.clone()))
    return out.reshape(1, hq, n, d).to(query.dtype).transpose(1, 2).contiguous()


def _read(part, cache) -> torch.Tensor:
    """A piece's keys or values (float32, from `QuantKVStore.pieces`), its allocation counted."""
    x, nbytes = part()
    _note(cache, nbytes)
    return x


def _note(cache, nbytes: int) -> None:
    cache.transient_peak = max(cache.transient_peak, nbytes)


def _masked(x, softcap, hidden, g):
    """Logits x (g * n, w): soft-capped, hidden (n, w) slots at -inf (in place)."""
    if softcap is not None:
        x = torch.tanh(x / softcap) * softcap
    return x.view(g, *hidden.shape).masked_fill_(hidden, float("-inf")).view(x.shape)


def _online_softmax(q, pieces, cache, softcap, hidden, g):
    """q (g * n, D) float32 against a head's pieces -> (g * n, D), one piece's K or V alive at a time."""
    neg = float("-inf")
    m = den = acc = None
    for s0, w, keys, values in pieces:
        x = _masked(q @ _read(keys, cache).T, softcap, hidden[:, s0:s0 + w], g)
        top = x.amax(-1, keepdim=True) if m is None else torch.maximum(m, x.amax(-1, keepdim=True))
        safe = top.masked_fill(top == neg, 0.0)  # a row with nothing visible yet: exp(-inf) = 0
        e = torch.exp(x - safe)
        v = _read(values, cache)
        if m is None:
            den, acc = e.sum(-1, keepdim=True), e @ v
        else:
            scale = torch.exp(m - safe)
            den, acc = den * scale + e.sum(-1, keepdim=True), acc * scale + e @ v
        m = top
    return acc / den


def _attend(module, query, key, value, store, cache, seq, role, scaling, step: int = 0):
    """query (1, Hq, n, D), key/value (1, Hkv, C, D) of `store` (the new tokens are in its slots
    `store.new_slots` (Hkv, n)) -> (1, n, Hq, D)."""
    hq, hkv = query.shape[1], key.shape[1]
    g = hq // hkv
    if cache.positioner is not None:  # unrotated q and k: rotate both to this forward's positions
        cos, sin, half = cache.rotation(store, step, rope_layer_type(module))  # (Hkv, C, D), R/2
        n, d = query.shape[2], query.shape[3]
        key = rope_apply_wide(key[0], cos, sin, half)[None]
        cache.transient_peak = max(cache.transient_peak, _nbytes(key))  # the rotated copy of every key
        idx = store.new_slots[..., None].expand(-1, -1, d)  # (Hkv, n, D): the new tokens' slots
        qc, qs = (x.gather(1, idx)[:, None] for x in (cos, sin))  # (Hkv, 1, n, D): every query head of a KV head
        query = rope_apply_wide(query[0].view(hkv, g, n, d), qc, qs, half).view(1, hq, n, d)
    if cache.trace is not None:
        cache.trace.append(dict(layer=module.layer_idx, q=query[0].detach().clone(), k=key[0].detach().clone(),
                                kseq=store.seq.clone(), kvalid=store.valid.clone(), qseq=seq.clone(),
                                kpos=(cache._last_positions if cache.positioner is not None else store.pos).clone()))
    mask, softcap = _window_mask(module, store, _visible(store, cache, seq, role, step))  # (Hkv, n, C)
    if store.score is None and store.recorded is None and softcap is None:
        # query heads grouped by KV head, (1, Hkv, g * n, D): K/V are read once, never repeated
        n, d, c = query.shape[2], query.shape[3], key.shape[2]
        q = query.reshape(1, hkv, g * n, d)
        m = mask if n == 1 else mask[:, None].expand(hkv, g, n, c).reshape(hkv, g * n, c)
        out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=m[None], scale=scaling)
        out = out.reshape(1, hq, n, d)
    else:
        n, d, c = query.shape[2], query.shape[3], key.shape[2]
        q = query[0].reshape(hkv, g * n, d)  # query heads grouped by KV head (row = i * n + t)
        kf, vf, q = key[0], value[0], q.float()
        if kf.dtype != torch.float32:  # up-cast copies (a half-precision cache)
            kf, vf = kf.float(), vf.float()
            cache.transient_peak = max(cache.transient_peak, _nbytes(kf, vf))
        s = torch.bmm(q, kf.transpose(1, 2)).mul_(scaling).view(hkv, g, n, c)
        if softcap is not None:  # Gemma 2: logits soft-capped before the mask
            s = torch.tanh(s / softcap) * softcap
        s.masked_fill_(~mask[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)  # (Hkv, g, n, C)
        store.observe(p.sum(dim=1))
        if store.recorded is not None:  # head profiling: keep every query's attention row
            store.recorded.append(p.reshape(hq, n, -1))
        out = torch.bmm(p.view(hkv, g * n, c), vf)
        out = (out if out.dtype == query.dtype else out.to(query.dtype)).reshape(1, hq, n, d)
    return out.transpose(1, 2).contiguous()  # (1, n, Hq, D)


# model_type -> what differs from Llama that kvbench's attention and RoPE handle (README table)
ARCHITECTURES = {
    "llama": "reference layout",
    "qwen2": "QKV bias; sliding layers when use_sliding_window",
    "mistral": "sliding window on every layer",
    "phi3": "fused QKV projection",
    "gpt_neox": "partial rotary (rotary_pct), parallel residual",
    "gemma2": "alternating sliding/global layers, attention logit soft-capping, query_pre_attn_scalar",
    "gemma3_text": "alternating sliding/global layers with their own RoPE bases, QK-norm",
}


def check_architecture(model_type: str | None) -> None:
    """ValueError naming an architecture the engine cannot serve (before any work is done)."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"kvbench's cache engine cannot serve model_type {model_type!r}; "
                         f"supported: {', '.join(sorted(ARCHITECTURES))}")


def attention_variant(module) -> tuple[int | None, float | None]:
    """(sliding window or None, attention logit soft-cap or None) of one attention module: the
    module's own attribute where it has one (per-layer: Gemma 2/3, Qwen2), else the config's
    (Mistral, Phi-3: every layer)."""
    window = module.sliding_window if hasattr(module, "sliding_window") else \
        getattr(getattr(module, "config", None), "sliding_window", None)
    return window, getattr(module, "attn_logit_softcapping", None)


def prepare_model(model) -> None:
    """Register the attention function and switch the model to it (idempotent)."""
    check_transformers()
    check_architecture(getattr(model.config, "model_type", None))
    AttentionInterface.register(ATTN_NAME, kvbench_attention)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    model.set_attn_implementation(ATTN_NAME)


def model_geometry(model) -> dict:
    c = model.config
    return dict(
        n_layers=c.num_hidden_layers,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        max_positions=getattr(c, "max_position_embeddings", None),
    )


STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def check_reindexable(model) -> None:
    """Re-indexing rotates unrotated keys with the model's inv_freq: refuse RoPE types whose
    frequencies depend on the positions fed (dynamic NTK, longrope)."""
    rope = model.base_model.rotary_emb
    types = getattr(rope, "rope_type", "default")  # Gemma 3: {layer type: rope type}
    for t in (types.values() if isinstance(types, dict) else [types]):
        if t not in STATIC_ROPE:
            raise ValueError(f"re-indexed positions need a RoPE with fixed frequencies ({STATIC_ROPE}); this "
                             f"model's rope_type is {t!r}: use positions 'original'")


def rope_layer_type(module) -> str | None:
    """The layer type whose RoPE an attention module uses, when the model has one RoPE per layer
    type (Gemma 3: `{type}_inv_freq` buffers, rope_parameters keyed by type), else None (one table
    for every layer, shared by layers with the same entries)."""
    c = getattr(module, "config", None)
    types, rope = getattr(c, "layer_types", None), getattr(c, "rope_parameters", None)
    t = types[module.layer_idx] if types else None
    return t if isinstance(rope, dict) and t in rope else None


def rope_tables(model, delta: torch.Tensor, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (..., D/2), float32, of a rotation by `delta` positions (..., e.g. (H, C)); the
    angles are computed as transformers' rotary embedding computes them (position x inv_freq, fp32)."""
    rope = model.base_model.rotary_emb
    inv_freq = rope.inv_freq if hasattr(rope, "inv_freq") else getattr(rope, f"{layer_type}_inv_freq")
    inv_freq = inv_freq.to(delta.device, torch.float32)  # (R/2,), R <= D
    ang = delta[..., None].float() * inv_freq  # (H, C, D/2)
    return ang.cos(), ang.sin()


def rope_wide(cos: torch.Tensor, sin: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables of `rope_tables` (..., R/2) laid out over the head dim (..., D) for `rope_apply_wide`:
    cos as [cos, cos, 1 ...], sin as [-sin, sin, 0 ...] (the D - R dims past a partial rotary pass through)."""
    rest = d - 2 * cos.shape[-1]
    c, s = [cos, cos], [-sin, sin]
    if rest:
        c.append(cos.new_ones(cos.shape[:-1] + (rest,)))
        s.append(sin.new_zeros(sin.shape[:-1] + (rest,)))
    return torch.cat(c, dim=-1), torch.cat(s, dim=-1)


def rope_apply_wide(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """Rotate x (..., D) by the wide tables of `rope_wide` (broadcast against x): x cos + swap(x) sin,
    swap exchanging the two rotated halves, in four ops, in float32 (k1 cos - k2 sin is computed as
    k1 cos + k2 (-sin), the same value), rounded once to x's dtype."""
    k = x.float()
    if 2 * half == k.shape[-1]:
        swapped = torch.roll(k, half, dims=-1)
    else:  # partial rotary: the dims past R stay in place (their sin is 0)
        swapped = torch.cat([k[..., half:2 * half], k[..., :half], k[..., 2 * half:]], dim=-1)
    out = k * cos
    return out.add_(swapped.mul_(sin)).to(x.dtype)


def rope_apply(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate keys or queries (H, C, D) (rotate_half convention) by the angles of `rope_tables`
    (H, C, R/2), in float32; the result is rounded once to the input's dtype. Partial rotary
    (GPT-NeoX, R < D): only the first R dims rotate, the rest pass through. (Attention keeps the wide
    tables of a forward and calls `rope_apply_wide` itself.)"""
    return rope_apply_wide(keys, *rope_wide(cos, sin, keys.shape[-1]), cos.shape[-1])


def forward(model, ids: torch.Tensor, pos: torch.Tensor, cache: StoreCache, logits: str = "last"):
    """One forward of new tokens ids (n,) at positions pos (n,); returns logits (n or 1, V)."""
    out = model(
        input_ids=ids[None], position_ids=pos[None], past_key_values=cache, use_cache=True,
        kvbench_cache=cache, logits_to_keep=1 if logits == "last" else 0,
    )
    return out.logits[0]
