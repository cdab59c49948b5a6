"""The translation prompt of a chat model (any tokenizer but the builtin one): token ids through the
tokenizer's chat template, words split at the tokenizer's word starts."""

from kvbench.models import byte_tokenizer
from kvbench.prompt import Prompter


def test_chat_prompt_is_token_ids(tmp_path):
    tok = byte_tokenizer()
    p = Prompter(tok, str(tmp_path), "en", "fr")  # no build_info.json: the chat-model route
    instr, start = p.instruction(), p.target_start()
    assert instr and all(isinstance(i, int) for i in instr + start)
    text = tok.decode(instr + start)
    assert "Translate the following English paragraph to French." in text
    assert text.endswith("<|im_start|>assistant\n") and not tok.decode(instr).endswith("assistant\n")


def test_words_start_where_the_tokenizer_says(tmp_path):
    p = Prompter(byte_tokenizer(), str(tmp_path), "en", "de")
    words = p.words("Der alte Hund")
    assert [len(w) for w in words] == [4, 5, 5]  # a space byte, then the letters
    assert [p.word_start(w[0]) for w in words] == [True] * 3
    assert not any(p.word_start(t) for w in words for t in w[1:])
    assert p.decode([t for w in words for t in w]) == "Der alte Hund"
