"""Tokens to text, Django-free: incremental detokenizing, stop strings, token texts for logprobs.

Serving uses these for engines that do not detokenize themselves (mlx); vLLM sends its own text.
"""

from __future__ import annotations

import codecs
import contextlib
from functools import lru_cache
from typing import Any

from tokenizers.decoders import DecodeStream


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: which byte each printable stand-in char means.
    Imported on first use: transformers takes seconds to import, which every `manage.py`
    command would pay (its checks load the URLconf, and with it this module)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _byte_level(tokenizer: Any) -> bool:
    """Whether the vocabulary spells bytes in GPT-2's alphabet (else SentencePiece's, with `▁`
    for a space and `<0xNN>` byte-fallback pieces)."""
    return "ByteLevel" in str(tokenizer.backend_tokenizer.decoder)


def _piece_bytes(piece: str, byte_level: bool) -> bytes:
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        return bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
    if byte_level:
        decoder = byte_decoder()
        if all(ch in decoder for ch in piece):
            return bytes(decoder[ch] for ch in piece)
    return piece.replace("▁", " ").encode()


class TokenTexts:
    """Token id -> (text, bytes), for logprobs."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.byte_level = _byte_level(tokenizer)
        self.get = lru_cache(maxsize=65536)(self._get)

    def _get(self, token: int) -> tuple[str, list[int]]:
        piece = self._tokenizer.convert_ids_to_tokens(token)
        if piece is None:
            return "", []
        raw = _piece_bytes(piece, self.byte_level)
        return raw.decode("utf-8", errors="replace"), list(raw)


class Speller:
    """Token ids for text that an engine streamed without the ids of all its tokens.

    A tokenizer's own encoding of such text may take more or fewer tokens than were generated,
    which would miscount usage: `spell` finds ids that detokenize to the text in exactly as many
    tokens as there were."""

    def __init__(self, tokenizer: Any) -> None:
        self.texts = TokenTexts(tokenizer)
        byte_level = self.texts.byte_level
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.pieces: dict[bytes, int] = {}  # what each ordinary token spells -> its id
        for piece, token in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if token not in special:
                self.pieces.setdefault(_piece_bytes(piece, byte_level), token)
        self._longest = max(map(len, self.pieces), default=0)
        # Tokens whose bytes end in an unfinished character, by the bytes before it. Generated
        # with no continuation after them, they spell one replacement character, U+FFFD, in an
        # engine's text; generated last, nothing. (Byte-level decoding reads the bytes of all
        # tokens as one text; SentencePiece's byte fallback gives each byte of a run of byte
        # tokens that fails to decode its own U+FFFD, so only the literal spelling is safe.)
        self._unfinished: dict[bytes, int] = {}
        for raw, token in self.pieces.items() if byte_level else ():
            if raw.isascii():
                continue
            decoder = codecs.getincrementaldecoder("utf-8")()
            with contextlib.suppress(UnicodeDecodeError):
                decoder.decode(raw)
                pending = decoder.getstate()[0]
                if pending:
                    self._unfinished.setdefault(raw[: -len(pending)], token)
        # A byte never valid in UTF-8: U+FFFD too
        self._invalid = self.pieces.get(b"\xff") if byte_level else None

    def unfinished(self, count: int) -> list[int]:
        """`count` ids that spell no text at the end of a sequence (none where there are none)."""
        token = self._unfinished.get(b"", self.pieces.get(b"\xe2"))
        return [] if token is None else [token] * count

    def spell(self, text: str, count: int, last: int) -> list[int] | None:
        """`count` ids that detokenize to `text`, the last one `last`; None if there are none."""
        data, tail = text.encode(), bytes(self.texts.get(last)[1])
        if count < 1 or not tail or not data.endswith(tail):
            return None
        data = data[: -len(tail)]
        replaced, at = set(), 0
        for ch in text:
            if ch == "\ufffd":
                replaced.add(at)
            at += len(ch.encode())
        # reached[n][end] = (start, token): the last step of a way to spell data[:end] in n tokens
        reached: list[dict[int, tuple[int, int]]] = [{} for _ in range(count)]
        reached[0][0] = (0, -1)
        for n in range(count - 1):
            for start in list(reached[n]):
                for end in range(start + 1, min(start + self._longest, len(data)) + 1):
                    token = self.pieces.get(data[start:end])
                    if token is not None:
                        reached[n + 1].setdefault(end, (start, token))
                    if end - 1 in replaced:  # U+FFFD: an unfinished character ends a token
                        token = self._unfinished.get(data[start : end - 1])
                        if end - 1 == start and token is None:
                            token = self._invalid
                        if token is not None:
                            reached[n + 1].setdefault(end + 2, (start, token))
        if len(data) not in reached[count - 1]:
            return None
        out = [last]
        end = len(data)
        for n in range(count - 1, 0, -1):
            end, token = reached[n][end]
            out.insert(0, token)
        return out


class Detokenizer:
    """Incremental detokenizing that never emits half a UTF-8 character or a half-merged word:
    the tokenizers library's DecodeStream over the Hugging Face fast tokenizer."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def add(self, token: int) -> str:
        try:
            return self._stream.step(self._backend, token) or ""
        except Exception:  # the tokenizers library raises a bare Exception
            # SentencePiece's byte fallback decodes a run of byte tokens that is not UTF-8 as one
            # U+FFFD per byte, which can take back text already given out (a space as a byte
            # token, then half a character); DecodeStream refuses to go on. The text goes on
            # from this token.
            self._stream = DecodeStream(skip_special_tokens=self._skip)
            return self._stream.step(self._backend, token) or ""

    def flush(self) -> str:
        # DecodeStream holds back only an incomplete UTF-8 sequence, which never completes now.
        return ""


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that could begin `marker` (text to hold back)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class StopFilter:
    """Finds stop strings across token boundaries; holds back text that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self._held = ""
        self.matched: str | None = None  # the stop string found, once one is

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buffer = self._held + text
        hits = [(i, s) for s in self.stops if (i := buffer.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits)
            self._held = ""
            return buffer[:at], True
        hold = max(partial_suffix(buffer, stop) for stop in self.stops)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
