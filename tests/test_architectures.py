"""The engine on every architecture it claims (issue #21): a tiny random-weight config of each, built
with transformers' own config class. (a) The full cache decodes greedily exactly as `model.generate`
does, with the same logits token by token; (b) every registered method runs at a tight budget with
the budget holding after every step; (c) re-indexed positions (StreamingLLM) at a budget above the
length reproduce the full cache (the engine's own RoPE: partial rotary, per-layer-type frequencies).

Run: OMP_NUM_THREADS=1 pytest tests/test_architectures.py
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import transformers

from kvbench.engine.session import Session
from kvbench.methods import REGISTRY, method_from_config
from kvbench.profiling import HeadProfile

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
WINDOW = 8  # sliding layers: far shorter than prompt + generation, so the window matters

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=WINDOW),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SMALL, rotary_pct=0.25, use_parallel_residual=True),
    "phi3": lambda: transformers.Phi3Config(**SMALL, num_key_value_heads=2),
    # soft-capping at 1.0: random-weight logits are small, a realistic cap (50) would never bite
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=32, sliding_window=WINDOW,
                                                attn_logit_softcapping=1.0, final_logit_softcapping=30.0,
                                                query_pre_attn_scalar=24),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=32,
                                                         sliding_window=WINDOW, query_pre_attn_scalar=24,
                                                         layer_types=["sliding_attention", "full_attention"]),
}
ARCHS = sorted(CONFIGS)
PROMPT, NEW = 24, 20


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    torch.manual_seed(0)
    cfg = CONFIGS[request.param]()
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    for p in model.parameters():  # sharper attention than the init's std 0.02, so masks and caps matter
        p.data.mul_(4.0) if p.dim() == 2 else None
    assert model.config.model_type == request.param
    return request.param, model


def prompt_ids(n: int = PROMPT) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(1))


def reference(model, ids):
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model.generate(ids[None], max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):], torch.stack(out.logits)[:, 0]  # (NEW,), (NEW, V)


def engine_greedy(sess: Session, ids, n_new: int = NEW):
    """Greedy decoding through the session: (tokens (n_new,), logits (n_new, V))."""
    logits = [sess.feed(ids, torch.arange(len(ids)), torch.zeros(len(ids)))[-1]]
    toks = []
    for t in range(n_new):
        toks.append(int(logits[-1].argmax()))
        if t + 1 < n_new:
            p = len(ids) + t
            logits.append(sess.feed([toks[-1]], [p], [0])[-1])
    return torch.tensor(toks), torch.stack(logits)


def test_full_equals_generate(arch_model):
    name, model = arch_model
    ids = prompt_ids()
    ref_toks, ref_logits = reference(model, ids)
    toks, logits = engine_greedy(Session(model, method_from_config("full", {}), None, chunk_size=7), ids)
    assert (logits - ref_logits).abs().max() < 1e-4, name
    assert toks.tolist() == ref_toks.tolist(), name


def test_reindexed_positions_above_length_are_full(arch_model):
    """StreamingLLM rotates unrotated keys itself: with nothing evicted its positions are the original
    ones, so its logits are the full cache's (partial rotary: GPT-NeoX; one RoPE base per layer type:
    Gemma 3)."""
    name, model = arch_model
    ids = prompt_ids()
    _, ref = engine_greedy(Session(model, method_from_config("full", {}), None), ids, 6)
    _, got = engine_greedy(Session(model, method_from_config("streaming_llm", {}), 4096), ids, 6)
    assert (got - ref).abs().max() < 1e-4, name


def synthetic_profile(model) -> HeadProfile:
    c = model.config
    h = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    kinds = ("retrieval", "induction", "local")
    return HeadProfile(pd.DataFrame(), [[kinds[(li + j) % 3] for j in range(h)] for li in range(c.num_hidden_layers)])


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_tight_budget_holds(arch_model, method):
    name, model = arch_model
    budget = 12
    m = method_from_config(method, {})
    sess = Session(model, m, budget, chunk_size=8, profile=synthetic_profile(model))
    ids = prompt_ids(40)
    steps = []
    orig = sess._evict

    def checked():
        orig()
        steps.append(1)
        if sess.budgets is None:
            return
        for i, s in enumerate(sess.stores):
            cap = sess.keep[i]
            assert bool((s.live() <= cap).all()), (name, method, i, s.live(), cap)

    sess._evict = checked
    toks, logits = engine_greedy(sess, ids, 6)
    assert torch.isfinite(logits).all() and len(steps) > 0
    if m.evicts:
        assert sess.tokens > budget + 16


def test_unserved_architecture_is_refused(tmp_path):
    """An architecture the engine does not know is refused by name: at Session (before any forward) and
    at `kvbench validate` for a path: source (from config.json alone)."""
    from kvbench.models import load_model, source_geometry

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=2, n_positions=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(ValueError, match="cannot serve model_type 'gpt2'"):
        Session(model, method_from_config("full", {}), None)
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"path:.*cannot serve model_type 'gpt2'"):
        source_geometry(f"path:{tmp_path}")
    with pytest.raises(ValueError, match="cannot serve model_type 'gpt2'"):  # before the (absent) weights
        load_model(str(tmp_path))
    model_dir = tmp_path / "llama"
    CONFIGS["llama"]().save_pretrained(model_dir)
    assert source_geometry(f"path:{model_dir}")["head_dim"] == 32  # a served one passes


@pytest.mark.parametrize("arch", ["pythia-70m", "qwen2.5-0.5b", "llama-3.2-1b"])
def test_random_archs_are_served(arch):
    """Every random: source builds an architecture the engine serves, with its published shape (meta
    device: no weights allocated)."""
    from kvbench.engine.hf import check_architecture
    from kvbench.models import RANDOM_ARCHS, random_config, source_geometry

    cfg = random_config(arch)
    check_architecture(cfg.model_type)
    source_geometry(f"random:{arch}")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert model.config.num_hidden_layers == RANDOM_ARCHS[arch]["num_hidden_layers"]
    if arch == "pythia-70m":
        assert cfg.rope_parameters["partial_rotary_factor"] == 0.25 and cfg.use_parallel_residual
        assert model.base_model.rotary_emb.inv_freq.shape == (8,)  # rotary dims 16 of head_dim 64
        assert 60e6 < sum(p.numel() for p in model.parameters()) < 80e6  # pythia-70m: 70.4M


@pytest.mark.parametrize("method", ["h2o", "streaming_llm", "haq_kv"])
def test_sliding_layers_never_see_past_their_window(method):
    """Under a method's cache (budget above the window), a sliding layer gives zero attention to every
    cached key whose original position is `WINDOW` or more behind the query's; global layers do not."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["gemma2"]()).eval()
    sess = Session(model, method_from_config(method, {}), 2 * WINDOW, chunk_size=5,
                   profile=synthetic_profile(model))
    sess.cache.trace = []
    for s in sess.stores:
        s.recorded = []  # attention rows, one list entry per attention call, in step with the trace
    engine_greedy(sess, prompt_ids(30), 4)
    seen = {0: [], 1: []}
    for li, s in enumerate(sess.stores):
        calls = [t for t in sess.cache.trace if t["layer"] == li]
        assert len(calls) == len(s.recorded) > 0
        for t, p in zip(calls, s.recorded):  # p (Hq, n, C)
            kpos = t["kseq"]  # (Hkv, C): the stream's positions are 0, 1, ...: the original position is seq
            n, g = p.shape[1], p.shape[0] // kpos.shape[0]
            dist = (t["qseq"][None, :, None] - kpos[:, None, :]).repeat_interleave(g, 0)  # (Hq, n, C)
            far = (dist >= WINDOW) & t["kvalid"].repeat_interleave(g, 0)[:, None, :]
            seen[li].append(float(p[far].abs().max()) if far.any() else None)
    assert all(x == 0 for x in seen[0] if x is not None) and any(x is not None for x in seen[0])  # sliding
    assert any(x is not None and x > 0 for x in seen[1])  # the global layer does attend far back


@pytest.mark.parametrize("arch", ["tiny-qwen2", "tiny-llama", "tiny-llama-mha", "tiny-gpt-neox"])
def test_head_profiling_runs_on_every_random_twin(arch, tmp_path):
    """The paper grid profiles every model it evaluates with head-aware methods: profiling must read
    each architecture's KV-head count (GPT-NeoX configs have no num_key_value_heads) and type
    every (layer, KV head) once."""
    from kvbench.engine.hf import model_geometry
    from kvbench.models import build_model, load_model
    from kvbench.profiling import run_profile

    build_model(f"random:{arch}", str(tmp_path / "m"))
    df = run_profile(str(tmp_path / "m"), str(tmp_path / "heads.parquet"), n_prompts=2)
    g = model_geometry(load_model(str(tmp_path / "m"))[0])
    kv = df.drop_duplicates(["layer", "kv_head"])
    assert len(kv) == g["n_layers"] * g["n_kv_heads"]
    assert set(df["kv_type"]) <= {"retrieval", "induction", "local"}
