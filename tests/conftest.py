"""Shared fixtures: a tiny random-weight model in the builtin format, loaded once per session."""

from __future__ import annotations

import json
import os

import pytest
import torch


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


def pytest_configure(config):
    # subprocesses (CLI, Snakemake jobs) inherit this; in-process torch is capped here too
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
