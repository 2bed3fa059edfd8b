"""The Django-free text pieces serving uses for engines that do not detokenize (mlx)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from inference.text import Detokenizer, Speller, StopFilter, TokenTexts
from tests.helpers import kquant_gguf_path


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


def detokenized(tokenizer, ids: list[int]) -> str:
    detok = Detokenizer(tokenizer)
    return "".join(detok.add(t) for t in ids) + detok.flush()


def test_text_streamed_without_its_ids_is_spelled_in_as_many_tokens_as_were_generated(tokenizer):
    speller = Speller(tokenizer)
    text = "naïve café 東京"
    ids = tokenizer.encode(text, add_special_tokens=False)
    for count in (len(ids), len(ids) + 1, len(ids) + 3):
        spelled = speller.spell(text, count, ids[-1])
        assert spelled is not None and len(spelled) == count and spelled[-1] == ids[-1]
        assert detokenized(tokenizer, spelled) == text
    assert speller.spell(text, 2, ids[-1]) is None  # too few tokens for the text


def test_a_replacement_character_is_spelled_as_the_unfinished_character_it_stands_for(tokenizer):
    """A token ending in half a character, then one that cannot continue it: the engine streams
    their text, ' � arts', which the tokenizer alone would spell in three tokens."""
    broken, arts = tokenizer.convert_tokens_to_ids(["ĠâĢ", "Ġarts"])
    text = detokenized(tokenizer, [broken, arts])
    assert text == " \ufffd arts"
    assert len(tokenizer.encode(text, add_special_tokens=False)) == 3
    spelled = Speller(tokenizer).spell(text, 2, arts)
    assert spelled is not None and len(spelled) == 2
    assert detokenized(tokenizer, spelled) == text


def test_tokens_of_a_character_never_finished_spell_nothing(tokenizer):
    ids = Speller(tokenizer).unfinished(3)
    assert len(ids) == 3
    assert detokenized(tokenizer, ids) == ""


def test_a_run_of_byte_tokens_that_breaks_does_not_stop_the_detokenizer():
    """Gemma's SentencePiece vocabulary: a space as a byte token, then half a character, then a
    word. Decoded together, the two bytes become two U+FFFD, taking back the space already
    given out, which the tokenizers library's stream refuses."""
    gguf = kquant_gguf_path()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    detok = Detokenizer(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(["<0x20>", "<0xC2>", "▁arts", "▁and", "▁crafts"])
    assert "".join(detok.add(t) for t in ids) + detok.flush() == "  arts and crafts"
