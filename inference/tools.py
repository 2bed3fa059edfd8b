"""Tool calling: each model family's own tool-call format, read back with mlx-lm's library
parsers, and written under an llguidance grammar where the request demands it. No Django here.

A format knows the text that opens a call (its trigger), the text that closes it, how to parse
what lies between (a library parser), how to write calls (for history and the generic prompt)
and the grammar of a call to the offered tools. `tool_choice` required or a named function
constrains the whole output to calls; `auto` leaves text free until the trigger, then constrains
the call (llguidance's lazy lexemes, as its structural tags do).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jinja2 import Environment, meta

from inference.mlx_lm_parts import infer_tool_parser, tool_parser
from inference.text import partial_suffix

ANY_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolDef:
    name: str
    description: str | None
    parameters: dict[str, Any] | None  # a JSON schema; None: the function takes no arguments

    def schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters else ANY_ARGUMENTS

    def openai(self) -> dict[str, Any]:
        """As chat templates take it (`tools=`): OpenAI's tool shape."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.schema()
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text

    def wire(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's tool call, with a new id (and its `index` in a streamed delta)."""
        call = {
            "id": new_call_id(),
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return _compact(arguments)


def _json(schema: dict[str, Any]) -> str:
    """An inline JSON schema for lark, compact as our structured outputs are (no free runs of
    whitespace a small model can loop in)."""
    return "%json " + json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}})


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _lit(text: str) -> str:
    """A lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def _regex_text(text: str) -> str:
    """Text matched literally inside a lark /regex/."""
    return re.escape(text).replace("/", "\\/")


Special = dict[str, int]  # marker text -> its token id, for markers that are added tokens


def lark_text(text: str, special: Special | None = None) -> str:
    """Text as lark: literals, and the markers that are added tokens by id (`<[id]>`): llguidance
    never lets other tokens spell an added token, so a literal would forbid the model's own."""
    pieces, rest = [], text
    while rest:
        found = [(rest.find(m), m) for m in (special or {}) if m and m in rest]
        if not found:
            pieces.append(_lit(rest))
            break
        at, marker = min(found)
        if at:
            pieces.append(_lit(rest[:at]))
        pieces.append(f"<[{special[marker]}]>")
        rest = rest[at + len(marker) :]
    return " ".join(pieces)


# Per tokenizer: its added tokens by text, as (id, special). Hugging Face builds
# `added_tokens_decoder` anew on every access; this is read on every chat request.
_added: weakref.WeakKeyDictionary[Any, dict[str, tuple[int, bool]]] = weakref.WeakKeyDictionary()


def added_tokens(tokenizer: Any) -> dict[str, tuple[int, bool]]:
    if tokenizer not in _added:
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        _added[tokenizer] = {t.content: (i, bool(t.special)) for i, t in decoder.items()}
    return _added[tokenizer]


def special_markers(tokenizer: Any, texts: list[str | None]) -> Special:
    """Which of these marker texts are single added tokens of the tokenizer: special ones
    (Mistral's [TOOL_CALLS], LFM2's <|tool_call_start|>) and plain ones alike (Qwen's
    <tool_call>, <think>), since llguidance treats every added token as special."""
    added = added_tokens(tokenizer)
    return {text: added[text][0] for text in texts if text and text in added}


def any_skipped(tokenizer: Any, special: Special) -> bool:
    """Whether one of these markers is a special token, which detokenizing would leave out."""
    added = added_tokens(tokenizer)
    return any(added[text][1] for text in special)


class ToolFormat:
    """A family's tool-call format."""

    name = ""
    start: str | None = None  # the text that opens a call; None: the whole answer is the call
    end = ""  # the text that closes a call; "" where the answer's end does
    key = "arguments"  # where the arguments go in the call's JSON

    def parse(self, segment: str) -> list[ParsedCall]:
        """The calls in the text between `start` and `end`; ValueError if it holds none."""
        found = self._library_parse(segment)
        found = found if isinstance(found, list) else [found]
        calls = []
        for call in found:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ValueError(f"not a tool call: {segment!r}")
            arguments = call.get("arguments", call.get("parameters", {}))
            calls.append(ParsedCall(call["name"], _arguments_text(arguments)))
        if not calls:
            raise ValueError(f"no tool call in {segment!r}")
        return calls

    def _library_parse(self, segment: str) -> Any:
        raise NotImplementedError

    def render(self, calls: list[tuple[str, Any]]) -> str:
        """Calls written as the model would write them (history, the generic prompt)."""
        raise NotImplementedError

    def call_schema(self, tools: list[ToolDef]) -> dict[str, Any]:
        options = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, self.key: t.schema()},
                "required": ["name", self.key],
                "additionalProperties": False,
            }
            for t in tools
        ]
        return options[0] if len(options) == 1 else {"anyOf": options}

    def body_rules(self, tools: list[ToolDef], parallel: bool, special: Special) -> str:
        """Lark rules defining `body`: everything after the first trigger to the last call's end
        (`special`: the markers that are added tokens)."""
        raise NotImplementedError

    constrainable = True


class LibraryFormat(ToolFormat):
    """A family mlx-lm's tool parsers read (`mlx_lm.tool_parsers.<module>`): its markers and
    its parser are the library's. Used as is for the families we read but do not write or
    constrain yet (Qwen3-Coder, GLM, Kimi, MiniMax, Gemma, ...): `required` and named choices
    are refused for them."""

    module = ""
    constrainable = False

    def __init__(self, module: str | None = None) -> None:
        if module is not None:
            self.module = self.name = module
        self._parser = tool_parser(self.module)
        self.start, self.end = self._parser.tool_call_start, self._parser.tool_call_end

    def _library_parse(self, segment: str) -> Any:
        return self._parser.parse_tool_call(segment)

    def render(self, calls: list[tuple[str, Any]]) -> str:
        raise ValueError(f"writing {self.name} tool calls is not supported")


class HermesFormat(LibraryFormat):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`: Hermes, Qwen 2.5/3,
    SmolLM3 and most templates that render `tools`."""

    name = "hermes"
    module = "json_tools"
    constrainable = True

    def render(self, calls: list[tuple[str, Any]]) -> str:
        return "\n".join(
            f"<tool_call>\n{_compact({'name': n, 'arguments': a})}\n</tool_call>" for n, a in calls
        )

    def body_rules(self, tools: list[ToolDef], parallel: bool, special: Special) -> str:
        nl = "\n"
        close = lark_text(nl + self.end, special)
        more = f"({lark_text(nl + self.start + nl, special)} call_json {close})*"
        return (
            f"body: {_lit(nl)} call_json {close}"
            f"{' ' + more if parallel else ''}\n"
            f"call_json: {_json(self.call_schema(tools))}\n"
        )


class Llama3JSONFormat(ToolFormat):
    """`{"name": ..., "parameters": {...}}` as the whole answer: Llama 3.1-3.3's JSON tool calls
    (one call a turn, as Meta's template says)."""

    name = "llama3_json"
    start = None
    key = "parameters"

    def _library_parse(self, segment: str) -> Any:
        # One JSON object a call; some models separate several with ";".
        decoder, calls, at = json.JSONDecoder(), [], 0
        text = segment.strip()
        while at < len(text):
            call, at = decoder.raw_decode(text, at)
            calls.append(call)
            at = len(text) - len(text[at:].lstrip().lstrip(";").lstrip())
        return calls

    def render(self, calls: list[tuple[str, Any]]) -> str:
        return "; ".join(_compact({"name": n, "parameters": a}) for n, a in calls)

    def body_rules(self, tools: list[ToolDef], parallel: bool, special: Special) -> str:
        return f"body: {_json(self.call_schema(tools))}\n"


class MistralFormat(LibraryFormat):
    """`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`: Mistral's models."""

    name = module = "mistral"
    constrainable = True

    @staticmethod
    def call_id(id_: str) -> str:
        """Mistral's templates take only 9 letters and digits for a call's id (they raise on
        OpenAI's): the same id always maps to the same 9, so a result still finds its call."""
        if len(id_) == 9 and id_.isalnum():
            return id_
        return hashlib.sha256(id_.encode()).hexdigest()[:9]

    def _library_parse(self, segment: str) -> Any:
        return super()._library_parse(segment.strip())

    def render(self, calls: list[tuple[str, Any]]) -> str:
        return self.start + _compact([{"name": n, "arguments": a} for n, a in calls])

    def body_rules(self, tools: list[ToolDef], parallel: bool, special: Special) -> str:
        array: dict[str, Any] = {"type": "array", "items": self.call_schema(tools), "minItems": 1}
        if not parallel:
            array["maxItems"] = 1
        return f"body: {_json(array)}\n"


class PythonicFormat(LibraryFormat):
    """`<|tool_call_start|>[get_weather(city="Paris"), ...]<|tool_call_end|>`: LFM2 and other
    models that call tools as Python."""

    name = module = "pythonic"
    constrainable = True

    def render(self, calls: list[tuple[str, Any]]) -> str:
        def call(name: str, arguments: Any) -> str:
            args = arguments if isinstance(arguments, dict) else json.loads(arguments or "{}")
            return f"{name}(" + ", ".join(f"{k}={_compact(v)}" for k, v in args.items()) + ")"

        return self.start + "[" + ", ".join(call(n, a) for n, a in calls) + "]" + self.end

    def body_rules(self, tools: list[ToolDef], parallel: bool, special: Special) -> str:
        # Values are JSON (the library parser reads true/false/null as Python would).
        rules, alternatives = [], []
        for t, tool in enumerate(tools):
            schema = tool.schema()
            props = schema.get("properties", {})
            required = [k for k in props if k in schema.get("required", [])]
            optional = [k for k in props if k not in required]
            slot = {k: f"v{t}_{i}" for i, k in enumerate(props)}
            for k in props:
                rules.append(f"{slot[k]}: {_json(props[k])}")

            def arg(k: str, slot: dict[str, str] = slot) -> str:
                return f"{_lit(k + '=')} {slot[k]}"

            if required:
                args = f" {_lit(', ')} ".join(arg(k) for k in required)
                args += "".join(f" ({_lit(', ')} {arg(k)})?" for k in optional)
            elif optional:  # any subset in order, the first one without a comma
                heads = [
                    arg(k) + "".join(f" ({_lit(', ')} {arg(o)})?" for o in optional[i + 1 :])
                    for i, k in enumerate(optional)
                ]
                args = "(" + " | ".join(f"({h})" for h in heads) + ")?"
            else:
                args = ""
            rules.append(f"call{t}: {_lit(tool.name + '(')} {args} {_lit(')')}")
            alternatives.append(f"call{t}")
        calls = "pycall" + (f" ({_lit(', ')} pycall)*" if parallel else "")
        return (
            f"body: {_lit('[')} {calls} {lark_text(']' + self.end, special)}\n"
            f"pycall: {' | '.join(alternatives)}\n" + "\n".join(rules) + "\n"
        )


FORMATS: dict[str, Callable[[], ToolFormat]] = {
    "hermes": HermesFormat,
    "llama3_json": Llama3JSONFormat,
    "mistral": MistralFormat,
    "pythonic": PythonicFormat,
}
# The per-model setting's choices: the formats we read and constrain.
FORMAT_NAMES = tuple(FORMATS)


def get_format(name: str) -> ToolFormat:
    if name in FORMATS:
        return FORMATS[name]()
    if name == "json_tools":
        return HermesFormat()
    return LibraryFormat(name)


def template_renders_tools(template: str | None) -> bool:
    """Whether a chat template reads the `tools` variable (else tools would vanish from the
    prompt and the model would never know of them)."""
    if not template:
        return False
    try:
        variables = meta.find_undeclared_variables(Environment().parse(template))
    except Exception:
        return "tools" in template
    return "tools" in variables


class _TemplateView:
    def __init__(self, template: str, vocab: dict[str, int]) -> None:
        self.chat_template, self._vocab = template, vocab

    def get_vocab(self) -> dict[str, int]:
        return self._vocab


def infer_format(template: str | None, vocab: dict[str, int]) -> str:
    """The tool-call format a template's model writes, as mlx-lm infers it (plus Llama 3's JSON
    calls, which mlx-lm has no parser for); Hermes where nothing says otherwise."""
    if template and ("<|python_tag|>" in template or '"parameters": dictionary' in template):
        return "llama3_json"
    if template:
        try:
            found = infer_tool_parser(_TemplateView(template, vocab))
        except Exception:
            found = None
        if found:
            return "hermes" if found == "json_tools" else found
    return "hermes"


GENERIC_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, write the call exactly as in this example:
{example}"""


def generic_tool_prompt(fmt: ToolFormat, tools: list[ToolDef]) -> str:
    """The system prompt that tells a model whose template cannot render tools about them
    (docs/tools.md): the tools as JSON and an example call in the format it is held to."""
    listing = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools)
    example_args = {k: f"<{k}>" for k in list(tools[0].schema().get("properties", {}))[:2]}
    return GENERIC_PROMPT.format(tools=listing, example=fmt.render([(tools[0].name, example_args)]))


# --- grammars --------------------------------------------------------------------------------


def tool_grammar(
    fmt: ToolFormat,
    tools: list[ToolDef],
    *,
    required: bool,
    parallel: bool,
    answer_schema: dict[str, Any] | None = None,
    special: Special | None = None,
) -> str:
    """The lark grammar (llguidance) for an answer to these tools: calls only when `required`;
    else free text (or JSON matching `answer_schema`) that may turn into calls at the trigger.
    `special`: the format's markers that are added tokens of the model's tokenizer."""
    special = special or {}
    lines = ["%llguidance {}", fmt.body_rules(tools, parallel, special).rstrip()]
    trigger = fmt.start
    if required:
        lines.append(f"start: {lark_text(trigger, special)} body" if trigger else "start: body")
    elif answer_schema is not None:
        lines.append(f"answer: {_json(answer_schema)}")
        lines.append(f"start: answer | {lark_text(trigger, special) if trigger else ''} body")
    elif trigger in special:
        # Free text never holds an added token: the trigger token itself starts the calls.
        lines += [f"start: TEXT | TEXT <[{special[trigger]}]> body", "TEXT: /(.|\\n)*/"]
    elif trigger:
        escaped = _regex_text(trigger)
        lines += [
            "start: TEXT | text_then_trigger body",
            f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{escaped}(.|\\n)*/",
            f"text_then_trigger[lazy]: /(.|\\n)*{escaped}/",
        ]
    else:  # the answer is a call exactly when it starts with one
        lines += ["start: TEXT | body", "TEXT: /([^{](.|\\n)*)?/"]
    return "\n".join(lines) + "\n"


# --- reading an answer as it arrives -----------------------------------------------------------


class ToolCallReader:
    """Splits one answer's text into content and tool calls as it arrives, so a streamed answer
    and a full one agree. `feed` and `finish` return (content released, calls completed)."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.calls: list[ParsedCall] = []
        self.content = ""
        self._buffer = ""
        self._in_call = False
        self._whitespace = ""  # held back: dropped if a call follows, released if text does
        self._decided = fmt.start is not None  # llama3_json: the answer's first character decides

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[ParsedCall]]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, list[ParsedCall]]:
        out, calls = "", []
        fmt = self.fmt
        while True:
            if not self._decided:
                stripped = self._buffer.lstrip()
                if not stripped and not final:
                    break
                self._decided = True
                if stripped.startswith("{"):
                    self._in_call, self._buffer = True, stripped
                continue
            if self._in_call:
                closed = bool(fmt.end) and fmt.end in self._buffer
                if closed:
                    segment, self._buffer = self._buffer.split(fmt.end, 1)
                elif final:
                    segment, self._buffer = self._buffer, ""
                else:
                    break
                self._in_call = False
                try:
                    found = fmt.parse(segment)
                except (ValueError, SyntaxError):
                    # Not a call after all (an unconstrained model's slip, or an answer that ran
                    # out of tokens mid-call): its text is content.
                    text = (fmt.start or "") + segment + (fmt.end if closed else "")
                    self._whitespace, out = "", out + self._whitespace + text
                    continue
                self._whitespace = ""
                calls += found
                self.calls += found
                continue
            if fmt.start is None:  # llama3_json: an answer that is not a call is all content
                piece, self._buffer = self._buffer, ""
                out += self._release(piece)
                break
            at = self._buffer.find(fmt.start)
            if at >= 0:
                out += self._release(self._buffer[:at])
                self._buffer = self._buffer[at + len(fmt.start) :]
                self._in_call = True
                continue
            keep = 0 if final else partial_suffix(self._buffer, fmt.start)
            piece = self._buffer[: len(self._buffer) - keep]
            self._buffer = self._buffer[len(self._buffer) - keep :]
            out += self._release(piece)
            break
        if final and self._whitespace and not self.calls:
            out += self._whitespace
            self._whitespace = ""
        self.content += out
        return out, calls

    def _release(self, text: str) -> str:
        """Text is content; whitespace is held until we know whether a call follows it."""
        if not text:
            return ""
        pending = self._whitespace + text
        body = pending.rstrip()
        self._whitespace = pending[len(body) :]
        if self.calls and not body:
            return ""
        return body


def json_grammar(schema: dict[str, Any]) -> str:
    """The lark grammar for a JSON answer (so that it can follow the reasoning)."""
    return f"%llguidance {{}}\nstart: {_json(schema)}\n"


def after_reasoning_end(lark: str, end: str, special: Special | None = None) -> str:
    """The grammar from the reasoning's end marker on, for engines that start a lazy grammar at
    that marker (llama.cpp) and leave the reasoning before it free."""
    body = re.sub(r"^start:", "answer:", lark, flags=re.MULTILINE)
    return body + f'start: {lark_text(end, special)} ("\\n" | "\\n\\n")? answer\n'


def after_reasoning(
    lark: str, markers: tuple[str, str], opened: bool, special: Special | None = None
) -> str:
    """The grammar with the model's reasoning free before it: constrained output starts after
    the end marker. `opened`: the prompt already opened the reasoning."""
    special = special or {}
    begin, end = markers
    body = re.sub(r"^start:", "answer:", lark, flags=re.MULTILINE)
    if end in special:  # free text never holds an added token: the end token closes it
        thought = f"thought: THOUGHT <[{special[end]}]>\nTHOUGHT: /(.|\\n)*/\n"
    else:
        thought = f"thought[lazy]: /(.|\\n)*{_regex_text(end)}/\n"
    # Templates put a blank line after the reasoning; bounded, as a small model can loop in them.
    thought += "NEWLINES: /\\n{1,2}/\n"
    if opened:
        start = "start: thought NEWLINES? answer\n"
    else:
        start = f"start: ({lark_text(begin, special)} thought NEWLINES?)? answer\n"
    return body + thought + start
