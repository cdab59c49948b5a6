"""A catalogue of bad inputs: each must fail at once, name the problem, and leave results untouched.

    nice -n 19 python -m pytest -q tests/test_bad_inputs.py

Part of CI. Measured 2026-12-01 (2 cores, nice 19, load average 5 from other jobs): the 224 CLI cases
and 8 `snakemake -n` runs in 38 s of CPU (3.5 min of wall time under that load; 2026-11-23, idle: the
122 CLI cases then took 23 s wall). Issue #17 added the cases after "issue #17": data loss (an --out
that is not a previous output of the same kind; names like `..`), plausible-but-wrong rows (length,
positions, weights that do not match config.json), late errors (numbers, YAML keys, devices,
documents), warnings for soft problems (`ok` cases that check the warning lines), help texts.

Every case runs a real entry point (`kvbench validate|eval|make-data|build-model|profile|aggregate`)
inside a workspace that already holds finished results (a raw eval Parquet, all.parquet, a data
file and a model folder), and checks
(a) the command fails with a message naming the bad key, file or value (one line, no traceback), or, for
    a soft problem, succeeds with one `warning:` line naming it, and
(b) every file under results/ and resources/ is byte-identical afterwards, and nothing new appeared
    there (a `.partial` folder means work had started).
To stay CI-sized, the CLI cases share one workspace and run in ONE subprocess (`_DRIVER`): it calls
`kvbench.cli.main(argv)` for each case exactly as `python -m kvbench` would (the SystemExit message,
the exit code, a traceback for anything that escapes), with results/ and resources/ hashed before
and after each case, so every check stays per case. Config errors also go through real
`snakemake -n --configfile BAD` runs for a representative subset (`SNAKEMAKE_CASES`): they must stop
Snakemake while it parses the config, before it plans any job.
"""

from __future__ import annotations

import errno
import stat
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "data", "tiny.yaml")
# no network: a case that would download something must fail instead
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
RAW_REL = "results/raw/micro/ppl/synth/full/L128_Bfull.parquet"  # the finished job in every workspace
DATA_REL = "resources/data/micro/synth/L128.jsonl"
MODEL_REL = "resources/models/micro"
TOPS = ("results", "resources")


# ----------------------------------------------------------------------------- snapshots and the driver
def _snapshot(root: str, tops=TOPS) -> dict[str, str]:
    out = {}
    for top in tops:
        for dirpath, dirs, files in os.walk(os.path.join(root, top)):
            for n in dirs:
                out[os.path.relpath(os.path.join(dirpath, n), root)] = "dir"
            for n in files:
                p = os.path.join(dirpath, n)
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


# Runs each case's argv through kvbench.cli.main as `python -m kvbench` would, in one process.
_DRIVER = textwrap.dedent('''
    import contextlib, io, json, sys, traceback
    from kvbench.cli import main

    cases, report = json.load(open(sys.argv[2])), {}
    for c in cases:
        os.chdir(c["cwd"])
        before = _snapshot(c["cwd"], c["tops"])
        out, err, rc = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(c["argv"])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                rc = 1
        after = _snapshot(c["cwd"], c["tops"])
        report[c["id"]] = dict(rc=rc, output=out.getvalue() + err.getvalue(),
                               changed=sorted(k for k in before if after.get(k) != before[k]),
                               new=sorted(set(after) - set(before)))
    json.dump(report, open(sys.argv[3], "w"))
''')


@pytest.fixture(scope="session")
def finished(tmp_path_factory, tiny_model_dir):
    """One finished eval Parquet (ppl, full cache, 2 samples) and its data file, made once."""
    from kvbench.data import make_data
    from kvbench.evaluate import run_eval

    d = tmp_path_factory.mktemp("finished")
    data = str(d / "L128.jsonl")
    make_data({"source": "synthetic"}, 128, 2, 0, data)
    raw = str(d / "raw.parquet")
    run_eval(model_dir=tiny_model_dir, task="ppl", data=data, method="full", method_type="full", params={},
             budget="full", length=128, out=raw, model_name="micro", dataset="synth", device="cpu")
    return {"raw": raw, "data": data}


class Workspace:
    """A project folder with finished results (raw Parquet, all.parquet, data file, model folder)."""

    def __init__(self, root, finished, model_dir):
        self.root = str(root)
        self.raw = os.path.join(self.root, RAW_REL)
        self.data = os.path.join(self.root, DATA_REL)
        self.all = os.path.join(self.root, "results", "all.parquet")
        for src, dst in ((finished["raw"], self.raw), (finished["raw"], self.all), (finished["data"], self.data)):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)
        shutil.copytree(model_dir, self.path(MODEL_REL))
        self.model = MODEL_REL

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def write(self, rel: str, content) -> str:
        p = self.path(rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        return rel

    def docs(self) -> list[dict]:
        with open(self.data) as f:
            return [json.loads(line) for line in f]

    def eval(self, *extra, task="ppl", method="full", type_=None, budget="full", data=None, out=None,
             length=128, model=None) -> list[str]:
        """argv of `kvbench eval` of a good job, with `extra` flags appended (argparse: the last one wins)."""
        return ["eval", "--model", model or self.model, "--model-name", "micro", "--task", task, "--data",
                data or DATA_REL, "--dataset", "synth", "--method", method, "--type", type_ or method,
                "--budget", budget, "--length", str(length), "--device", "cpu", "--out", out or RAW_REL,
                *map(str, extra)]


def _check_failure(output: str, rc: int, needles, one_line: bool) -> None:
    assert rc != 0, f"exit code 0; output:\n{output[-3000:]}"
    missing = [n for n in needles if n not in output]
    assert not missing, f"message does not name {missing}:\n{output[-3000:]}"
    if one_line:
        assert "Traceback" not in output, f"a traceback instead of a one-line error:\n{output[-3000:]}"


def _check_untouched(changed, new) -> None:
    assert not changed, f"existing results changed or removed: {changed}"
    assert not new, f"new files under results/ or resources/ (work had started): {new}"


def _jsonl(docs) -> str:
    return "".join(json.dumps(d) + "\n" for d in docs)


# ----------------------------------------------------------------------------- config errors
def _base() -> dict:
    with open(TINY) as f:
        return yaml.safe_load(f)


def _mut(fn):
    def text():
        c = _base()
        fn(c)
        return yaml.safe_dump(c, sort_keys=False)
    return text


def _set(path: str, value):
    """Mutation setting a key given as 'a/b/c' (created if missing)."""
    def fn(c):
        *head, last = path.split("/")
        node = c
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return _mut(fn)


def _add_method(name: str, spec: dict, study: str = "long_sequences"):
    def fn(c):
        c["methods"][name] = spec
        c["studies"][study]["methods"].append(name)
    return _mut(fn)


def _quant_method(field_kind: str):
    """A registered quantized method (one that needs no head profile) with a field of this kind
    ('bits' or 'group_size'): (type, field), or None."""
    import dataclasses

    from kvbench.methods import REGISTRY

    for name, cls in sorted(REGISTRY.items()):
        if getattr(cls(), "needs_profile", False):
            continue
        for f in dataclasses.fields(cls):
            if (field_kind == "bits" and "bits" in f.name and f.default not in (8, 16)) or \
                    (field_kind == "group_size" and f.name == "group_size"):
                return name, f.name
    return None


def _unsupported_bits() -> int:
    try:
        from kvbench.quant import SUPPORTED_BITS
    except ImportError:
        SUPPORTED_BITS = (2, 4, 8)
    return next(b for b in (5, 6, 7, 9, 1) if b not in SUPPORTED_BITS)


def _duplicate_study() -> str:
    """The tiny config with a second `oracle:` study (a YAML duplicate key)."""
    c = _base()
    studies = c.pop("studies")
    text = yaml.safe_dump(c, sort_keys=False) + "studies:\n"
    text += textwrap.indent(yaml.safe_dump(studies, sort_keys=False), "  ")
    return text + "  oracle:\n    tasks: [latency]\n    methods: [full]\n    lengths: [192]\n"


def _base_text() -> str:
    with open(TINY) as f:
        return f.read().rstrip() + "\n"


# (id, config text or bytes (callable), needles both entry points must print)
CONFIG_CASES = [
    ("unknown_method_type", _set("methods/sink4/type", "sreaming_llm"), ("sink4", "sreaming_llm")),
    ("unknown_task_in_study", _set("studies/oracle/tasks", ["translate_batch", "translate_strem"]),
     ("oracle", "translate_strem")),
    ("unknown_task_section", _set("tasks/translate_strem", {"wait_k": 3}), ("translate_strem",)),
    ("unknown_model_source_scheme", _set("models/micro/source", "hug:Qwen/Qwen2.5-0.5B@abc"), ("micro", "hug:")),
    ("hub_source_without_revision", _set("models/micro/source", "hub:Qwen/Qwen2.5-0.5B-Instruct"),
     ("micro", "revision")),
    ("missing_local_model", _set("models/micro/source", "path:/nonexistent/kvbench-model"),
     ("micro", "/nonexistent/kvbench-model")),
    ("unknown_builtin_model", _set("models/micro/source", "builtin:micro-synht"), ("micro", "micro-synht")),
    ("unknown_random_arch", _set("models/micro/source", "random:qwen9-0.5b"), ("micro", "qwen9-0.5b")),
    ("budget_zero", _set("studies/long_sequences/budgets", [0]), ("long_sequences", "budgets")),
    ("budget_negative", _set("studies/long_sequences/budgets", [-32]), ("long_sequences", "budgets")),
    ("budget_not_integer", _set("studies/long_sequences/budgets", [32.5]), ("long_sequences", "budgets", "32.5")),
    ("budget_as_string", _set("studies/long_sequences/budgets", ["32"]), ("long_sequences", "budgets")),
    ("n_sink_not_below_budget", _set("methods/sink4/n_sink", 32), ("long_sequences", "sink4", "n_sink")),
    ("n_sink_negative", _set("methods/sink4/n_sink", -1), ("sink4", "n_sink")),
    ("length_beyond_model_positions", _set("studies/oracle/lengths", [100000]), ("oracle", "100000", "positions")),
    ("length_too_small_for_a_document", _set("studies/oracle/lengths", [8]), ("oracle", "too small")),
    ("wait_k_zero", _set("tasks/translate_stream", {"wait_k": 0}), ("translate_stream", "wait_k")),
    ("malformed_yaml", lambda: _base_text().replace("studies:\n", "studies: [\n"), ()),
    ("wrong_type_n_samples", _set("datasets/synth/n_samples", "three"), ("n_samples", "three")),
    ("wrong_type_chunk_size", _set("chunk_size", 1.5), ("chunk_size",)),
    ("wrong_type_method_parameter", _set("methods/sink4/n_sink", "4"), ("sink4", "n_sink")),
    ("duplicate_study_name", _duplicate_study, ("oracle", "duplicate")),
    ("unknown_method_parameter", _set("methods/sink4/n_sinks", 4), ("sink4", "n_sinks")),
    ("study_names_undefined_method", _set("studies/long_sequences/methods", ["full", "sink8"]),
     ("long_sequences", "sink8")),
    ("study_names_undefined_model", _set("studies/oracle/models", ["tiny"]), ("oracle", "tiny")),
    ("study_names_undefined_dataset", _set("studies/oracle/datasets", ["wmt"]), ("oracle", "wmt")),
    ("unknown_top_level_key", lambda: _base_text() + "studys: {}\n", ("studys",)),
    ("method_without_type", _set("methods/sink4", {"n_sink": 4}), ("sink4", "type")),
    ("evicting_method_without_integer_budget", _set("studies/latency/budgets", ["full"]), ("latency", "h2o")),
    ("h2o_recent_ratio_out_of_range", _set("methods/h2o/recent_ratio", 1.5), ("h2o", "recent_ratio")),
    ("unknown_device", _set("device", "gpu"), ("device", "gpu")),
    ("model_name_with_slash", lambda: _base_text().replace("  micro:\n", "  micro/v2:\n", 1), ("micro/v2",)),
    ("unused_method_with_bad_value", _set("methods/spare", {"type": "streaming_llm", "positions": "cahce"}),
     ("spare", "positions")),
    ("unknown_language_code", _set("datasets/wmt", {"source": "hf", "path": "iwslt2017", "src_lang": "english",
                                                    "tgt_lang": "fr"}),
     ("wmt", "english")),
    ("empty_config_file", lambda: "", ()),
    ("non_utf8_config_file", lambda: _base_text().replace("seed: 0", "# caf\u00e9\nseed: 0").encode("latin-1"),
     ()),
]

# What each entry point must print when the needles above are empty (file-level errors).
FILE_LEVEL = {
    "malformed_yaml": (("malformed YAML", "bad.yaml", "line"), ("not valid JSON or YAML",)),
    "empty_config_file": (("must be a mapping",), ("keys at top level",)),
    "non_utf8_config_file": (("not UTF-8", "bad.yaml"), ("UnicodeDecodeError",)),
}


# ----------------------------------------------------------------------------- the CLI cases
@dataclass
class Case:
    id: str
    argv: Callable  # Workspace -> kvbench argv (what follows `python -m kvbench`)
    needles: tuple = ()
    one_line: bool = True
    setup: Callable | None = None  # Workspace -> None: writes the case's inputs before the driver runs
    ok: Callable | None = None  # a case that must succeed: (Workspace, report) -> None checks its output
    needs: str | None = None  # "ro", "tmpfs", "nocuda", "nomps": skipped where unavailable
    new_ok: Callable = field(default=lambda p: False)  # new paths allowed (resume state of a failed job)
    check: Callable | None = None  # output -> None: further checks of a failure's message


CASES: list[Case] = []


def case(id_, argv, *needles, **kw):
    CASES.append(Case(id_, argv, tuple(needles), **kw))


def _cfg_case(id_, make, needles):
    rel = f"cases/{id_}/bad.yaml"
    case(f"validate_{id_}", lambda w: ["validate", rel], *needles,
         setup=lambda w: w.write(rel, make()))


for _id, _make, _needles in CONFIG_CASES:
    _cfg_case(_id, _make, FILE_LEVEL.get(_id, (_needles,))[0])
case("validate_missing_config_file", lambda w: ["validate", "nope.yaml"], "nope.yaml", "does not exist")


def _quant_config(kind):
    found = _quant_method(kind)
    assert found, f"no registered quantized method has a {kind} field"
    mtype, fname = found
    value = _unsupported_bits() if kind == "bits" else 48
    return _add_method("q", {"type": mtype, fname: value}), ("'q'", fname, f"got {value}")


for _kind in ("bits", "group_size"):
    _make, _needles = _quant_config(_kind)
    _cfg_case(f"quantization_{_kind}", _make, _needles)


# ---- eval: options and parameters
case("eval_unknown_method_type", lambda w: w.eval(type_="sreaming_llm", method="sink4", budget="32"), "sreaming_llm")
case("eval_unknown_task", lambda w: w.eval(task="translate_strem"), "translate_strem")
for _b in ["0", "-8", "12.5", "abc", "32tokens"]:
    case(f"eval_bad_budget[{_b}]", lambda w, b=_b: w.eval(method="sink4", type_="streaming_llm", budget=b),
         "budget", repr(_b))
case("eval_n_sink_not_below_budget",
     lambda w: w.eval("--param", "n_sink=32", method="sink4", type_="streaming_llm", budget="32"),
     "n_sink (32)", "budget (32)")
case("eval_unknown_method_parameter",
     lambda w: w.eval("--param", "n_sinks=4", method="sink4", type_="streaming_llm", budget="32"), "n_sinks")
case("eval_wrong_type_method_parameter",
     lambda w: w.eval("--param", "n_sink=four", method="sink4", type_="streaming_llm", budget="32"), "n_sink", "four")
case("eval_evicting_method_at_full_budget", lambda w: w.eval(method="sink4", type_="streaming_llm", budget="full"),
     "sink4", "integer budget")
case("eval_full_cache_with_a_budget", lambda w: w.eval(budget="64"), "keeps everything")
case("eval_length_beyond_model_positions", lambda w: w.eval(length=5000), "5000", "4096")
for _k in ["0", "-1"]:
    case(f"eval_wait_k_below_one[{_k}]", lambda w, k=_k: w.eval("--task-param", f"wait_k={k}",
                                                                  task="translate_stream"), "wait_k", _k)
case("eval_chunk_size_zero", lambda w: w.eval("--chunk-size", "0"), "chunk_size")
case("eval_param_without_value", lambda w: w.eval("--param", "n_sink", method="sink4", type_="streaming_llm",
                                                  budget="32"), "key=value", "n_sink", one_line=False)
case("eval_malformed_params_json", lambda w: w.eval("--params-json", "{n_sink: 4", method="sink4",
                                                    type_="streaming_llm", budget="32"), "--params-json")
case("eval_max_samples_zero", lambda w: w.eval("--max-samples", "0", task="translate_stream"), "max")
case("eval_unknown_dtype", lambda w: w.eval("--dtype", "flaot32"), "dtype", "flaot32")
case("eval_unknown_device", lambda w: w.eval("--device", "gpu"), "device", "gpu")
case("eval_missing_data_file", lambda w: w.eval(data="resources/data/micro/synth/L999.jsonl"), "L999.jsonl")
case("eval_missing_model", lambda w: w.eval(model="resources/models/nope"), "resources/models/nope", "build-model")
case("eval_corrupt_model_weights", lambda w: w.eval(model="cases/badmodel"), "badmodel")
case("eval_head_aware_without_profile", lambda w: w.eval(method="head_aware", budget="32"), "head profile")


def _quant_eval(kind, **kw):
    found = _quant_method(kind)
    assert found, f"no registered quantized method has a {kind} field"
    mtype, fname = found
    value = _unsupported_bits() if kind == "bits" else 48
    argv = lambda w: w.eval("--param", f"{fname}={value}", method="q", type_=mtype, budget="32", **kw)  # noqa: E731
    return argv, ((fname, str(value)) if kind == "bits" else ("group_size", "48", "head_dim"))


_qa, _qn = _quant_eval("bits")
case("eval_quantization_bits", _qa, *_qn)
_qa, _qn = _quant_eval("group_size")
case("eval_group_size_not_dividing_head_dim", _qa, *_qn)


# ---- eval: data files (each case writes cases/<id>/<name> from the finished data file, mutated)
def _data_case(id_, mutate, *needles, name="bad.jsonl", raw=None, **eval_kw):
    rel = f"cases/{id_}/{name}"

    def setup(w):
        if raw is not None:
            w.write(rel, raw(w))
            return
        docs = w.docs()
        mutate(docs)
        w.write(rel, _jsonl(docs))

    case(id_, lambda w: w.eval(data=rel, **eval_kw), *needles, setup=setup)


def _set_doc(i, **kv):
    return lambda docs: docs[i].update(kv)


def _all_docs(**kv):
    return lambda docs: [d.update(kv) for d in docs]


_data_case("eval_empty_document", _set_doc(1, source=""), "bad.jsonl", "document 1 is empty")
_data_case("eval_empty_source_for_translation", _set_doc(0, source="   "), "bad.jsonl", "empty",
           task="translate_stream")
_data_case("eval_non_utf8_dataset", None, "latin1.jsonl", "not UTF-8", name="latin1.jsonl",
           raw=lambda w: (lambda docs: _jsonl(docs).replace(docs[0]["source"][:2], "caf\u00e9 ", 1))(
               w.docs()).encode("latin-1"))
_data_case("eval_malformed_jsonl", None, "bad.jsonl", "JSONL", raw=lambda w: _jsonl(w.docs())[:-40] + "\n")
_data_case("eval_document_without_source", lambda docs: docs[1].pop("source"), "bad.jsonl", "source")
_data_case("eval_unknown_language_pair", _all_docs(src_lang="en", tgt_lang="xx"), "en->xx", task="translate_stream")
_data_case("eval_translation_without_reference", _all_docs(target=""), "bad.jsonl", "reference target",
           task="translate_stream")
_data_case("eval_translation_later_document_without_reference", _set_doc(1, target=""), "bad.jsonl", "1", "target",
           task="translate_stream")
_data_case("eval_duplicate_document_ids", lambda docs: docs[1].update(id=docs[0]["id"]), "bad.jsonl", "duplicate")
_data_case("eval_document_id_not_an_integer", _set_doc(1, id="one"), "bad.jsonl", "'one'")


# ---- eval: head profiles
def _profile_parquet(w, rel: str, drop=(), layers=4) -> str:
    from kvbench.profiling import COLUMNS

    rows = [dict(layer=li, q_head=h, kv_head=h // 2, retrieval=0.1, induction=0.1, local=0.5, sink=0.1,
                 type="local", kv_type="local") for li in range(layers) for h in range(4)]
    t = pa.Table.from_pylist(rows).select([c for c in COLUMNS if c not in drop])
    p = w.path(rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    pq.write_table(t, p)
    return rel


PROF_MISSING_COLS = "cases/profiles/bad.parquet"
PROF_OTHER_SHAPE = "cases/profiles/other.parquet"
PROF_NOT_PARQUET = "cases/profiles/junk.parquet"


def _profiles(w):
    _profile_parquet(w, PROF_MISSING_COLS, drop=("kv_type", "retrieval"))
    _profile_parquet(w, PROF_OTHER_SHAPE, layers=24)
    w.write(PROF_NOT_PARQUET, b"PAR1 but not really")


def _ha(prof, **kw):
    return lambda w: w.eval("--profile", prof, method="head_aware", budget="32", **kw)


case("eval_profile_missing_file", _ha("results/heads/nope.parquet"), "results/heads/nope.parquet")
case("eval_profile_missing_columns", _ha(PROF_MISSING_COLS), "bad.parquet", "kv_type")
case("eval_profile_not_parquet", _ha(PROF_NOT_PARQUET), "junk.parquet")
case("eval_profile_of_another_model_shape", _ha(PROF_OTHER_SHAPE), "other.parquet", "24")

# ---- eval: checks that must come before the model load (the model folder's weights are corrupt: a
# check that came after the load would report the weights instead)
BAD = "cases/badmodel"
case("before_load_unknown_language_pair", lambda w: w.eval(task="translate_stream", model=BAD,
                                                           data="cases/eval_unknown_language_pair/bad.jsonl"),
     "en->xx")
case("before_load_profile_missing_columns", _ha(PROF_MISSING_COLS, model=BAD), "kv_type")
case("before_load_profile_missing_file", _ha("profiles/nope.parquet", model=BAD), "nope.parquet")
case("before_load_profile_of_another_model_shape", _ha(PROF_OTHER_SHAPE, model=BAD), "other.parquet", "24")
case("before_load_group_size", _quant_eval("group_size", model=BAD)[0], "group_size", "48")

# ---- eval: read-only results folder (a copy of the finished Parquet sits in it and must stay)
RO = "results/raw/ro_case"
case("eval_read_only_results_directory", lambda w: w.eval(out=f"{RO}/L256_Bfull.parquet"), "L256_Bfull.parquet",
     needs="ro")
case("before_load_read_only_results_directory", lambda w: w.eval(model=BAD, out=f"{RO}/x.parquet"), "cannot write",
     "x.parquet", needs="ro")


# ---- eval: resume state
def _check_rows(out, ids, **values):
    def check(w, rep):
        t = pq.read_table(w.path(out)).to_pylist()
        assert sorted(r["sample_id"] for r in t) == ids, [r["sample_id"] for r in t]
        for k, v in values.items():
            assert {json.loads(r["method_params"])[k] if k == "n_sink" else r[k] for r in t} == {v}, t
    return check


def _stale_sidecar(w):
    """A sidecar of another configuration (n_sink=8) where the n_sink=4 job resumes."""
    from kvbench.evaluate import run_eval

    other = w.path("cases/stale/other.parquet")
    run_eval(model_dir=w.path(MODEL_REL), task="ppl", data=w.data, method="sink4", method_type="streaming_llm",
             params={"n_sink": 8}, budget="32", length=128, out=other, model_name="micro", dataset="synth",
             device="cpu", max_samples=1)
    os.makedirs(w.path("cases/stale/L128_B32.parquet.partial"))
    shutil.copyfile(other, w.path("cases/stale/L128_B32.parquet.partial/sample_000000.parquet"))


case("eval_stale_sidecar_of_another_configuration",
     lambda w: w.eval("--param", "n_sink=4", method="sink4", type_="streaming_llm", budget="32",
                      out="cases/stale/L128_B32.parquet"),
     setup=_stale_sidecar, ok=_check_rows("cases/stale/L128_B32.parquet", [0, 1], n_sink=4))
case("eval_corrupt_sidecar_is_recomputed", lambda w: w.eval(out="cases/corrupt/L128_Bfull.parquet"),
     setup=lambda w: w.write("cases/corrupt/L128_Bfull.parquet.partial/sample_000000.parquet", b"junk"),
     ok=_check_rows("cases/corrupt/L128_Bfull.parquet", [0, 1]))


def _short_doc(w):
    docs = w.docs()[:1]
    docs[0].update(source=" ".join(docs[0]["source"].split()[:3]), target=" ".join(docs[0]["target"].split()[:3]),
                   sent_ends=[3])
    w.write("cases/short/short.jsonl", _jsonl(docs))


def _short_doc_ok(w, rep):
    """Documented handling, not an error: with fewer source words than k, wait-k reads the whole source
    and then writes (it becomes the oracle layout); every delay is the source length and the row keeps k."""
    row = pq.read_table(w.path("cases/short/out.parquet")).to_pylist()[0]
    assert row["src_words"] == 3 and row["wait_k"] == 10
    assert row["delays"] and all(d == 3 for d in row["delays"])


case("eval_document_shorter_than_k_reads_all_then_writes",
     lambda w: w.eval("--task-param", "wait_k=10", task="translate_stream", data="cases/short/short.jsonl",
                      out="cases/short/out.parquet"), setup=_short_doc, ok=_short_doc_ok)


# ---- disk full: a tiny tmpfs holding a copy of the finished results, filled up to the last few KiB
FULL = "tiny_fs"
case("disk_full_eval", lambda w: w.eval(out=f"{FULL}/results/raw/new.parquet"), "No space left on device",
     "new.parquet", needs="tmpfs",
     new_ok=lambda p: "new.parquet.partial" in p and ".tmp-" not in p)  # resume state of the failed job
case("disk_full_aggregate", lambda w: ["aggregate", "--config", TINY, "--raw", RAW_REL, "--out", f"{FULL}/results",
                                       "--no-figures"], "No space left on device", "all.parquet", needs="tmpfs")


# ---- make-data
def _hf_pairs(w) -> str:
    rows = [{"translation": {"en": f"the cat sat on the mat {i} .", "fr": f"le chat {i} ."}} for i in range(8)]
    return w.write("cases/hf/pairs.jsonl", _jsonl(rows))


def _md(ds=None, *extra, length="128"):
    def argv(w):
        src = ["--dataset-json", json.dumps(ds(w) if callable(ds) else ds)] if ds is not None else []
        return ["make-data", *src, *extra, "--length", length, "--out", DATA_REL]
    return argv


case("make_data_dataset_not_in_config", _md(None, "--config", TINY, "--dataset", "wmt"), "wmt", "synth")
case("make_data_unknown_dataset_source", _md({"source": "synthetc"}), "synthetc")
case("make_data_zero_samples", _md({"source": "synthetic", "n_samples": 0}), "n_samples")
case("make_data_length_too_small", _md({"source": "synthetic"}, length="8"), "length 8", "too small")
case("make_data_length_beyond_model_positions", _md({"source": "synthetic"}, "--model", MODEL_REL, length="9000"),
     "9000", "4096")
case("make_data_malformed_config", _md(None, "--config", "cases/md_bad/bad.yaml", "--dataset", "synth"),
     "bad.yaml", "malformed YAML", setup=lambda w: w.write("cases/md_bad/bad.yaml", "studies: [\n"))
case("make_data_malformed_dataset_json", _md("{source: synthetic"), "--dataset-json")
case("make_data_hf_missing_data_file",
     _md(lambda w: {"source": "hf", "path": "json", "data_files": w.path("nope.jsonl"), "split": "train",
                    "text_field": "text"}, "--model", MODEL_REL), "nope.jsonl")
case("make_data_hf_language_not_in_dataset",
     _md(lambda w: {"source": "hf", "path": "json", "data_files": w.path("cases/hf/pairs.jsonl"), "split": "train",
                    "src_lang": "en", "tgt_lang": "de"}, "--model", MODEL_REL), "tgt_lang", "'de'", "fr",
     setup=_hf_pairs)
case("make_data_hf_non_utf8_file",
     _md(lambda w: {"source": "hf", "path": "json", "data_files": w.path("cases/hf/latin1.jsonl"), "split": "train"},
         "--model", MODEL_REL), "latin1.jsonl",
     setup=lambda w: w.write("cases/hf/latin1.jsonl",
                             json.dumps({"text": "caf\u00e9 au lait ."}, ensure_ascii=False).encode("latin-1")))

# ---- build-model (a finished model folder is at the --out path and must stay)
for _id, _source, _needles in [
    ("unknown_scheme", "hug:Qwen/Qwen2.5-0.5B@abc", ("hug:", "builtin:")),
    ("hub_without_revision", "hub:Qwen/Qwen2.5-0.5B-Instruct", ("revision",)),
    ("hub_empty_revision", "hub:Qwen/Qwen2.5-0.5B-Instruct@", ("revision",)),
    ("missing_local_model", "path:/nonexistent/kvbench-model", ("/nonexistent/kvbench-model", "does not exist")),
    ("local_folder_without_config", "path:results", ("config.json",)),
    ("unknown_builtin", "builtin:micro-synht", ("micro-synht", "micro-synth")),
    ("unknown_random_arch", "random:qwen9-0.5b", ("qwen9-0.5b",)),
    ("empty_name", "builtin:", ("nothing after",)),
]:
    case(f"build_model_{_id}", lambda w, s=_source: ["build-model", s, "--out", MODEL_REL], *_needles)

# ---- profile
case("profile_missing_model", lambda w: ["profile", "--model", "resources/models/nope", "--out",
                                         "results/heads/nope.parquet"], "resources/models/nope")
case("profile_zero_prompts", lambda w: ["profile", "--model", MODEL_REL, "--out", "results/heads/micro.parquet",
                                        "--n-prompts", "0"], "n_prompts")


# ---- aggregate (bad raw files are put under results/raw/<case>/..., as a crashed job would leave them)
def _agg(*raw, config=TINY):
    return lambda w: ["aggregate", "--config", config, "--raw", RAW_REL, *raw, "--out", "results", "--no-figures"]


def _rewrite(rel, fn):
    def setup(w):
        p = w.path(rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        pq.write_table(fn(pq.read_table(w.raw)), p)
    return setup


def _wrong_type(t):
    i = t.schema.get_field_index("nll_sum")
    return t.set_column(i, "nll_sum", pa.array(["lots"] * t.num_rows))


_CORRUPT = "results/raw/corrupt/micro/ppl/synth/sink4/L128_B32.parquet"
_TRUNC = "results/raw/truncated/micro/ppl/synth/sink4/L128_B32.parquet"
_V99 = "results/raw/v99/micro/ppl/synth/full/L192_Bfull.parquet"
_NOCOL = "results/raw/nocol/micro/ppl/synth/full/L192_Bfull.parquet"
_WRONGT = "results/raw/wrongtype/micro/ppl/synth/full/L192_Bfull.parquet"
_COPY = "results/raw/copy/L128_Bfull.parquet"
case("aggregate_corrupt_parquet", _agg(_CORRUPT), "sink4/L128_B32.parquet", "not a readable Parquet",
     setup=lambda w: w.write(_CORRUPT, b"not a parquet file at all"))
case("aggregate_truncated_parquet", _agg(_TRUNC), "sink4/L128_B32.parquet",
     setup=lambda w: w.write(_TRUNC, open(w.raw, "rb").read(3000)))
case("aggregate_unknown_schema_version", _agg(_V99), "L192_Bfull.parquet", "schema version 99",
     setup=_rewrite(_V99, lambda t: t.set_column(0, "schema_version", pa.array([99] * t.num_rows, pa.int32()))))
case("aggregate_missing_columns", _agg(_NOCOL), "L192_Bfull.parquet", "nll_sum",
     setup=_rewrite(_NOCOL, lambda t: t.drop_columns(["nll_sum"])))
case("aggregate_wrong_column_type", _agg(_WRONGT), "L192_Bfull.parquet", setup=_rewrite(_WRONGT, _wrong_type))
case("aggregate_missing_raw_file", _agg("results/raw/micro/ppl/synth/h2o/L128_B32.parquet"), "h2o/L128_B32.parquet")
case("aggregate_same_samples_twice", _agg(_COPY), "more than once", "copy/L128_Bfull.parquet",
     setup=lambda w: w.write(_COPY, open(w.raw, "rb").read()))
case("aggregate_malformed_config", _agg(config="cases/agg_bad/bad.yaml"), "bad.yaml", "malformed YAML",
     setup=lambda w: w.write("cases/agg_bad/bad.yaml", "studies: [\n"))
case("aggregate_duplicate_key_in_config", _agg(config="cases/agg_dup/bad.yaml"), "bad.yaml", "duplicate",
     setup=lambda w: w.write("cases/agg_dup/bad.yaml", _duplicate_study()))
case("aggregate_head_profile_missing_columns",
     lambda w: ["aggregate", "--figure", "heads", "--heads", "cases/agg_heads/bad.parquet", "--out", "results"],
     "bad.parquet", "type", setup=lambda w: _profile_parquet(w, "cases/agg_heads/bad.parquet", drop=("kv_type", "type")))


def _must(cond, what, rep):
    assert cond, f"missing {what!r} in:\n{rep['output'][-3000:]}"


def _says(*needles):
    """ok-check: the output names every needle (whitespace as argparse wraps it does not matter)."""
    def ok(w, rep):
        text = " ".join(rep["output"].split())
        for n in needles:
            _must(n in text, n, rep)
    return ok


# ----------------------------------------------------------------------------- issue #17: nothing lost, nothing silently wrong
# Each case below stands for a class of inputs (the comment says which); the catalogue's checks apply
# to all of them: a one-line message naming the problem, results/ and resources/ byte-identical.

# ---- data loss: an output path holding something that is not a previous output of the same kind
SRC_MODEL = "cases/srcmodel"  # a good model folder to build from (path:)


def _prev_build(w):
    """A previous build of a model at cases/rebuilt/micro (a stale extra file shows it is replaced)."""
    shutil.copytree(w.path(MODEL_REL), w.path("cases/rebuilt/micro"))
    w.write("cases/rebuilt/micro/kvbench_source.json", json.dumps({"source": "path:old"}))
    w.write("cases/rebuilt/micro/stale.txt", "from the previous build")


def _rebuilt_ok(w, rep):
    d = w.path("cases/rebuilt/micro")
    assert not os.path.exists(os.path.join(d, "stale.txt")), "the previous build was not replaced"
    assert os.path.exists(os.path.join(d, ".kvbench_dir")) and os.path.exists(os.path.join(d, "config.json"))
    assert json.load(open(os.path.join(d, "kvbench_source.json")))["source"] == f"path:{SRC_MODEL}"


for _id, _out in [("models_folder", "resources/models/"), ("working_directory", "."), ("results_folder", "results"),
                  ("data_folder", "resources/data"), ("existing_file", DATA_REL), ("parent_of_cwd", "..")]:
    case(f"build_model_out_is_{_id}", lambda w, o=_out: ["build-model", f"path:{SRC_MODEL}", "--out", o],
         "--out", "refusing to replace")
case("build_model_out_is_not_a_build_before_training", lambda w: ["build-model", "builtin:micro-synth", "--out",
                                                                   "resources"], "'resources'", "refusing to replace")
case("build_model_out_inside_its_source", lambda w: ["build-model", f"path:{MODEL_REL}", "--out", f"{MODEL_REL}/copy"],
     "inside one another")
case("build_model_replaces_a_previous_build", lambda w: ["build-model", f"path:{SRC_MODEL}", "--out",
                                                         "cases/rebuilt/micro"], setup=_prev_build, ok=_rebuilt_ok)
# eval/profile/make-data: --out may be new or a previous output of the same command, nothing else
case("eval_out_is_a_folder", lambda w: w.eval(out="results/raw"), "results/raw", "folder")
case("eval_out_is_the_data_file", lambda w: w.eval(out=DATA_REL), "--out", "L128.jsonl")
case("eval_out_is_another_parquet", lambda w: w.eval(out=PROF_OTHER_SHAPE), "other.parquet", "refusing to replace")
case("eval_out_is_a_model_file", lambda w: w.eval(out=f"{MODEL_REL}/model.safetensors"), "model.safetensors")
case("eval_sidecar_holds_foreign_files", lambda w: w.eval(out="results/raw/foreign/L128_Bfull.parquet"),
     "foreign/L128_Bfull.parquet.partial", "notes.txt",
     setup=lambda w: w.write("results/raw/foreign/L128_Bfull.parquet.partial/notes.txt", "mine"))
case("profile_out_is_a_folder", lambda w: ["profile", "--model", MODEL_REL, "--out", "results"], "'results'", "folder")
case("profile_out_is_an_eval_result", lambda w: ["profile", "--model", MODEL_REL, "--out", RAW_REL],
     "L128_Bfull.parquet", "refusing to replace")
case("make_data_out_is_a_folder", lambda w: ["make-data", "--dataset-json", '{"source": "synthetic"}', "--length",
                                             "128", "--out", "resources/data/micro"], "resources/data/micro", "folder")
case("make_data_out_is_a_result", lambda w: ["make-data", "--dataset-json", '{"source": "synthetic"}', "--length",
                                             "128", "--out", "results/raw/x.jsonl"], "x.jsonl", "refusing to replace",
     setup=lambda w: w.write("results/raw/x.jsonl", "not documents\n"))


# ---- names that become path components (a model named `..` once deleted resources/)
def _rename(section: str, old: str, new: str, study_key: str | None = None):
    def fn(c):
        c[section] = {(new if k == old else k): v for k, v in c[section].items()}
        if study_key:
            for st in c["studies"].values():
                if old in st.get(study_key, []):
                    st[study_key] = [new if x == old else x for x in st[study_key]]
    return _mut(fn)


LONG = "m" * 300
NAME_CASES = [
    ("model_named_dotdot", _rename("models", "micro", ".."), ("'..'", "folder name")),
    ("model_named_dot", _rename("models", "micro", "."), ("'.'", "folder name")),
    ("model_name_with_space", _rename("models", "micro", "my model"), ("my model",)),
    ("dataset_named_dotdot", _rename("datasets", "synth", ".."), ("datasets", "'..'")),
    ("method_named_dotdot", _rename("methods", "full", "..", "methods"), ("methods", "'..'")),
    ("method_name_starting_with_dash", _rename("methods", "full", "-full", "methods"), ("'-full'",)),
    ("study_named_dotdot", _rename("studies", "oracle", ".."), ("studies", "'..'")),
    ("method_name_300_characters", _rename("methods", "full", LONG, "methods"), ("300 characters",)),
    ("yaml_key_read_as_number", lambda: _base_text().replace("  full: {type: full}", "  123: {type: full}"),
     ("123", "quote")),
    ("yaml_key_read_as_boolean", lambda: _base_text().replace("  oracle:\n", "  no:\n", 1), ("'no'", "bool", "quote")),
    # numbers: integers are integers (not 2.0), below 2^31, and floats are finite
    ("n_samples_float", _set("datasets/synth/n_samples", 2.0), ("n_samples", "2.0")),
    ("chunk_size_float", _set("chunk_size", 32.0), ("chunk_size", "32.0")),
    ("wait_k_float", _set("tasks/translate_stream", {"wait_k": 5.0}), ("wait_k", "5.0")),
    ("n_sink_float", _set("methods/sink4/n_sink", 4.0), ("sink4", "n_sink")),
    ("share_nan", _add_method("ha_nan", {"type": "head_aware", "share_local": float("nan")}), ("share_local", "nan")),
    ("recent_ratio_infinite", _set("methods/h2o/recent_ratio", float("inf")), ("recent_ratio", "inf")),
    ("seed_2_to_the_70", _set("seed", 2**70), ("seed", str(2**70))),
    ("seed_negative", _set("seed", -1), ("seed", "-1")),
    ("budget_2_to_the_70", _set("studies/long_sequences/budgets", [2**70]), ("budgets", str(2**70))),
    ("length_2_to_the_70", _set("studies/oracle/lengths", [2**70]), ("lengths", str(2**70))),
    ("n_samples_huge", _set("datasets/synth/n_samples", 10**9), ("n_samples", str(10**9))),
    ("target_offset_past_positions", _set("tasks/translate_stream", {"target_offset": 5000}),
     ("target_offset", "5000", "positions")),
    ("aggregate_unknown_key", _set("aggregate", {"n_resampels": 10}), ("aggregate", "n_resampels")),
    ("n_prompts_huge", _set("profiling/n_prompts", 10**9), ("n_prompts", str(10**9))),
    ("n_decode_past_positions", _set("tasks/latency", {"n_decode": 10**6}), ("tasks/latency", "positions")),
    # a path: source inside the workflow's outputs: a re-run would delete it (Snakemake removes outputs first)
    ("path_source_inside_outputs", _set("models/micro/source", f"path:{MODEL_REL}"), ("micro", "resources/models")),
]
CONFIG_CASES += NAME_CASES
for _id, _make, _needles in NAME_CASES:
    _cfg_case(_id, _make, _needles)


# ---- soft problems: the command succeeds, with one warning line each (and changes nothing)
def _warns(*needles, count_once=True):
    def ok(w, rep):
        out = rep["output"]
        for n in needles:
            assert n in out, f"no warning naming {n!r}:\n{out[-3000:]}"
        lines = [line for line in out.splitlines() if line.startswith("warning:")]
        assert lines, out[-3000:]
        if count_once:
            assert len(lines) == len(set(lines)), f"a warning repeated:\n{out}"
        assert "\r" not in out, "carriage-return progress bars in a non-terminal log"
    return ok


def _warn_case(id_, make, *needles):
    rel = f"cases/{id_}/warn.yaml"
    case(f"validate_{id_}", lambda w: ["validate", rel], setup=lambda w: w.write(rel, make()), ok=_warns(*needles))


_warn_case("budget_at_or_above_length", _set("studies/long_sequences/budgets", [32, 192]), "budget 192 >= length")


def _no_job_study(c):
    c["datasets"]["synth_ppl"] = {"source": "synthetic", "n_samples": 2, "tasks": ["ppl"]}
    c["studies"]["nothing"] = {"tasks": ["translate_batch"], "datasets": ["synth_ppl"], "methods": ["full"],
                               "lengths": [128]}


_warn_case("study_plans_no_jobs", _mut(_no_job_study), "'studies/nothing'", "no job")
_warn_case("method_names_differ_only_by_case", _set("methods/Full", {"type": "full"}), "differ only by case")
_warn_case("uniform_share_fields", _set("methods/uni", {"type": "uniform", "share_local": 0.2}),
           "uniform ignores share_local")
_warn_case("task_parameter_of_another_task", _set("tasks/ppl", {"n_decode": 8}), "'tasks/ppl'", "n_decode")
case("validate_device_cuda_without_cuda", lambda w: ["validate", "cases/cuda/warn.yaml"], needs="nocuda",
     setup=lambda w: w.write("cases/cuda/warn.yaml", _set("device", "cuda")()), ok=_warns("'device'", "no CUDA"))
_warn_case("length_listed_twice", _set("studies/oracle/lengths", [128, 128]), "'studies/oracle/lengths'", "128")
_warn_case("hf_keys_on_a_synthetic_dataset", _set("datasets/synth/src_lang", "en"), "synthetic dataset ignores src_lang")
_warn_case("steps_for_a_random_model", _set("models/rnd", {"source": "random:qwen2.5-0.5b", "steps": 5}),
           "'models/rnd'", "steps")
# the documented `aggregate: {n_resamples, seed}` section is accepted
case("validate_aggregate_options_are_accepted", lambda w: ["validate", "cases/agg_opts/ok.yaml"],
     setup=lambda w: w.write("cases/agg_opts/ok.yaml", _set("aggregate", {"n_resamples": 10, "seed": 1})()),
     ok=lambda w, rep: _must("valid" in rep["output"], "valid", rep))
# one eval run with three soft problems: --param overriding --params-json, a budget above the length, and
# a task parameter the task does not read (its log: plain progress lines, no carriage returns)
case("eval_warnings_param_override_budget_above_length_wrong_task_param",
     lambda w: w.eval("--params-json", '{"n_sink": 4}', "--param", "n_sink=2", "--task-param", "n_decode=7",
                      "--max-samples", "1", method="sink4", type_="streaming_llm", budget="200",
                      out="cases/warn_eval/L128_B200.parquet"),
     ok=_warns("--param n_sink=2 overrides n_sink=4", "budget 200 >= length 128", "n_decode=7 is ignored"))

# ---- plausible rows that would be wrong (exit 0 before): now clear errors before any work
MISMATCH = "cases/mismatch"  # config.json says 5 layers, the weights hold 4
SHORTPOS = "cases/shortpos"  # max_position_embeddings 160 (RoPE weights do not depend on it)


def _model_variants(w):
    for rel, change in ((MISMATCH, {"num_hidden_layers": 5}), (SHORTPOS, {"max_position_embeddings": 160}),
                        ("cases/widemodel", {"intermediate_size": 256})):
        shutil.copytree(w.path(MODEL_REL), w.path(rel))
        p = w.path(f"{rel}/config.json")
        cfg = json.load(open(p))
        cfg.update(change)
        json.dump(cfg, open(p, "w"))
    shutil.copytree(w.path(MODEL_REL), w.path("cases/corruptcfg"))
    w.write("cases/corruptcfg/config.json", '{"model_type": "llama", "hidden_size": ')
    shutil.copytree(w.path(MODEL_REL), w.path("cases/listcfg"))
    w.write("cases/listcfg/config.json", "[1, 2]")


for _b in ["256", "64"]:  # the data was built for 128
    case(f"eval_length_does_not_match_data[{_b}]", lambda w, b=_b: w.eval(length=b), "built for length 128",
         f"--length {_b}")
for _b in ["-5", "0"]:
    case(f"eval_length_not_positive[{_b}]", lambda w, b=_b: w.eval(length=b), "--length", _b, one_line=False)


def _long_doc(docs):
    docs[1]["source"] = " ".join([docs[1]["source"]] * 8)


def _long_doc_unlabelled(docs):
    _long_doc(docs)
    for d in docs:
        d.pop("length"), d.pop("n_tokens")


_data_case("eval_document_far_longer_than_its_length", _long_doc, "document 1", "far more than --length 128")
_data_case("eval_unlabelled_document_far_longer_than_length", _long_doc_unlabelled, "document 1", "--length 128")
_data_case("eval_document_claims_more_tokens_than_length", _set_doc(0, n_tokens=4000), "document 0", "4000")
case("eval_model_config_disagrees_with_weights", lambda w: w.eval(model=MISMATCH), "mismatch", "missing tensors",
     "model.layers.4")
case("eval_model_config_disagrees_with_weight_shapes", lambda w: w.eval(model="cases/widemodel"), "widemodel")
case("eval_decoding_past_max_positions", lambda w: w.eval("--task-param", "n_decode=120", task="latency",
                                                          model=SHORTPOS), "positions", "160")
case("eval_target_offset_past_max_positions", lambda w: w.eval("--task-param", "target_offset=100",
                                                               task="translate_stream", model=SHORTPOS),
     "positions", "160")
case("eval_target_offset_far_past_positions", lambda w: w.eval("--task-param", "target_offset=10000",
                                                               task="translate_stream"), "positions", "4096")
case("build_model_path_with_corrupt_config", lambda w: ["build-model", "path:cases/corruptcfg", "--out",
                                                        "resources/models/new"], "corruptcfg", "config.json")
case("build_model_path_with_config_not_an_object", lambda w: ["build-model", "path:cases/listcfg", "--out",
                                                              "resources/models/new"], "listcfg", "config.json")
case("build_model_path_config_disagrees_with_weights", lambda w: ["build-model", f"path:{MISMATCH}", "--out",
                                                                  "resources/models/new"], "mismatch",
     "do not match config.json")

# ---- late errors and tracebacks: now one line, before any model load (BAD has corrupt weights)
for _id, _extra, _needles in [
    ("seed_2_to_the_70", ("--seed", str(2**70)), ("--seed", str(2**70))),
    ("seed_negative", ("--seed", "-3"), ("--seed",)),
    ("chunk_size_huge", ("--chunk-size", str(2**40)), ("chunk_size",)),
    ("param_float_for_int", ("--param", "n_sink=4.0"), ("n_sink", "4.0")),
    ("param_nan", ("--param", "n_sink=NaN"), ("n_sink", "nan")),
    ("task_param_float", ("--task-param", "wait_k=5.0"), ("wait_k", "5.0")),
    ("task_param_2_to_the_70", ("--task-param", f"wait_k={2**70}"), ("wait_k", str(2**70))),
    ("param_empty_key", ("--param", "=4"), ("key=value",)),
    ("method_name_dotdot", ("--method", ".."), ("--method", "'..'")),
    ("model_name_with_slash", ("--model-name", "a/b"), ("--model-name", "a/b")),
    ("method_name_300_characters", ("--method", LONG), ("--method", "300 characters")),
]:
    case(f"before_load_{_id}", lambda w, e=_extra: w.eval(*e, method="sink4", type_="streaming_llm", budget="32",
                                                          model=BAD), *_needles, one_line=False)
case("before_load_budget_2_to_the_70", lambda w: w.eval(method="sink4", type_="streaming_llm", budget=str(2**70),
                                                        model=BAD), "budget", str(2**70))
case("before_load_steps_zero", lambda w: ["build-model", "builtin:micro-synth", "--out", "resources/models/x",
                                          "--steps", "0"], "steps", one_line=False)
case("before_load_profile_n_prompts_huge", lambda w: ["profile", "--model", BAD, "--out", "results/heads/x.parquet",
                                                      "--n-prompts", str(10**9)], "n_prompts", one_line=False)
case("before_load_cuda_missing", lambda w: w.eval("--device", "cuda", model=BAD), "cuda", "not available",
     needs="nocuda")
case("before_load_mps_missing", lambda w: w.eval("--device", "mps", model=BAD), "mps", "not available", needs="nomps")
_data_case("before_load_source_is_a_number", _set_doc(1, source=12345), "document 1", "source", "12345", model=BAD)
_data_case("before_load_document_id_huge", _set_doc(1, id=2**70), "document", str(2**70), model=BAD)
_data_case("before_load_source_is_null", _set_doc(0, source=None), "document 0", "source", "None", model=BAD)
_data_case("before_load_target_is_a_number", _set_doc(0, target=7), "document 0", "target", model=BAD,
           task="translate_stream")


def _unknown_words(docs):
    for d in docs:
        d["source"] = d["source"] + " zzqx qqzv zzqx"


def _once(*words):
    def check(output):
        for word in words:
            assert output.count(repr(word)) == 1, f"{word!r} not reported exactly once:\n{output}"
    return check


_data_case("before_load_unknown_words", _unknown_words, "not in the builtin model's vocabulary", "'zzqx'", "'qqzv'",
           model=BAD)
CASES[-1].check = _once("zzqx", "qqzv")
case("before_load_data_is_a_folder", lambda w: w.eval(data="resources/data", model=BAD), "resources/data", "folder")
case("before_load_model_is_a_file", lambda w: w.eval(model=DATA_REL), "L128.jsonl")

# ---- newcomer friction: help that says what options mean; methods list allowed values
case("help_eval", lambda w: ["eval", "--help"], ok=_says("tokens per (layer, KV head)", "'full'", "keeps every token",
                                                          "translate_batch", "cuda:<index>", "prefill chunk", "wait_k"))
case("help_profile", lambda w: ["profile", "--help"], ok=_says("--n-prompts", "probe prompts", "default: 8"))
case("methods_list_allowed_values", lambda w: ["methods"], ok=_says("cache, original)", "one of: window, h2o",
                                                                   "accepted, ignored"))



# ----------------------------------------------------------------------------- running the cases
def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


def _mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _read_only(path: str) -> str | None:
    """Make `path` read-only (root: a read-only bind mount; others: mode 555). Returns how, or None."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return "chmod"
    if _can_mount() and _mount("--bind", path, path):
        if _mount("-o", "remount,ro,bind", path):
            return "mount"
        subprocess.run(["umount", path])
    return None


def _full_disk(w) -> bool:
    """A 512 KiB tmpfs at tiny_fs/ with a copy of the finished results, filled to the last 8 KiB."""
    mnt = w.path(FULL)
    os.makedirs(mnt)
    if not _can_mount() or not _mount("-t", "tmpfs", "-o", "size=512k", "tmpfs", mnt):
        return False
    res = os.path.join(mnt, "results")
    os.makedirs(os.path.join(res, "raw"))
    shutil.copyfile(w.raw, os.path.join(res, "raw", "done.parquet"))
    shutil.copyfile(w.all, os.path.join(res, "all.parquet"))
    st = os.statvfs(mnt)
    with open(os.path.join(mnt, "filler"), "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 8192))
    return True


@pytest.fixture(scope="session")
def cli_report(tmp_path_factory, finished, tiny_model_dir):
    """Set up every case in one workspace, run them all in one subprocess; {id: report} (+ skips)."""
    w = Workspace(tmp_path_factory.mktemp("catalogue") / "project", finished, tiny_model_dir)
    shutil.copytree(tiny_model_dir, w.path(BAD))
    with open(w.path(f"{BAD}/model.safetensors"), "wb") as f:
        f.write(b"not safetensors")
    _profiles(w)
    shutil.copytree(tiny_model_dir, w.path(SRC_MODEL))
    _model_variants(w)
    os.makedirs(w.path(RO))
    shutil.copyfile(w.raw, w.path(f"{RO}/L128_Bfull.parquet"))
    for c in CASES:
        if c.setup:
            c.setup(w)
    import torch

    available = {"ro": _read_only(w.path(RO)), "tmpfs": _full_disk(w), "nocuda": not torch.cuda.is_available(),
                 "nomps": not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    run = [c for c in CASES if not c.needs or available[c.needs]]
    spec = [dict(id=c.id, argv=[str(a) for a in c.argv(w)], cwd=w.root,
                 tops=list(TOPS) + ([FULL] if c.needs == "tmpfs" else [])) for c in run]
    spec_path, report_path = w.path("cases.json"), w.path("report.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    import inspect

    driver = f"import hashlib, os\nTOPS = {TOPS!r}\n" + inspect.getsource(_snapshot) + _DRIVER
    try:
        r = subprocess.run([sys.executable, "-c", driver, os.path.abspath(__file__), spec_path, report_path],
                           cwd=w.root, capture_output=True, text=True, env=ENV, timeout=1200)
    finally:
        if available["ro"] == "mount":
            subprocess.run(["umount", w.path(RO)])
        elif available["ro"] == "chmod":
            os.chmod(w.path(RO), 0o755)
        if available["tmpfs"]:
            subprocess.run(["umount", w.path(FULL)])
    assert r.returncode == 0, f"the case driver failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    with open(report_path) as f:
        report = json.load(f)
    return {"ws": w, "report": report, "skipped": {c.id: c.needs for c in CASES if c not in run}}


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_cli_case(cli_report, c):
    if c.id in cli_report["skipped"]:
        pytest.skip(f"needs {c.needs} (a mount: root and mount; nocuda/nomps: a machine without that device)")
    rep = cli_report["report"][c.id]
    if c.ok:
        assert rep["rc"] == 0, rep["output"][-3000:]
        c.ok(cli_report["ws"], rep)
    else:
        _check_failure(rep["output"], rep["rc"], c.needles, c.one_line)
        if c.check:
            c.check(rep["output"])
    _check_untouched(rep["changed"], [p for p in rep["new"] if not c.new_ok(p)])
    if c.needs == "tmpfs":  # nothing half-written left on the full disk
        assert not [p for p in rep["new"] if os.path.basename(p).startswith(".tmp-")]


# ----------------------------------------------------------------------------- Snakemake
# A representative subset of CONFIG_CASES through `snakemake -n` (each a real Snakemake process; all
# of them also go through `kvbench validate` above): schema errors, source parsing, method fields,
# model positions, Snakemake's own YAML errors, and duplicate keys (which its loader would accept).
SNAKEMAKE_CASES = ["unknown_method_type", "hub_source_without_revision", "wrong_type_method_parameter",
                   "length_beyond_model_positions", "duplicate_study_name", "malformed_yaml", "model_named_dotdot"]


@pytest.fixture(scope="session")
def snakemake_runs(tmp_path_factory, finished, tiny_model_dir):
    """Every Snakemake case (and a missing config file) in its own workspace, run two at a time."""
    makes = {i: m for i, m, _ in CONFIG_CASES}
    jobs = {}
    for cid in SNAKEMAKE_CASES + ["missing_config_file"]:
        root = tmp_path_factory.mktemp(f"smk_{cid}")
        w = Workspace(root / "project", finished, tiny_model_dir)
        cfg = w.path("nope.yaml") if cid == "missing_config_file" else w.path(w.write("bad.yaml", makes[cid]()))
        jobs[cid] = (w, [sys.executable, "-m", "snakemake", "-s", os.path.join(REPO, "Snakefile"), "--configfile",
                         cfg, "--directory", w.root, "-n"], _snapshot(w.root))
    out, queue, running = {}, list(jobs), {}
    while queue or running:
        while queue and len(running) < 2:
            cid = queue.pop(0)
            running[cid] = subprocess.Popen(jobs[cid][1], cwd=jobs[cid][0].root, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, env=ENV)
        cid = next(iter(running))
        p = running.pop(cid)
        text = p.communicate(timeout=600)[0]
        w, _, before = jobs[cid]
        after = _snapshot(w.root)
        out[cid] = dict(rc=p.returncode, output=text, changed=sorted(k for k in before if after.get(k) != before[k]),
                        new=sorted(set(after) - set(before)))
    return out


@pytest.mark.dag
@pytest.mark.parametrize("cid", SNAKEMAKE_CASES + ["missing_config_file"])
def test_snakemake_config_error(snakemake_runs, cid):
    """`snakemake -n --configfile BAD` stops while parsing the config, naming the key, before any job."""
    rep = snakemake_runs[cid]
    needles = {i: n for i, _, n in CONFIG_CASES}.get(cid, ("nope.yaml",))
    needles = FILE_LEVEL[cid][1] if cid in FILE_LEVEL else needles
    _check_failure(rep["output"], rep["rc"], needles, one_line=False)
    _check_untouched(rep["changed"], rep["new"])
    assert "Job stats" not in rep["output"] and "Building DAG" not in rep["output"], \
        f"Snakemake planned jobs:\n{rep['output'][-3000:]}"


# ----------------------------------------------------------------------------- in-process checks
def test_disk_full_in_process(tmp_path, finished, tiny_model_dir, monkeypatch):
    """Without root: every Parquet write raises ENOSPC; the message names the file, the finished file
    stays, no temp file is left."""
    from kvbench import cli

    w = Workspace(tmp_path / "project", finished, tiny_model_dir)
    before = _snapshot(w.root)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    monkeypatch.chdir(w.root)
    with pytest.raises(SystemExit) as e:
        cli.main(w.eval())
    assert "No space left on device" in str(e.value) and "L128_Bfull.parquet" in str(e.value), str(e.value)
    after = _snapshot(w.root)
    assert all(after.get(k) == v for k, v in before.items()), "the finished Parquet changed"
    assert not [k for k in after if os.path.basename(k).startswith(".tmp-")]


def test_builtin_geometry_matches_the_builtin_model():
    """Validation knows builtin models' head_dim and positions without building them: keep them in step."""
    from types import SimpleNamespace

    from kvbench import builtin, models

    for name in builtin.RECIPES:
        g = models.source_geometry(f"builtin:{name}")
        cfg = builtin.build_config(100, SimpleNamespace(bos_token_id=0, eos_token_id=1, pad_token_id=2),
                                   g["max_positions"])
        assert g["head_dim"] == cfg.head_dim


def test_catalogue_size():
    assert len(CASES) + len(SNAKEMAKE_CASES) >= 25


def test_ctrl_c_ends_in_one_line(tmp_path, finished, tiny_model_dir, monkeypatch, capsys):
    """Ctrl-C during an eval job: exit code 130 and "interrupted; rerun to resume", no traceback, results
    untouched (the interrupt lands where the model would load: no load needed here)."""
    from kvbench import cli, evaluate

    w = Workspace(tmp_path / "project", finished, tiny_model_dir)
    before = _snapshot(w.root)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "load_model", interrupted)
    monkeypatch.chdir(w.root)
    monkeypatch.delenv("KVBENCH_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.main(w.eval(out="results/raw/new/L128_Bfull.parquet"))
    err = capsys.readouterr().err
    assert e.value.code == 130 and "kvbench eval: interrupted; rerun to resume" in err and "Traceback" not in err, err
    after = _snapshot(w.root)
    assert all(after.get(k) == v for k, v in before.items()) and set(after) == set(before)


def test_plain_progress_lines_when_not_a_terminal():
    """Logs get one plain line per 10% (and at the end), never carriage returns; a terminal gets tqdm."""
    import io

    from kvbench.progress import PlainProgress, progress

    buf = io.StringIO()
    bar = progress(range(50), desc="ppl h2o", file=buf)
    assert isinstance(bar, PlainProgress)
    assert sum(1 for _ in bar) == 50
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue() and 5 <= len(lines) <= 11, lines
    assert lines[-1].startswith("ppl h2o: 50/50 (100%)"), lines
    buf = io.StringIO()  # builtin training's use: initial steps, a postfix, close()
    bar = progress(range(10, 20), desc="train", file=buf, initial=10, total=20)
    for _ in bar:
        bar.set_postfix(loss="1.234", refresh=False)
    bar.close()
    assert buf.getvalue().splitlines()[-1].startswith("train: 20/20 (100%)") and "loss=1.234" in buf.getvalue()


def test_position_guard_refuses_positions_past_the_model():
    """Decoding may run longer than any pre-check knows: the session the tasks see refuses the position."""
    from types import SimpleNamespace

    from kvbench.evaluate import _PositionGuard

    fed = []
    g = _PositionGuard(SimpleNamespace(feed=lambda *a, **k: fed.append(a), chunk_size=8), 16, 3)
    g.feed([1, 2], [14, 15], [0, 0])
    assert g.chunk_size == 8 and len(fed) == 1
    with pytest.raises(ValueError, match=r"sample 3: position 16 is past the model's maximum positions \(16\)"):
        g.feed([3], [16], [0])


def test_default_configs_validate_without_warnings(capsys):
    from kvbench.config import load_config, reset_warnings

    for path in (os.path.join(REPO, "config.yaml"), TINY):
        reset_warnings()
        load_config(path)
    assert "warning" not in capsys.readouterr().err


def test_atomic_dir_replaces_only_its_own_kind(tmp_path):
    """The directory writer behind build-model: a previous build of the same kind is replaced; an empty
    folder is used; any other folder, a file, or a build of another kind is refused untouched."""
    from kvbench.io import OutputError, atomic_dir

    def build(path, kind="model"):
        with atomic_dir(str(path), kind) as tmp:
            open(os.path.join(tmp, "w.txt"), "w").write("new")

    build(tmp_path / "a")
    build(tmp_path / "a")  # a rebuild
    assert open(tmp_path / "a" / "w.txt").read() == "new" and sorted(os.listdir(tmp_path)) == ["a"]
    (tmp_path / "empty").mkdir()
    build(tmp_path / "empty")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    for target, kind in ((tmp_path / "mine", "model"), (tmp_path / "file", "model"), (tmp_path / "a", "data"),
                         (tmp_path, "model")):
        with pytest.raises(OutputError, match="refusing to replace|is an existing folder"):
            build(target, kind)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and (tmp_path / "file").read_text() == "keep"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_outputs_get_the_umask_mode_not_the_private_temp_mode(tmp_path, umask):
    """mkstemp/mkdtemp create 0o600/0o700: a result renamed into place keeps the mode a plain open()
    or mkdir() gives under the process umask, so the group can read a shared results folder."""
    from kvbench.io import atomic_dir, atomic_path, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(str(tmp_path / "t.txt"), "x")
        with atomic_path(str(tmp_path / "r.parquet"), suffix=".parquet") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x")
        with atomic_dir(str(tmp_path / "m"), "model") as tmp:
            open(os.path.join(tmp, "w.txt"), "w").write("x")
    finally:
        os.umask(old)
    for name in ("t.txt", "r.parquet"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(os.stat(tmp_path / "m").st_mode) == 0o777 & ~umask
