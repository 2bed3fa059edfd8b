"""Forced tool calls' lark grammars (inference/tools.py) as GBNF, for llama.cpp. No Django here.

llama.cpp's grammars are GBNF, not llguidance lark, and our build of it has no llguidance. The
grammars of `tool_choice` required or named are a small part of lark: literals, added tokens by
id (`<[id]>`, which GBNF has too), rules, groups, `|`, `*`, `?` and inline JSON schemas
(`%json {...}`). Those translate one to one; the JSON schemas go through llama.cpp's own
JSON-schema-to-GBNF converter (the `llama_grammar` module of llama-cpp-python's sdist, which
`.ci/llama-server` keeps beside the binary it builds). Regexes (free text before a trigger) do not
translate: a grammar holding one raises ValueError. The converter has no numeric ranges: a small
integer range is written as an enum of its values and other bounds are refused (`unenforceable`).
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path
from types import ModuleType

_TOKEN = re.compile(r'\s+|"(?:[^"\\]|\\.)*"|<\[\d+\]>|%json\b|[A-Za-z_][A-Za-z0-9_]*|[()|*?+]')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


# Bounds the converter leaves out of its grammars (it has no numeric ranges): a small integer
# range becomes an enum of its values; anything else is refused, never loosened.
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
ENUM_LIMIT = 256


def enforceable(schema: object) -> object:
    """`schema` with small integer ranges as enums; ValueError for a bound GBNF cannot keep."""
    if isinstance(schema, list):
        return [enforceable(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: enforceable(v) if k != "enum" and k != "const" else v for k, v in schema.items()}
    bounds = [k for k in BOUNDS if k in out]
    if not bounds:
        return out
    if out.get("type") == "integer" and "multipleOf" not in out:
        low = out.get("minimum", out.get("exclusiveMinimum", float("-inf")) + 1)
        high = out.get("maximum", out.get("exclusiveMaximum", float("inf")) - 1)
        if high - low < ENUM_LIMIT:
            for k in (*bounds, "type"):
                out.pop(k)
            return {**out, "enum": list(range(int(low), int(high) + 1))}
    raise ValueError(
        f"llama.cpp's grammars cannot enforce {bounds[0]!r} here (integer ranges of up to "
        f"{ENUM_LIMIT} values only)"
    )


def unenforceable(lark: str) -> str | None:
    """Why `lark`'s JSON schemas cannot be enforced as GBNF, or None."""
    try:
        for schema in _schemas(lark):
            enforceable(schema)
    except ValueError as exc:
        return str(exc)
    return None


def _schemas(lark: str):
    at = lark.find("%json")
    while at >= 0:
        schema, end = _json_after(lark, at + len("%json"))
        yield schema
        at = lark.find("%json", end)


def _json_after(text: str, at: int) -> tuple[dict, int]:
    """The inline schema that follows `%json` (ending at `at`), and where it ends."""
    return json.JSONDecoder().raw_decode(text, len(text) - len(text[at:].lstrip()))


def load_converter(path: Path) -> ModuleType | None:
    """llama.cpp's JSON-schema-to-GBNF module at `path`, or None where it is not there."""
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("llm_service_llama_grammar", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _literal(text: str) -> str:
    return '"' + "".join(_ESCAPES.get(c, c) for c in text) + '"'


def _name(rule: str) -> str:
    # GBNF names are letters, digits and '-'; the prefix keeps ours apart from the converter's.
    return "t-" + rule.replace("_", "-")


@lru_cache(maxsize=256)
def lark_to_gbnf(lark: str, converter: ModuleType) -> str:
    """The GBNF grammar for `lark`, whose `start` rule becomes GBNF's `root`."""
    schemas = converter.SchemaConverter(
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    rules = [f"root ::= {_name('start')}"]
    for line in lark.splitlines():
        line = line.strip()
        if not line or line.startswith("%llguidance"):
            continue
        head, sep, body = line.partition(":")
        if not sep or not re.fullmatch(r"[a-z_][a-z0-9_]*", head.strip()):
            raise ValueError(f"not a rule GBNF can take: {line!r}")
        rules.append(f"{_name(head.strip())} ::= {_expression(body, schemas, len(rules))}")
    return "\n".join([*rules, schemas.format_grammar()]) + "\n"


def _expression(body: str, schemas, index: int) -> str:
    out, at, count = [], 0, 0
    while at < len(body):
        match = _TOKEN.match(body, at)
        if match is None:
            raise ValueError(f"not in the GBNF subset: {body[at : at + 40]!r}")
        token, at = match.group(), match.end()
        if token.isspace():
            continue
        if token.startswith('"'):
            out.append(_literal(json.loads(token)))
        elif token == "%json":
            schema, end = _json_after(body, at)
            schema.pop("x-guidance", None)  # llguidance's own options
            schema = schemas.resolve_refs(enforceable(schema), "tool")
            out.append(schemas.visit(schema, f"json-{index}-{count}"))
            count, at = count + 1, end
        elif token in "*?+" and out:
            out[-1] += token
        elif token.startswith("<[") or token in "()|":
            out.append(token)
        else:
            out.append(_name(token))
    return " ".join(out)
