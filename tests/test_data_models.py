"""Data building and model sources: determinism, schema, loading, and errors before work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvbench import data, synth
from kvbench.models import SourceError, parse_source


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kvbench", *args], capture_output=True, text=True, cwd=cwd)


def test_make_data_same_seed_identical_other_seed_differs(tmp_path):
    cfg = {"source": "synthetic"}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        data.make_data(cfg, 512, 3, seed, str(tmp_path / f"{name}.jsonl"))
    a, b, c = ((tmp_path / f"{n}.jsonl").read_bytes() for n in "abc")
    assert a == b and a != c
    docs = data.read_docs(str(tmp_path / "a.jsonl"))
    assert len(docs) == 3 and all(d["n_tokens"] <= 512 for d in docs)
    assert set(docs[0]) == set(data.FIELDS)
    assert len(docs[0]["source"].split()) == len(docs[0]["target"].split())


def test_documents_have_long_range_bindings():
    lex = synth.lexicon()
    names = synth.name_tokens(lex)
    d = synth.make_document(0, 2048, seed=0, lex=lex)
    share = sum(w in names for w in d.target) / len(d.target)
    assert 0.1 < share < 0.35
    # a name used late in the document was bound in its first sentences
    first_binding = d.source.index(lex.src["called"][0])
    assert first_binding < 40 and any(w in names for w in d.target[-100:])


def test_target_names_are_target_language_words():
    """A reference "the ROLE" translates to the bound name's target forms; no token is shared between
    the two sides except "." (under GPE a shared token would not tell the model which side it is on)."""
    lex = synth.lexicon()
    d = synth.make_document(0, 1024, seed=1, lex=lex)
    shared = set(d.source) & set(d.target)
    assert shared == {"."}
    called = lex.src["called"][0]
    bindings = {d.source[i - 2]: (d.source[i + 1], d.source[i + 2]) for i, w in enumerate(d.source) if w == called}
    role_src = {w: r for r, w in enumerate(lex.src["role"])}
    refs = 0
    for i, w in enumerate(d.source):
        if w in bindings and d.source[i + 1] != lex.src["cop"][0]:  # a reference, not the binding
            first, last = bindings[w]
            assert d.target[i - 1 : i + 1] == [first + "x", last + "x"]
            r = role_src[w]
            assert first + "x" in lex.tfirst[r] and last + "x" in lex.tlast[r]
            refs += 1
    assert refs > 5


def test_length_too_small_is_an_error():
    with pytest.raises(ValueError, match="too small for one sentence pair"):
        synth.make_document(0, 10, seed=0)


def test_length_beyond_max_positions(tmp_path):
    with pytest.raises(ValueError, match="beyond the model's maximum positions"):
        data.make_data({"source": "synthetic"}, 9000, 1, 0, str(tmp_path / "x.jsonl"), max_positions=4096)


def test_hf_datasets_path_on_local_files(tmp_path, tiny_model_dir):
    """load_dataset with data_files, in IWSLT-17's and WikiText's own column layouts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"translation": {"en": f"ka buda esi namo Rito Deduda . {i}", "fr": f"kax tapyx . {i}"}} for i in range(40)]
    f = tmp_path / "iwslt.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"source": "hf", "path": "json", "data_files": str(f), "split": "train", "src_lang": "en", "tgt_lang": "fr"}
    out = tmp_path / "out.jsonl"
    n = data.make_data(cfg, 128, 2, 0, str(out), tokenizer=tok)
    docs = data.read_docs(str(out))
    assert n == 2 and docs[0]["src_lang"] == "en" and docs[0]["target"].startswith("kax")
    w = tmp_path / "wiki.jsonl"  # WikiText's rows: paragraph lines with blank rows between them
    w.write_text("\n".join(json.dumps({"text": t}) for _ in range(30) for t in ("ka buda esi namo ." * 3, "")))
    cfg = {"source": "hf", "path": "json", "data_files": str(w), "split": "train"}
    data.make_data(cfg, 64, 1, 0, str(out), tokenizer=tok)
    assert data.read_docs(str(out))[0]["target"] == ""
    assert data.dataset_kind(cfg, data._rows(cfg)) == "paragraphs"


@pytest.mark.parametrize("source,msg", [
    ("ftp:foo", "unknown model source"),
    ("hub:Qwen/Qwen2.5-0.5B-Instruct", "no pinned revision"),
    ("path:/nonexistent/model", "does not exist"),
    ("random:gpt-17", "unknown random architecture"),
    ("builtin:huge", "unknown builtin model"),
])
def test_bad_sources(source, msg):
    with pytest.raises(SourceError, match=msg):
        parse_source(source)


def test_hub_offline_names_repo_and_suggests_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run_cli("build-model", "hub:org/some-model@0123abc", "--out", str(tmp_path / "m"))
    assert r.returncode != 0
    assert "org/some-model@0123abc" in r.stderr and "path:" in r.stderr
    assert not (tmp_path / "m").exists()


def test_path_source_and_loading(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = run_cli("build-model", f"path:{tiny_model_dir}", "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tmp_path / "m")
    info = json.loads((tmp_path / "m" / "kvbench_source.json").read_text())
    assert info["scheme"] == "path" and len(info["revision"]) == 16


def test_random_architecture_has_published_shape(tmp_path):
    from kvbench.models import RANDOM_ARCHS

    from transformers import AutoConfig

    spec = dict(RANDOM_ARCHS["qwen2.5-0.5b"])
    kind = spec.pop("arch")
    spec.pop("rope_theta")
    cfg = AutoConfig.for_model(kind, **spec)
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size) == (24, 2, 896)


def test_builtin_micro_build_loads(tmp_path):
    """The real builtin path end to end (a few training steps), loaded by from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "micro"
    r = run_cli("build-model", "builtin:micro-synth", "--out", str(out), "--steps", "3")
    assert r.returncode == 0, r.stderr
    AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_ids_to_tokens(tok("ka buda .")["input_ids"]) == ["ka", "buda", "."]
    assert (out / "training_log.csv").read_text().count("\n") == 4
    assert json.loads((out / "kvbench_source.json").read_text())["quality_meaningful"] is True
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path))


def test_builtin_training_resumes_bit_identical(tmp_path):
    """Training killed after a checkpoint resumes from it and ends with the same weights and loss
    curve as an uninterrupted run; a checkpoint of another recipe is ignored."""
    import io

    from safetensors.torch import load_file

    from kvbench.builtin import train

    full = train("micro-synth", str(tmp_path / "full"), steps=6, log=io.StringIO())
    part = train("micro-synth", str(tmp_path / "cut"), steps=6, checkpoint_every=2, stop_after=3, log=io.StringIO())
    assert part["complete"] is False and os.path.exists(part["checkpoint"])
    assert not (tmp_path / "cut").exists()
    log = io.StringIO()
    info = train("micro-synth", str(tmp_path / "cut"), steps=6, log=log)
    assert "resuming training" in log.getvalue() and info["resumed_from_step"] == 3
    assert not os.path.exists(part["checkpoint"])  # removed once the model folder is written
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    strip = lambda t: [line.split(",")[:4] for line in t.splitlines()]  # noqa: E731 - drop wall seconds
    assert strip((tmp_path / "full" / "training_log.csv").read_text()) == strip(
        (tmp_path / "cut" / "training_log.csv").read_text())
    assert full["final_loss"] == info["final_loss"]
    # a checkpoint written for another recipe (here: another step count) is not trusted
    train("micro-synth", str(tmp_path / "other"), steps=6, checkpoint_every=2, stop_after=2, log=io.StringIO())
    log = io.StringIO()
    info = train("micro-synth", str(tmp_path / "other"), steps=4, log=log)
    assert "another recipe" in log.getvalue() and info["resumed_from_step"] is None
