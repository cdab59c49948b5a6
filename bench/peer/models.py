"""The two model folders the peer benchmarks share with kvbench (main venv; run from the repo root).

    PYTHONPATH=src python -m bench.peer.models          # builds both once, prints their folders

- `qwen2.5-0.5b`: kvbench's `random:qwen2.5-0.5b` (24 layers, 14 query / 2 KV heads, head_dim 64,
  hidden 896, random weights, seed 0), built by `bench._util.cached_model` into bench/.cache/models/,
  the very folder `python -m bench.decode` measures.
- `qwen2-h512`: a smaller Qwen2 shape (hidden 512, 8 layers, 8 query / 2 KV heads, head_dim 64,
  MLP 2048, vocab 32000, tied embeddings, rope_theta 1e6), random weights with seed 0, written with
  `Qwen2Config` + `save_pretrained` (and kvbench's byte tokenizer, so `bench.decode --model <folder>`
  loads it too) into bench/.cache/models/qwen2-h512-random.

Both are float32 safetensors folders that transformers 5.2 (the peer venv) loads as well as 5.23.
"""

from __future__ import annotations

import os

from bench._util import CACHE, cached_model

SMALL = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=32000, max_position_embeddings=32768,
             tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def small_qwen2(cache_dir: str = os.path.join(CACHE, "models")) -> str:
    out = os.path.join(cache_dir, "qwen2-h512-random")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from kvbench.models import byte_tokenizer

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SMALL))
    tmp = out + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    byte_tokenizer().save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def peer_models() -> dict[str, str]:
    """name -> model folder, both built once."""
    return {"qwen2.5-0.5b": cached_model("random:qwen2.5-0.5b"), "qwen2-h512": small_qwen2()}


if __name__ == "__main__":
    for name, d in peer_models().items():
        print(f"{name}\t{d}")
