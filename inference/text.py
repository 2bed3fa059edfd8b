"""Tokens to text, Django-free: incremental detokenizing, stop strings, token texts for logprobs.

Serving uses these for engines that do not detokenize themselves (mlx); vLLM sends its own text.
"""

from __future__ import annotations

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


class TokenTexts:
    """Token id -> (text, bytes), for logprobs."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.get = lru_cache(maxsize=65536)(self._get)

    def _get(self, token: int) -> tuple[str, list[int]]:
        piece = self._tokenizer.convert_ids_to_tokens(token)
        decoder = byte_decoder()
        if piece is None:
            return "", []
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            raw = bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
        elif all(ch in decoder for ch in piece):
            raw = bytes(decoder[ch] for ch in piece)
        else:
            raw = piece.replace("▁", " ").encode()
        return raw.decode("utf-8", errors="replace"), list(raw)


class Detokenizer:
    """Incremental detokenizing that never emits half a UTF-8 character or a half-merged word:
    the tokenizers library's DecodeStream over the Hugging Face fast tokenizer."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def add(self, token: int) -> str:
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
