"""Constrained decoding's one library for every backend: llguidance. No Django here.

A JSON schema is compiled into an llguidance grammar once (cached by its text) and checked there,
so a schema feature llguidance cannot enforce is refused by name before any engine sees it, never
loosened. The grammar asks for compact JSON (no free runs of whitespace a small model can loop
in). The mlx backend applies it as a per-sequence logits processor (`GrammarProcessor`); vLLM gets
the same schema through its structured outputs with its llguidance backend.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import llguidance
import llguidance.numpy
import numpy as np

from inference.types import Constraint

COMPACT = {"whitespace_flexible": False}
ANY_OBJECT = '{"type": "object"}'


class ConstraintError(ValueError):
    """The schema cannot be enforced (invalid, or a feature llguidance lacks)."""


def json_constraint(schema: dict | None) -> Constraint:
    """The constraint for a JSON schema, or for any JSON object when `schema` is None."""
    text = ANY_OBJECT if schema is None else json.dumps(schema, sort_keys=True)
    return _compile(text)


@lru_cache(maxsize=512)
def _compile(schema_json: str) -> Constraint:
    return _checked(
        "json_schema",
        schema_json,
        lambda text: llguidance.LLMatcher.grammar_from_json_schema(text, defaults=COMPACT),
        "the JSON schema",
    )


@lru_cache(maxsize=512)
def lark_constraint(lark: str) -> Constraint:
    """The constraint for an llguidance lark grammar (tool calls and answers after reasoning:
    inference/tools.py)."""
    return _checked("lark", lark, llguidance.LLMatcher.grammar_from_lark, "the output's schemas")


def _checked(kind: str, source: str, compile_: Any, what: str) -> Constraint:
    try:
        grammar = compile_(source)
    except (ValueError, TypeError) as exc:
        raise ConstraintError(f"{what} is invalid: {exc}") from exc
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ConstraintError(f"{what} cannot be enforced: {error}")
    return Constraint(kind, source, grammar)


def tokenizer_for(hf_tokenizer: Any, eos_token_ids: frozenset[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a model's tokenizer (about 0.2 s for a 49k vocabulary: once a model),
    ending a finished output with a token that ends the model's sequences."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=sorted(eos_token_ids) or None)


class GrammarProcessor:
    """An mlx-lm logits processor: tokens the grammar does not allow next get -inf.

    mlx-lm calls it once for the first token (with the prompt as context) and once per step after
    that, the newest context token being the one sampled last: that token is fed to the matcher.
    """

    def __init__(self, tokenizer: llguidance.LLTokenizer, constraint: Constraint) -> None:
        self.matcher = llguidance.LLMatcher(tokenizer, constraint.grammar)
        if self.matcher.is_error():
            raise ConstraintError(self.matcher.get_error())
        self.vocab_size = tokenizer.vocab_size
        self.eos = tokenizer.eos_token
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, self.vocab_size)
        self._started = False

    def allowed(self, last_token: int | None) -> np.ndarray:
        """A boolean mask over the vocabulary for the next token."""
        if last_token is not None:
            self.matcher.consume_token(last_token)
        if self.matcher.is_error():  # cannot happen with masked sampling; end the sequence
            allowed = np.zeros(self.vocab_size, dtype=bool)
            allowed[self.eos] = True
            return allowed
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def __call__(self, tokens, logits):
        import mlx.core as mx

        last = int(tokens[-1].item()) if self._started else None
        self._started = True
        mask = self.allowed(last)
        width = logits.shape[-1]
        if width != mask.size:  # logits padded past the tokenizer's vocabulary
            mask = np.pad(mask, (0, max(0, width - mask.size)))[:width]
        bias = np.where(mask, np.float32(0), np.float32(-np.inf))
        return logits + mx.array(bias)
