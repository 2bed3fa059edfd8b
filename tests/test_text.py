"""The Django-free text pieces serving uses for engines that do not detokenize (mlx)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from inference.text import Detokenizer, StopFilter, TokenTexts


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(str(tiny_dir))


def test_stop_strings_are_found_across_token_boundaries():
    stops = StopFilter(["</end>", "STOP"])
    out = []
    for piece in ["Hello </", "en", "d> world"]:
        text, hit = stops.feed(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "Hello "
    assert hit


def test_text_that_only_looks_like_a_stop_start_is_released_later():
    stops = StopFilter(["STOP"])
    assert stops.feed("ab ST") == ("ab ", False)
    assert stops.feed("ART") == ("START", False)
    assert stops.flush() == ""


def test_the_detokenizer_never_splits_a_multibyte_character(tokenizer):
    text = "naïve café 東京 🙂 done"
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_special_tokens_are_left_out_of_the_text(tokenizer):
    detok = Detokenizer(tokenizer)
    ids = tokenizer.encode("Hi<|im_end|>there", add_special_tokens=False)
    assert "".join(detok.add(t) for t in ids) + detok.flush() == "Hithere"


def test_special_tokens_stay_in_the_text_when_markers_need_reading(tokenizer):
    detok = Detokenizer(tokenizer, skip_special_tokens=False)
    ids = tokenizer.encode("Hi<|im_end|>there", add_special_tokens=False)
    assert "".join(detok.add(t) for t in ids) + detok.flush() == "Hi<|im_end|>there"


def test_token_texts_give_each_token_its_bytes_even_inside_a_character(tokenizer):
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    raw = b"".join(bytes(texts.get(t)[1]) for t in ids)
    assert raw.decode() == "🙂"
    assert texts.get(tokenizer.encode(" Paris", add_special_tokens=False)[0]) == (
        " Paris",
        list(b" Paris"),
    )
