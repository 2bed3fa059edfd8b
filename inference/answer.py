"""Reading a chat answer as it arrives: the model's reasoning, its content and its tool calls,
each where the protocol wants it. The same reader serves streamed and full answers, so they
agree. No Django here.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from inference.mlx_lm_parts import infer_thinking
from inference.text import partial_suffix
from inference.tools import ParsedCall, ToolCallReader

THINK = ("<think>", "</think>")

# Per tokenizer: reading the vocabulary takes milliseconds, too long for every request.
_inferred: weakref.WeakKeyDictionary[Any, tuple[str, str] | None] = weakref.WeakKeyDictionary()


def thinking_markers(tokenizer: Any, setting: str) -> tuple[str, str] | None:
    """The markers around a model's reasoning, or None when the parser is off: `think` forces
    <think>...</think>; `auto` takes them from the vocabulary, as mlx-lm infers them."""
    if setting == "none":
        return None
    if setting == "think":
        return THINK
    if tokenizer not in _inferred:
        try:
            found = infer_thinking(tokenizer)
        except Exception:
            found = None
        _inferred[tokenizer] = (found[0], found[1]) if found and found[0] and found[1] else None
    return _inferred[tokenizer]


def prompt_opens_thinking(prompt_text: str, markers: tuple[str, str] | None) -> bool:
    """Templates of thinking models (Qwen3, DeepSeek-R1) may open the reasoning themselves, so
    the answer starts inside it."""
    return bool(markers) and prompt_text.rstrip().endswith(markers[0])


class ReasoningReader:
    """Splits text into reasoning (between the markers) and content (after them)."""

    def __init__(self, markers: tuple[str, str], opened: bool) -> None:
        self.start, self.end = markers
        self.active = opened  # inside the reasoning
        self._decided = opened  # whether the answer opens with the start marker is known
        self._buffer = ""
        self._after_end = False  # strip the newlines templates put after the end marker

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        self._buffer += text
        reasoning = content = ""
        while True:
            if not self._decided:
                head = self._buffer.lstrip()
                if not final and len(head) < len(self.start) and self.start.startswith(head):
                    break  # could still be the start marker
                self._decided = True
                if head.startswith(self.start):
                    self.active = True
                    self._buffer = head[len(self.start) :]
                continue
            if self.active:
                at = self._buffer.find(self.end)
                if at >= 0:
                    reasoning += self._buffer[:at]
                    self._buffer = self._buffer[at + len(self.end) :]
                    self.active, self._after_end = False, True
                    continue
                keep = 0 if final else partial_suffix(self._buffer, self.end)
                reasoning += self._buffer[: len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep :]
                break
            if self._after_end:
                stripped = self._buffer.lstrip("\n")
                if not stripped and not final:
                    self._buffer = ""
                    break
                self._buffer, self._after_end = stripped, False
            content += self._buffer
            self._buffer = ""
            break
        return reasoning, content


@dataclass
class AnswerReader:
    """One choice's answer, fed text as each token arrives."""

    reasoning: ReasoningReader | None = None
    tools: ToolCallReader | None = None
    reasoning_text: str = ""
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)
    reasoning_tokens: int = 0
    _pending: tuple[list[str], list[str], list[ParsedCall]] = field(
        default_factory=lambda: ([], [], [])
    )

    def feed(self, text: str, *, token: int | None, final: bool) -> None:
        """`text` is what token `token` (None: none, at the end) added to the answer."""
        if self.reasoning is not None:
            was = self.reasoning.active
            thought, text = self.reasoning.feed(text, final)
            if token is not None and (was or self.reasoning.active):
                self.reasoning_tokens += 1
            if thought:
                self.reasoning_text += thought
                self._pending[0].append(thought)
        calls: list[ParsedCall] = []
        if self.tools is not None:
            text, calls = self.tools.feed(text)
            if final:
                tail, more = self.tools.finish()
                text, calls = text + tail, calls + more
        if text:
            self.content += text
            self._pending[1].append(text)
        if calls:
            self.calls += calls
            self._pending[2].extend(calls)

    def take(self) -> tuple[str, str, list[ParsedCall]]:
        """What arrived since the last take: reasoning, content, completed calls."""
        reasoning, content, calls = self._pending
        self._pending = ([], [], [])
        return "".join(reasoning), "".join(content), calls
