"""The offline default model: a tiny Llama trained here on the synthetic translation task.

    python -m kvbench build-model builtin:tiny-synth --out resources/models/tiny

Architecture and recipe follow shared BUILTIN_MODEL.md (hidden 128, 4 layers, 4 query / 2 KV heads,
head_dim 64, word-level tokenizer). Training uses the exact stream layout of inference
(`kvbench.streams`): wait-k interleaving with a random k per document (including the oracle layout,
k = inf), Group Position Encoding, and the GPE attention mask; the loss is on target tokens only.
The result is a normal HF folder (config.json, tokenizer.json, model.safetensors) plus
`training_log.csv` (the loss curve) and `build_info.json`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

from . import streams, synth
from .io import MARKER, atomic_dir, sha256_file
from .progress import progress

RECIPES = {
    # name -> training recipe; "tiny-synth" is the real one, "micro-synth" is for fast tests only
    "tiny-synth": dict(steps=2400, tokens_per_step=4096, lengths=(256, 512, 1024, 2048)),
    "micro-synth": dict(steps=40, tokens_per_step=2048, lengths=(128, 256)),
}
WAIT_KS = (1, 2, 3, 4, 5, 6, 8, 10, 15, streams.WAIT_INF)


@dataclass
class Recipe:
    steps: int = 1200
    tokens_per_step: int = 4096
    lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    lr: float = 3e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    seed: int = 0
    target_offset: int = 0
    max_positions: int = 4096


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(synth.lexicon().vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_config(vocab_size: int, tokenizer, max_positions: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
    )


def training_example(tokenizer, lex, length: int, rng: random.Random, target_offset: int):
    """One document as a training stream: (ids, pos, role) tensors and the loss mask."""
    doc = synth.make_document(rng.randrange(10**9), length, seed=rng.randrange(10**9), lex=lex)
    vocab = tokenizer.get_vocab()
    src = [[vocab[w]] for w in doc.source]
    tgt = [[vocab[synth.TARGET_START]]] + [[vocab[w]] for w in doc.target]
    instr = [tokenizer.bos_token_id] + [vocab[w] for w in synth.INSTRUCTION]
    return streams.build_stream(instr, src, tgt, k=rng.choice(WAIT_KS), target_offset=target_offset,
                               eos=tokenizer.eos_token_id)


def batch(tokenizer, lex, length: int, n: int, rng: random.Random, target_offset: int):
    """(B, T) ids, positions, labels and a (B, 1, T, T) additive float mask."""
    ids = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.long)
    pos = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    mask = torch.zeros((n, 1, length, length), dtype=torch.bool)
    for b in range(n):
        s = training_example(tokenizer, lex, length, rng, target_offset)
        t = len(s.ids)
        i, p, r = s.tensors()
        ids[b, :t], pos[b, :t] = i, p
        # transformers shifts labels by one (logits[t] vs labels[t + 1]); our labels are already
        # aligned to the token that predicts them, so place them one step later
        m = min(t, length - 1)
        labels[b, 1 : m + 1] = torch.tensor(s.labels[:m])
        mask[b, 0, :t, :t] = streams.stream_mask(r)
        mask[b, 0, t:, :] = True  # padding rows: attend anywhere (no NaNs; they carry no loss)
    return ids, pos, labels, mask


def lr_at(step: int, r: Recipe) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    frac = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _save_checkpoint(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact


def _load_checkpoint(path: str, recipe: Recipe, log) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, weights_only=True)  # tensors and plain Python values only: no pickle code
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint is discarded, never trusted
        print(f"ignoring unreadable training checkpoint {path}: {type(e).__name__}: {e}", file=log)
        return None
    if state.get("recipe") != asdict(recipe):
        print(f"ignoring training checkpoint {path}: it was written for another recipe", file=log)
        return None
    return state


def train(name: str, out: str, seed: int = 0, steps: int | None = None, log=None,
          checkpoint_every: int = 100, stop_after: int | None = None) -> dict:
    """Build tokenizer + model, train with the named recipe, save an HF folder atomically.

    Training state (weights, optimizer, RNG states, loss history) is checkpointed every
    `checkpoint_every` steps to `<out>.ckpt`; a rerun with the same recipe resumes from it and ends
    bit-identical to an uninterrupted run. `stop_after` ends this call after that many steps in
    total, leaving the checkpoint (training in slices, e.g. under a cluster time limit); it returns
    {"complete": False, ...} and writes no model folder.
    """
    from transformers import LlamaForCausalLM

    if name not in RECIPES:
        raise ValueError(f"unknown builtin model {name!r}; known: {sorted(RECIPES)}")
    recipe = Recipe(**{**RECIPES[name], "seed": seed})
    if steps is not None:
        recipe.steps = steps
    log = log if log is not None else sys.stderr
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    lex = synth.lexicon()
    config = build_config(len(tokenizer), tokenizer, recipe.max_positions)
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=recipe.betas,
    )
    ckpt = os.path.abspath(out).rstrip("/") + ".ckpt"
    history: list[tuple] = []
    tokens, start, resumed_from, elapsed = 0, 0, None, 0.0
    state = _load_checkpoint(ckpt, recipe, log)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        history, tokens, start, elapsed = state["history"], state["tokens"], state["step"], state["seconds"]
        resumed_from = start
        print(f"resuming training from {ckpt} at step {start}/{recipe.steps}", file=log)
    t0 = time.perf_counter() - elapsed
    end = recipe.steps if stop_after is None else min(recipe.steps, stop_after)
    bar = progress(range(start, end), desc=f"train {name}", file=log, mininterval=10, initial=start,
               total=recipe.steps)
    for step in bar:
        length = rng.choice(recipe.lengths)
        n = max(1, recipe.tokens_per_step // length)
        ids, pos, labels, mask = batch(tokenizer, lex, length, n, rng, recipe.target_offset)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe)
        # a 4-D mask is used as given by transformers' mask preparation
        addmask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
        outx = model(input_ids=ids, position_ids=pos, attention_mask=addmask, labels=labels)
        opt.zero_grad(set_to_none=True)
        outx.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += ids.numel()
        history.append((step, length, outx.loss.item(), lr_at(step, recipe), time.perf_counter() - t0))
        bar.set_postfix(loss=f"{outx.loss.item():.3f}", refresh=False)
        done = step + 1
        if done < recipe.steps and (done % checkpoint_every == 0 or done == end):
            _save_checkpoint(ckpt, {
                "recipe": asdict(recipe), "step": done, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "python_rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                "history": history, "tokens": tokens, "seconds": time.perf_counter() - t0,
            })
    bar.close()
    if end < recipe.steps:
        return {"builtin": name, "complete": False, "step": end, "steps": recipe.steps, "checkpoint": ckpt}
    wall = time.perf_counter() - t0
    model.eval()
    info = {
        "builtin": name, "complete": True, "recipe": asdict(recipe), "train_seconds": round(wall, 1),
        "train_tokens": tokens, "tokens_per_second": round(tokens / wall, 1), "final_loss": history[-1][2],
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(), "resumed_from_step": resumed_from,
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "training_log.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "length", "loss", "lr", "seconds"])
            w.writerows(history)
        with open(os.path.join(tmp, "build_info.json"), "w") as f:
            json.dump(info, f, indent=2)
    if os.path.exists(ckpt):
        os.remove(ckpt)
    return info


SHIPPED = os.path.join(os.path.dirname(__file__), "weights")  # weights/<name>/: trained weights in the package
CHECKSUMS = "SHA256SUMS"


def shipped_dir(name: str) -> str | None:
    """The package folder holding `name`'s shipped weights, or None if none are shipped."""
    d = os.path.join(SHIPPED, name)
    return d if os.path.exists(os.path.join(d, CHECKSUMS)) else None


def verify_shipped(d: str) -> dict[str, str]:
    """Check every file of a shipped folder against its SHA256SUMS; ValueError naming the first mismatch."""
    sums = {}
    for line in open(os.path.join(d, CHECKSUMS)):
        digest, fname = line.split(None, 1)
        sums[fname.strip()] = digest
    missing = [f for f in sums if not os.path.exists(os.path.join(d, f))]
    if missing:
        raise ValueError(f"shipped builtin model {d}: {', '.join(missing)} is missing; reinstall kvbench or "
                         f"build with --train")
    for fname, digest in sums.items():
        if sha256_file(os.path.join(d, fname)) != digest:
            raise ValueError(f"shipped builtin model {d}: {fname} does not match its sha256 in {CHECKSUMS} "
                             f"(corrupt or edited); reinstall kvbench or build with --train")
    return sums


def ship(model_dir: str, name: str, commit: str, dest_root: str = SHIPPED) -> str:
    """Copy a trained model folder into the package as `name`'s shipped weights, with SHA256SUMS.

    `commit` is the git commit whose training code produced the folder; it goes into build_info.json.
    """
    import shutil

    info = json.load(open(os.path.join(model_dir, "build_info.json")))
    if not info.get("complete") or info.get("builtin") != name:
        raise ValueError(f"{model_dir} is not a complete training run of builtin:{name}")
    dest = os.path.join(dest_root, name)
    with atomic_dir(dest, kind="shipped-model") as tmp:
        files = sorted(f for f in os.listdir(model_dir) if os.path.isfile(os.path.join(model_dir, f))
                       and f not in ("kvbench_source.json", "build_info.json", MARKER))
        for f in files:
            shutil.copy2(os.path.join(model_dir, f), os.path.join(tmp, f))
        with open(os.path.join(tmp, "build_info.json"), "w") as fh:
            json.dump({**info, "trained_at_commit": commit}, fh, indent=2)
        files.append("build_info.json")
        with open(os.path.join(tmp, CHECKSUMS), "w") as fh:
            fh.writelines(f"{sha256_file(os.path.join(tmp, f))}  {f}\n" for f in files)
    return dest


def build(name: str, out: str, seed: int = 0, steps: int | None = None, retrain: bool = False, log=None) -> dict:
    """The builtin model `name` in `out`.

    The trained weights shipped in the package (checked by sha256) are copied, which takes seconds;
    `retrain=True`, a `steps` override or a builtin with no shipped weights trains from scratch
    (checkpointed and resumable, see `train`). The shipped folder's build_info.json records the
    commit, seed and recipe it was trained with, and its training_log.csv the loss curve.
    """
    import shutil

    log = log if log is not None else sys.stderr
    src = None if (retrain or steps is not None) else shipped_dir(name)
    if src is None:
        if name in RECIPES and not retrain and steps is None:
            print(f"builtin:{name} has no shipped weights; training it (this takes a while)", file=log)
        return train(name, out, seed=seed, steps=steps, log=log)
    verify_shipped(src)
    info = json.load(open(os.path.join(src, "build_info.json")))
    if seed != info.get("recipe", {}).get("seed", seed):
        print(f"builtin:{name}: using the shipped weights (trained with seed {info['recipe']['seed']}); "
              f"--seed {seed} applies to data only; build with --train to train with seed {seed}", file=log)
    with atomic_dir(out) as tmp:
        for f in os.listdir(src):
            if f not in (CHECKSUMS, MARKER):
                shutil.copy2(os.path.join(src, f), os.path.join(tmp, f))
    print(f"builtin:{name}: copied the shipped weights (sha256 checked) from {src}", file=log)
    return {**info, "shipped": True}
