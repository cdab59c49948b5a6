"""Model sources behind one loader.

    builtin:<name>        built and trained here on the synthetic task (the offline default)
    path:<dir>            a local Hugging Face folder
    hub:<repo>@<revision> snapshot_download with the revision pinned
    random:<arch>         a real architecture's published shape with random weights (memory and
                          latency only: quality columns are flagged not meaningful)

`build_model(source, out)` materialises any source as a normal HF folder at `out` with a
`kvbench_source.json` beside the weights; `out` may only be new, empty or a previous model build
(kvbench.io.atomic_dir), and a local or downloaded folder is checked before it is kept (config.json
readable, tokenizer, safetensors weights that match the config). `load_model(dir)` loads it with
safetensors only and no remote code unless the config asks for it, and refuses weights that do not
match the config (missing, unexpected or resized tensors would be randomly initialised).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys

from .io import atomic_dir, atomic_write_text, check_out_dir

SCHEMES = ("builtin", "path", "hub", "random")

# published shapes (config.json of each model); vocab sizes as published
RANDOM_ARCHS = {
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True),
    "qwen2.5-7b": dict(arch="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False),
    "llama-3.2-1b": dict(arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=5e5, tie_word_embeddings=True),
    "llama-3.1-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=5e5, tie_word_embeddings=False),
    # GPT-NeoX: rotary on the first quarter of each head, attention and MLP in parallel
    "pythia-70m": dict(arch="gpt_neox", hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                       num_attention_heads=8, vocab_size=50304, max_position_embeddings=2048, rope_theta=1e4,
                       partial_rotary_factor=0.25, use_parallel_residual=True, tie_word_embeddings=False),
}
# tiny twins of those architectures (the paper-shaped smoke run, config/paper_smoke.yaml): same model
# type and attention features (GQA, qkv bias, partial rotary, parallel residual), two layers
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, max_position_embeddings=32768)
RANDOM_ARCHS.update({
    "tiny-qwen2": dict(TINY, arch="qwen2", rope_theta=1e6, tie_word_embeddings=True),
    "tiny-llama": dict(TINY, arch="llama", rope_theta=5e5, tie_word_embeddings=False),
    "tiny-llama-mha": dict(TINY, arch="llama", num_key_value_heads=4, max_position_embeddings=4096, rope_theta=1e4,
                           tie_word_embeddings=False),  # Llama-2: one KV head per query head
    # GPT-NeoX: no GQA field
    "tiny-gpt-neox": dict({k: v for k, v in TINY.items() if k != "num_key_value_heads"}, arch="gpt_neox",
                          max_position_embeddings=2048, rope_theta=1e4, partial_rotary_factor=0.25,
                          use_parallel_residual=True, tie_word_embeddings=False),
})


DTYPES = ("float32", "float16", "bfloat16")
BUILTIN_HEAD_DIM = 64  # builtin.build_config (shared BUILTIN_MODEL.md); tests/test_bad_inputs.py checks it


class SourceError(ValueError):
    pass


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def check_device(device: str, available: bool = False) -> None:
    """auto | cpu | cuda | cuda:<index> | mps (checked before anything is loaded); with `available`,
    the device must also exist on this machine (a config is validated where it may not)."""
    base, _, index = str(device).partition(":")
    if base not in ("auto", "cpu", "cuda", "mps") or (index and (base != "cuda" or not index.isdigit())):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:<index> or mps")
    if not available or base in ("auto", "cpu"):
        return
    import torch

    if base == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {device!r}: CUDA is not available on this machine; use --device cpu (or auto)")
        if index and int(index) >= n:
            raise ValueError(f"device {device!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: MPS (Apple GPU) is not available on this machine; use --device cpu")


def _geometry(cfg: dict) -> dict:
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if cfg.get("hidden_size") and heads else None)
    return {"max_positions": cfg.get("max_position_embeddings"), "head_dim": head_dim}


def source_geometry(source: str) -> dict | None:
    """{'max_positions', 'head_dim'} of a source's model without building or loading it, or None when
    only the model itself knows (hub sources). Call parse_source first."""
    scheme, name, _ = parse_source(source)
    if scheme == "builtin":
        from .builtin import RECIPES, Recipe

        return {"max_positions": Recipe(**RECIPES[name]).max_positions, "head_dim": BUILTIN_HEAD_DIM}
    if scheme == "random":
        _check_served(RANDOM_ARCHS[name]["arch"], source)
        return _geometry(RANDOM_ARCHS[name])
    if scheme == "path":
        geom = folder_geometry(name)
        with open(os.path.join(name, "config.json"), encoding="utf-8") as f:
            _check_served(json.load(f).get("model_type"), source)
        return geom
    return None


def _check_served(model_type, source: str) -> None:
    """ValueError naming an architecture the cache engine cannot serve (kvbench validate, before any build)."""
    from .engine.hf import check_architecture

    try:
        check_architecture(model_type)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def folder_geometry(model_dir: str) -> dict:
    """The same from a model folder's config.json (ValueError naming the file if it is unreadable)."""
    p = os.path.join(model_dir, "config.json")
    try:
        with open(p, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: not a readable model config ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: not a model config (a JSON object)")
    return _geometry(cfg)


def _weight_shapes(model_dir: str) -> dict[str, tuple]:
    from safetensors import safe_open

    shapes = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            p = os.path.join(model_dir, name)
            try:
                with safe_open(p, "pt") as f:
                    for k in f.keys():
                        shapes[k] = tuple(f.get_slice(k).get_shape())
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file: name it
                raise ValueError(f"{p}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return shapes


def _describe(problems: dict[str, list]) -> str:
    parts = []
    for what, keys in problems.items():
        if keys:
            keys = sorted(keys)
            parts.append(f"{len(keys)} {what} ({', '.join(map(str, keys[:3]))}{', ...' if len(keys) > 3 else ''})")
    return "; ".join(parts)


def check_model_folder(model_dir: str, trust_remote_code: bool = False) -> None:
    """A Hugging Face folder kvbench can load, checked without loading the weights: config.json is a
    config transformers reads, a tokenizer loads, there are safetensors weights, and their tensor
    names and shapes are exactly those the config builds (on the meta device: no memory used).
    ValueError naming the folder and the problem."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder_geometry(model_dir)  # config.json: readable JSON object
    try:
        cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{os.path.join(model_dir, 'config.json')}: not a model config transformers reads "
                         f"({type(e).__name__}: {e})") from None
    try:
        AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{model_dir!r}: no usable tokenizer ({type(e).__name__}: {e})") from None
    have = _weight_shapes(model_dir)
    if not have:
        raise ValueError(f"{model_dir!r} has no *.safetensors weights (kvbench loads safetensors only)")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{os.path.join(model_dir, 'config.json')}: cannot build a causal LM from it "
                         f"({type(e).__name__}: {e})") from None
    have = _as_loaded(model, have)
    if have is None:
        return  # checkpoint tensors are merged or split while loading: load_model checks those
    state = model.state_dict()
    want = {k: tuple(v.shape) for k, v in state.items()}
    # tied weights appear once in named_parameters (e.g. lm_head = embeddings): either name will do
    required = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers() if n in state}
    ignore = [*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    problems = {"missing tensors": required - set(have),
                "unexpected tensors": {k for k in set(have) - set(want)
                                       if not any(re.search(p, k) for p in ignore)},
                "tensors of another shape": {f"{k} {have[k]} vs {want[k]}" for k in set(have) & set(want)
                                             if have[k] != want[k]}}
    if any(problems.values()):
        raise ValueError(f"{model_dir!r}: the weights do not match config.json: {_describe(problems)}")


def _as_loaded(model, have: dict[str, tuple]) -> dict[str, tuple] | None:
    """Checkpoint tensor names as transformers renames them while loading (its legacy and per-model
    renamings, a missing base-model prefix), or None when it also merges or splits tensors."""
    import re

    try:
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - another transformers: compare the names as stored
        transforms = []
    if any(not isinstance(t, WeightRenaming) for t in transforms):
        return None
    out = {}
    for key, shape in have.items():
        for t in transforms:
            for src, dst in zip(t.source_patterns, t.target_patterns):
                key = re.sub(src, dst, key)
        out[key] = shape
    prefix = getattr(model, "base_model_prefix", "")
    names = set(model.state_dict())
    if prefix and not (set(out) & names) and {f"{prefix}.{k}" for k in out} & names:
        out = {f"{prefix}.{k}": v for k, v in out.items()}
    return out


def parse_source(source: str) -> tuple[str, str, str | None]:
    """'hub:Qwen/Qwen2.5-0.5B-Instruct@abc123' -> ('hub', 'Qwen/...', 'abc123'). Checks, no work."""
    scheme, sep, rest = source.partition(":")
    if not sep or scheme not in SCHEMES:
        raise SourceError(f"unknown model source {source!r}: use one of {', '.join(s + ':' for s in SCHEMES)}")
    if not rest:
        raise SourceError(f"model source {source!r} names nothing after '{scheme}:'")
    if scheme == "hub":
        repo, at, rev = rest.partition("@")
        if not at or not rev:
            raise SourceError(f"hub source {source!r} has no pinned revision: write hub:{repo}@<commit-sha or tag>")
        return scheme, repo, rev
    if scheme == "path" and not os.path.isdir(rest):
        raise SourceError(f"model source {source!r}: local path {rest!r} does not exist")
    if scheme == "path" and not os.path.exists(os.path.join(rest, "config.json")):
        raise SourceError(f"model source {source!r}: {rest!r} has no config.json (not a Hugging Face model folder)")
    if scheme == "random" and rest not in RANDOM_ARCHS:
        raise SourceError(f"unknown random architecture {rest!r}; known: {sorted(RANDOM_ARCHS)}")
    if scheme == "builtin":
        from .builtin import RECIPES

        if rest not in RECIPES:
            raise SourceError(f"unknown builtin model {rest!r}; known: {sorted(RECIPES)}")
    return scheme, rest, None


_NOT_HASHED = ("kvbench_source.json", "build_info.json")


def folder_hash(d: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(d)):
        # build_info.json holds training times: the same weights must keep the same revision
        if name.endswith((".json", ".safetensors", ".txt", ".model")) and name not in _NOT_HASHED:
            with open(os.path.join(d, name), "rb") as f:
                h.update(name.encode())
                h.update(f.read())
    return h.hexdigest()[:16]


def random_config(arch: str):
    """The transformers config of a RANDOM_ARCHS entry."""
    from transformers import AutoConfig

    spec = dict(RANDOM_ARCHS[arch])
    kind = spec.pop("arch")
    rope = {"rope_type": "default", "rope_theta": spec.pop("rope_theta")}
    if "partial_rotary_factor" in spec:  # GPT-NeoX's rotary_pct lives in rope_parameters
        rope["partial_rotary_factor"] = spec.pop("partial_rotary_factor")
    return AutoConfig.for_model(kind, **spec, rope_parameters=rope)


def _random_model(arch: str, tmp: str, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = random_config(arch)
    torch.manual_seed(seed)
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(cfg)  # fail fast on a bad shape before allocating
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp, safe_serialization=True)
    byte_tokenizer().save_pretrained(tmp)


# a ChatML template, as Qwen2.5's: the translation prompt of hub chat models takes the same route
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer():
    """The tokenizer of random: models: byte-level BPE with no merges (GPT-2's byte alphabet, every byte a
    token, a word's first token carrying its space as 'Ġ'), special tokens and a chat template. Any text
    tokenizes (several tokens per word, as with hub models); the texts a random model writes mean nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _check_build(scheme: str, name: str, out: str, steps, log) -> None:
    """Everything build_model can check before it starts (a build may train for minutes)."""
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"--steps must be an integer >= 1, got {steps!r}")
    check_out_dir(out, "model")
    if steps is not None and scheme != "builtin":
        print(f"warning: --steps {steps} is ignored: only builtin: models are trained here", file=log)
    if scheme == "path":
        src, dst = os.path.realpath(name), os.path.realpath(out)
        if src != dst and (dst.startswith(src + os.sep) or src.startswith(dst + os.sep)):
            raise ValueError(f"--out {out!r} and the source folder {name!r} lie inside one another")
        check_model_folder(name)


HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def is_commit(rev: str | None) -> bool:
    """A full commit hash (the only revision that cannot move)."""
    return bool(rev) and re.fullmatch(r"[0-9a-f]{40}", rev) is not None


def _hub_snapshot(repo: str, rev: str) -> str:
    """The repo's files at `rev` in the Hugging Face cache (HF_HOME / HF_HUB_CACHE): downloaded, or
    found there when offline (HF_HUB_OFFLINE=1, a cache filled elsewhere). Returns the snapshot folder,
    whose name is the resolved commit."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=repo, revision=rev, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, no network: say what to do instead
        raise SourceError(
            f"could not get {repo}@{rev} from the hub or the local Hugging Face cache ({type(e).__name__}: {e}). "
            f"Without network, fill the cache elsewhere (HF_HUB_CACHE, then HF_HUB_OFFLINE=1) or use path:<dir>"
        ) from e


def _link_files(src: str, dst: str) -> None:
    """Hard-link (copy across file systems) every file of a cache snapshot into dst, following the
    snapshot's symlinks to their blobs: the model folder costs no second copy of the weights."""
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in files:
            blob, to = os.path.realpath(os.path.join(root, f)), os.path.join(dst, rel, f)
            try:
                os.link(blob, to)
            except OSError:
                shutil.copy2(blob, to)


def build_model(source: str, out: str, seed: int = 0, steps: int | None = None, log=None,
                retrain: bool = False) -> dict:
    scheme, name, rev = parse_source(source)
    _check_build(scheme, name, out, steps, log if log is not None else sys.stderr)
    info = {"source": source, "scheme": scheme, "quality_meaningful": scheme != "random"}
    if scheme == "builtin":
        from .builtin import build

        info["build"] = build(name, out, seed=seed, steps=steps, retrain=retrain, log=log)
    elif scheme == "path":
        with atomic_dir(out) as tmp:
            shutil.copytree(name, tmp, dirs_exist_ok=True)
    elif scheme == "hub":
        snap = _hub_snapshot(name, rev)
        with atomic_dir(out) as tmp:
            _link_files(snap, tmp)
            check_model_folder(tmp)  # before it replaces anything
        # the snapshot folder is named by the commit the revision resolved to: rows record that
        info["requested_revision"], rev = rev, os.path.basename(os.path.normpath(snap))
    else:
        with atomic_dir(out) as tmp:
            _random_model(name, tmp, seed)
    info["revision"] = rev or folder_hash(out)
    atomic_write_text(os.path.join(out, "kvbench_source.json"), json.dumps(info, indent=2))
    return info


def load_model(model_dir: str, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False):
    """(model, tokenizer, info) from a folder made by build_model (or any HF folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"no model at {model_dir!r} (missing config.json); run build-model first")
    check_dtype(dtype)
    try:  # an architecture the cache engine cannot serve is refused before the weights load
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        pass  # unreadable: the loader below names the problem
    else:
        _check_served(model_type, model_dir)
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report: its problems become our one-line error below
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # no carriage-return bars in job logs
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        model, loading = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except Exception as e:  # noqa: BLE001 - corrupt weights, bad config, missing tokenizer: name the folder
        raise ValueError(f"cannot load the model in {model_dir!r} ({type(e).__name__}: {e})") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    problems = {"missing tensors (would be randomly initialised)": loading.get("missing_keys"),
                "unexpected tensors": loading.get("unexpected_keys"),
                "tensors of another shape": loading.get("mismatched_keys"),
                "load errors": loading.get("error_msgs")}
    if any(problems.values()):
        raise ValueError(f"the weights in {model_dir!r} do not match its config.json: {_describe(problems)}")
    model = model.to(device).eval()
    p = os.path.join(model_dir, "kvbench_source.json")
    info = json.load(open(p)) if os.path.exists(p) else {"source": f"path:{model_dir}", "quality_meaningful": True}
    info.setdefault("revision", folder_hash(model_dir))
    return model, tok, info


def resolve_device(device: str) -> str:
    import torch

    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device, available=True)
    return device
