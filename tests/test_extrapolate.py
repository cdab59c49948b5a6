"""Streams past the model's max_position_embeddings: refused unless asked for (`extrapolate`), and then
every row records the largest RoPE position it gave, so the full cache's extrapolated positions and
StreamingLLM's bounded ones can be told apart in the tables."""

import json

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from kvbench import builtin
from kvbench.config import ConfigError, load_config
from kvbench.data import make_data
from kvbench.evaluate import run_eval
from kvbench.streams import PositionRule

MAX_POS = 256
LENGTH = 768
BUDGET = 32


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """The builtin architecture with random weights and only 256 positions."""
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("short_model")
    tok = builtin.build_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(builtin.build_config(len(tok), tok, MAX_POS)).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    (d / "build_info.json").write_text(json.dumps({"builtin": "random-test"}))
    return str(d)


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("long") / f"L{LENGTH}.jsonl")
    make_data({"source": "synthetic"}, LENGTH, 1, 0, path)  # no max_positions: as with --extrapolate
    return path


def _eval(model, data, out, method, mtype, params, budget, **kw):
    run_eval(model_dir=model, task="ppl", data=data, method=method, method_type=mtype, params=params,
             budget=budget, length=LENGTH, out=str(out), device="cpu", **kw)
    return pq.read_table(str(out)).to_pylist()


def test_refused_without_extrapolate(short_model, long_data, tmp_path):
    with pytest.raises(ValueError, match="beyond the model's maximum positions.*--extrapolate"):
        _eval(short_model, long_data, tmp_path / "x.parquet", "full", "full", {}, "full")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="beyond the model's maximum positions"):
        make_data({"source": "synthetic"}, LENGTH, 1, 0, str(tmp_path / "d.jsonl"), max_positions=MAX_POS)


def test_rows_record_the_positions_given(short_model, long_data, tmp_path):
    full = _eval(short_model, long_data, tmp_path / "full.parquet", "full", "full", {}, "full", extrapolate=True)
    sink = _eval(short_model, long_data, tmp_path / "sink.parquet", "sink4", "streaming_llm",
                 {"n_sink": 4, "positions": "shifted"}, str(BUDGET), extrapolate=True)
    orig = _eval(short_model, long_data, tmp_path / "orig.parquet", "sink4_orig", "streaming_llm",
                 {"n_sink": 4, "positions": "original"}, str(BUDGET), extrapolate=True)
    for rows in (full, sink, orig):
        assert rows[0]["model_max_positions"] == MAX_POS
    # the full cache and original positions run past the model's range (GPE: about half the length)
    assert full[0]["max_position"] >= MAX_POS
    assert orig[0]["max_position"] == full[0]["max_position"]
    # re-indexed positions stay within the rule's bound, whatever the length
    assert sink[0]["max_position"] <= PositionRule("shifted", n_sink=4).bound(BUDGET) < MAX_POS
    assert sink[0]["max_position"] >= BUDGET // 2  # a cache's worth of positions (two GPE groups share B)


def _config(tmp_path, model_dir, extrapolate):
    cfg = {"models": {"m": {"source": f"path:{model_dir}", "extrapolate": extrapolate}},
           "datasets": {"synth": {"source": "synthetic", "n_samples": 1}},
           "tasks": {"ppl": {"wait_k": 5}},
           "methods": {"full": {"type": "full"}},
           "studies": {"s": {"tasks": ["ppl"], "methods": ["full"], "lengths": [LENGTH], "budgets": ["full"]}}}
    p = tmp_path / f"config_{extrapolate}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_config_names_the_key(short_model, tmp_path):
    with pytest.raises(ConfigError, match="beyond the maximum positions.*extrapolate: true"):
        load_config(_config(tmp_path, short_model, False))
    assert load_config(_config(tmp_path, short_model, True))["models"]["m"]["extrapolate"] is True


def test_version_1_files_read_with_the_new_columns_null(short_model, tmp_path):
    """Results written before these columns existed still aggregate (their values: unknown)."""
    import pyarrow as pa

    from kvbench import schema
    from kvbench.aggregate import read_raw

    data = str(tmp_path / "L128.jsonl")
    make_data({"source": "synthetic"}, 128, 1, 0, data)
    run_eval(model_dir=short_model, task="ppl", data=data, method="full", method_type="full", params={},
             budget="full", length=128, out=str(tmp_path / "new.parquet"), device="cpu")
    t = pq.read_table(str(tmp_path / "new.parquet"))
    assert t.column("max_position").to_pylist()[0] > 0
    old = t.drop_columns(list(schema.ADDED_IN[2]))
    old = old.set_column(0, "schema_version", pa.array([1] * old.num_rows, pa.int32()))
    pq.write_table(old, str(tmp_path / "old.parquet"))
    back = read_raw([str(tmp_path / "old.parquet")])
    assert back.column("max_position").to_pylist() == [None]
    # a file of the current version that lacks them is broken, not old
    pq.write_table(t.drop_columns(["max_position"]), str(tmp_path / "broken.parquet"))
    with pytest.raises(schema.SchemaError, match="max_position"):
        read_raw([str(tmp_path / "broken.parquet")])
