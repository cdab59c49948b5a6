"""How a model is prompted and how its tokens map to words.

The builtin model has its own format (`<bos> translate syn_src to syn_tgt :`, one token per word).
Any other model gets its tokenizer's chat template with the seeds' instruction
("Translate the following English paragraph to French"), and words are found from the
tokenizer's word-start markers (a token that starts with a space marker begins a new word).
"""

from __future__ import annotations

import os

from . import synth

LANG_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian",
              "nl": "Dutch", "ro": "Romanian", "zh": "Chinese", "ja": "Japanese"}
BUILTIN_PAIRS = {(synth.SRC_LANG, synth.TGT_LANG)}


def is_builtin(model_dir: str) -> bool:
    return os.path.exists(os.path.join(model_dir, "build_info.json"))


class Prompter:
    def __init__(self, tokenizer, model_dir: str, src_lang: str | None, tgt_lang: str | None):
        self.tok = tokenizer
        self.builtin = is_builtin(model_dir)
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        if src_lang is not None:
            self.check_pair(src_lang, tgt_lang)
        self.eos_id = tokenizer.eos_token_id
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        if not self.builtin:
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            self._starts = {i for i, p in enumerate(pieces) if p and p[0] in ("Ġ", "▁", " ")}

    def check_pair(self, src: str, tgt: str | None) -> None:
        if self.builtin:
            if (src, tgt) not in BUILTIN_PAIRS:
                raise ValueError(f"the builtin model translates {sorted(BUILTIN_PAIRS)}, not {src}->{tgt}")
        elif src not in LANG_NAMES or tgt not in LANG_NAMES:
            raise ValueError(f"unknown language pair {src}->{tgt}; known languages: {sorted(LANG_NAMES)}")

    @property
    def single_token_words(self) -> bool:
        return self.builtin

    def instruction(self) -> list[int]:
        """Tokens before the source (source position group)."""
        if self.builtin:
            return self.bos + self.tok.convert_tokens_to_ids(synth.INSTRUCTION)
        return self._chat()[0]

    def target_start(self) -> list[int]:
        """Tokens that open the target group (the builtin's <tgt>, a chat model's assistant header)."""
        if self.builtin:
            return [self.tok.convert_tokens_to_ids(synth.TARGET_START)]
        return self._chat()[1]

    def _chat(self) -> tuple[list[int], list[int]]:
        text = (f"Translate the following {LANG_NAMES[self.src_lang]} paragraph to "
                f"{LANG_NAMES[self.tgt_lang]}.")
        msgs = [{"role": "user", "content": text}]

        def ids(gen):
            out = self.tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
            return list(out["input_ids"] if hasattr(out, "keys") else out)  # BatchEncoding in transformers 5

        user, full = ids(False), ids(True)
        return user, full[len(user):] or self.bos

    def plain(self, text: str) -> list[int]:
        return self.bos + self.tok(text, add_special_tokens=False)["input_ids"]

    def words(self, text: str) -> list[list[int]]:
        """Token ids of each whitespace-separated word (a leading space where the tokenizer wants one)."""
        if self.builtin:
            vocab = self.tok.get_vocab()
            unk = [w for w in text.split() if w not in vocab]
            if unk:
                raise ValueError(f"words not in the builtin vocabulary: {unk[:5]}")
            return [[vocab[w]] for w in text.split()]
        return [self.tok(" " + w, add_special_tokens=False)["input_ids"] for w in text.split()]

    def word_start(self, token_id: int) -> bool:
        return True if self.builtin else token_id in self._starts

    def decode(self, ids: list[int]) -> str:
        if self.builtin:  # one token per word: join the words themselves (no detokenizer clean-up)
            special = set(self.tok.all_special_ids)
            return " ".join(self.tok.convert_ids_to_tokens([i for i in ids if i not in special]))
        return " ".join(self.tok.decode(ids, skip_special_tokens=True).split())

