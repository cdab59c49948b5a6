"""Shared fixtures (a tiny random-weight model in the builtin format, loaded once per session; planted
attention heads) and the test tiers.

Tiers (markers given here by fixture and file, see `pytest_collection_modifyitems`; an explicit mark wins):
    unit      tensor-level tests, no model: seconds        python -m pytest -q -m unit
    model     the tiny model (method matrix, engine, profiling properties)   -m model
    pipeline  CLI, data, resume, aggregation (subprocesses, files)          -m pipeline
    dag       Snakemake on the tiny config;  slurm: a real single-node Slurm
A test that takes the tiny model is `model`, any other is `unit`, except in PIPELINE_FILES (whole files
of subprocess / pipeline tests): add a new file of that kind there.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

# files of CLI / subprocess / pipeline-output tests: their tests are "pipeline" whatever fixtures they take
PIPELINE_FILES = ("test_aggregate.py", "test_bad_inputs.py", "test_dag.py", "test_data_models.py", "test_extrapolate.py",
                  "test_hub_revision.py", "test_install.py",
                  "test_long_docs.py", "test_resume.py", "test_shipped_model.py", "test_slurm.py", "test_warm.py")
MODEL_FIXTURES = ("tiny", "tiny_model_dir", "planted_profile")
TIERS = {
    "unit": "tensor-level tests with no model (seconds)",
    "model": "properties and the method matrix on the tiny random-weight model",
    "pipeline": "CLI, data, resume and aggregation tests (subprocesses and files)",
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The builtin architecture and tokenizer with random weights (no training): fast and exact."""
    from transformers import LlamaForCausalLM

    from kvbench import builtin

    d = tmp_path_factory.mktemp("tiny_model")
    tok = builtin.build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(builtin.build_config(len(tok), tok, 4096))
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    (d / "build_info.json").write_text(json.dumps({"builtin": "random-test"}))
    return str(d)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from kvbench.models import load_model

    model, tok, info = load_model(tiny_model_dir)
    return model, tok, tiny_model_dir


@pytest.fixture(scope="session")
def docs():
    from kvbench.data import synthetic_docs

    return {L: synthetic_docs(L, 2, seed=1) for L in (96, 192)}


@pytest.fixture(scope="session")
def haystacks(tiny):
    """Builtin-language filler documents (`source: haystack`) for the long-context tasks."""
    from kvbench.data import haystack_docs

    return {L: haystack_docs(L, 2, 1, tiny[1]) for L in (96, 192)}


def builtin_tasks() -> list[str]:
    """The registered tasks the builtin model runs (RULER's English instructions need a hub model)."""
    from kvbench import tasks

    return [t for t in tasks.TASKS if tasks.get(t).builtin]


def task_doc(task: str, docs, haystacks, length: int, i: int) -> dict:
    """Document i of the length for a task: translation pairs, or haystack filler for a task that
    runs on `source: haystack` datasets only."""
    from kvbench import tasks

    kinds = tasks.get(task).kinds
    return (docs if "parallel" in kinds or "text" in kinds else haystacks)[length][i]


# ---- planted attention -------------------------------------------------------------------------
class StreamInfo:
    """The whole token stream a planted head sees (ids, pos, role: lists), with what the rules need:
    `copy` (a copy-probe stream: no target role) and, for a translation stream, the name steps:
    {query index t: earlier occurrences (indices) of the name t's label is}, a name occurrence being
    the same token or its source form (the builtin lexicon's target names end in "x")."""

    def __init__(self, ids, pos, role, tok):
        from kvbench import streams, synth

        self.ids, self.pos, self.role = ids, pos, role
        self.copy = streams.ROLE_TARGET not in role
        self.steps: dict[int, list[int]] = {}
        self.label: dict[int, int] = {}  # name step -> the name token it produces
        self.at = {(r, p): i for i, (r, p) in enumerate(zip(role, pos))}  # (role, pos) -> stream index
        if self.copy:
            return
        lex = synth.lexicon()
        to_id = tok.convert_tokens_to_ids
        alias = {to_id(t): to_id(s) for tp, sp in ((lex.tfirst, lex.first), (lex.tlast, lex.last))
                 for tpool, spool in zip(tp, sp) for t, s in zip(tpool, spool)}
        tgt = [i for i, r in enumerate(role) if r == streams.ROLE_TARGET]
        for a, b in zip(tgt, tgt[1:]):  # the token fed at a predicts the target token at b
            lab = ids[b]
            if lab in alias:
                seen = [i for i in range(a) if ids[i] in (lab, alias[lab])]
                if seen:
                    self.steps[a], self.label[a] = seen, lab

    def previous(self, t: int) -> int | None:
        """The last earlier index holding the same token as t."""
        return next((i for i in range(t - 1, -1, -1) if self.ids[i] == self.ids[t]), None)

    def in_span(self, t: int, j: int, width: int = 4) -> bool:
        """Key j binds the name of step t: same role as an earlier occurrence i, pos in [pos_i - width, pos_i]."""
        return any(self.role[j] == self.role[i] and self.pos[i] - width <= self.pos[j] <= self.pos[i]
                   for i in self.steps[t])


class PlantedAttention:
    """Heads whose attention is chosen by construction: rules[layer][q_head](info, t) -> the key (stream
    index <= t) query t attends to. The engine's own attention function (`hf.kvbench_attention`: mask,
    softmax, scores, recording) runs on planted query and key vectors: key j is a random unit code,
    query t is `sharp` x the code of its chosen key, so q.K puts all but ~e^-30 of the mass there.

    Installed for a `with` block as the model's "kvbench" attention through transformers'
    AttentionInterface (an entry of ALL_ATTENTION_FUNCTIONS, which takes precedence over the global
    registration the engine makes); a forward pre-hook on embeddings gives it the token ids (the
    profiler loads its own copy of the model). Layers without rules
    keep the model's own q and K."""

    def __init__(self, tok, rules, head_dim: int = 64, sharp: float = 60.0, seed: int = 0):
        self.tok, self.rules, self.sharp = tok, rules, sharp
        self.codes = torch.nn.functional.normalize(
            torch.randn(8192, head_dim, generator=torch.Generator().manual_seed(seed)), dim=-1)
        self.ids: list[int] = []
        self.stream = ([], [], [])
        self.info = None
        self.calls = 0

    def _grab(self, module, args):
        if isinstance(module, torch.nn.Embedding):  # the model's token embedding: (1, n) ids
            self.ids = args[0][0].tolist()

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        from kvbench.engine import hf

        cache = kwargs["kvbench_cache"]
        seq, pos, role = cache.pending
        layer = module.layer_idx
        if layer == 0:  # a new chunk: extend the stream (a new session starts at seq 0)
            if int(seq[0]) == 0:
                self.stream = ([], [], [])
            for lst, new in zip(self.stream, (self.ids, pos.tolist(), role.tolist())):
                lst.extend(new)
            self.info = StreamInfo(*self.stream, self.tok)
        rules = self.rules.get(layer)
        if rules is None:
            return hf.kvbench_attention(module, query, key, value, attention_mask, scaling, **kwargs)
        assert len(rules) == query.shape[1], "plant every query head of a planted layer"
        self.calls += 1
        store = cache.layers[layer].store
        k = self.codes[store.seq].to(key.dtype)[None]  # (1, Hkv, C, D): key j's code
        q = torch.empty_like(query)  # (1, Hq, n, D)
        for h, rule in enumerate(rules):
            for n, t in enumerate(seq.tolist()):
                j = rule(self.info, t)
                assert 0 <= j <= t, (layer, h, t, j)
                q[0, h, n] = self.sharp * self.codes[j]
        return hf.kvbench_attention(module, q, k, value, attention_mask, 1.0, **kwargs)

    @contextlib.contextmanager
    def installed(self):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from kvbench.engine import hf

        hook = torch.nn.modules.module.register_module_forward_pre_hook(self._grab)
        ALL_ATTENTION_FUNCTIONS[hf.ATTN_NAME] = self
        try:
            yield self
        finally:
            del ALL_ATTENTION_FUNCTIONS[hf.ATTN_NAME]
            hook.remove()


# Rules: info (StreamInfo), t (query index) -> key index.
def attend_retrieval(info, t):
    """At a name step, the name's last earlier occurrence; the first token elsewhere."""
    return info.steps[t][-1] if t in info.steps else 0


def attend_induction(info, t):
    """Copy probe: the token after the previous occurrence of the query's token (Olsson et al.);
    in a translation stream the first token (no name retrieval)."""
    if not info.copy:
        return 0
    i = info.previous(t)
    return t if i is None else i + 1


def attend_previous_occurrence(info, t):
    """Copy probe: the previous occurrence itself (one before the induction target): NOT induction."""
    if not info.copy:
        return 0
    i = info.previous(t)
    return t if i is None else i


def attend_local(info, t):
    """The previous token (the first token at name steps, so that no name is read)."""
    return 0 if t in info.steps else max(t - 1, 0)


# (layer, q head) -> type by construction; GQA groups (q heads 0-1: KV head 0, 2-3: KV head 1) mix types so
# that the KV head's type (the strongest of its query heads) is sometimes neither the first nor the weakest
PLANTED_RULES = {
    0: [attend_retrieval, attend_local, attend_previous_occurrence, attend_induction],
    1: [attend_local, attend_retrieval, attend_induction, attend_local],
    2: [attend_induction, attend_retrieval, attend_local, attend_previous_occurrence],
    3: [attend_retrieval, attend_induction, attend_local, attend_induction],
}
RULE_TYPE = {attend_retrieval: "retrieval", attend_induction: "induction", attend_local: "local",
             attend_previous_occurrence: "local"}
PLANTED_KV_TYPES = [["retrieval", "induction"], ["retrieval", "induction"], ["retrieval", "local"],
                    ["retrieval", "induction"]]


@pytest.fixture(scope="session")
def planted_attention():
    """PlantedAttention(tok, rules): heads by construction (use `with ....installed():`)."""
    return PlantedAttention


@pytest.fixture(scope="session")
def planted_profile(tiny, tmp_path_factory):
    """`kvbench profile` of the tiny model with planted heads (PLANTED_RULES): the frame, the parquet,
    and the types each query head and KV head has by construction."""
    from types import SimpleNamespace

    from kvbench import profiling

    model, tok, d = tiny
    out = str(tmp_path_factory.mktemp("heads") / "planted.parquet")
    with PlantedAttention(tok, PLANTED_RULES).installed() as planted:
        df = profiling.run_profile(d, out, n_prompts=2, copy_len=16, doc_length=320)
    assert planted.calls > 0
    q_types = {(li, h): RULE_TYPE[r] for li, rules in PLANTED_RULES.items() for h, r in enumerate(rules)}
    previous = {(li, h) for li, rules in PLANTED_RULES.items() for h, r in enumerate(rules)
                if r is attend_previous_occurrence}
    return SimpleNamespace(df=df, path=out, q_types=q_types, kv_types=PLANTED_KV_TYPES, previous=previous)


# ---- tiers -------------------------------------------------------------------------------------
def pytest_configure(config):
    # subprocesses (CLI, Snakemake jobs) inherit this; in-process torch is capped here too
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for name, doc in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_collection_modifyitems(config, items):
    """Give every test one tier unless it has one (or is dag / slurm)."""
    for item in items:
        if any(item.get_closest_marker(m) for m in (*TIERS, "dag", "slurm")):
            continue
        if item.path.name in PIPELINE_FILES:
            item.add_marker(pytest.mark.pipeline)
        elif any(f in item.fixturenames for f in MODEL_FIXTURES):
            item.add_marker(pytest.mark.model)
        else:
            item.add_marker(pytest.mark.unit)
