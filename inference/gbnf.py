"""Forced tool calls' lark grammars (inference/tools.py) as GBNF, for llama.cpp. No Django here.

llama.cpp's grammars are GBNF, not llguidance lark, and our build of it has no llguidance. The
grammars of `tool_choice` required or named are a small part of lark: literals, added tokens by
id (`<[id]>`, which GBNF has too), rules, groups, `|`, `*`, `?` and inline JSON schemas
(`%json {...}`). Those translate one to one; the JSON schemas go through llama.cpp's own
JSON-schema-to-GBNF converter (the `llama_grammar` module of llama-cpp-python's sdist, which
`.ci/llama-server` keeps beside the binary it builds). Regexes (free text before a trigger) do not
translate: a grammar holding one raises ValueError. Response formats' JSON schemas go through the
same converter. Its grammars are made compact (no free whitespace between JSON tokens, as
llguidance's on the other backends: free whitespace lets a small model write nothing else) and
given integer ranges, which that version of it leaves out; other numeric bounds are refused.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from functools import lru_cache
from pathlib import Path
from types import ModuleType

_TOKEN = re.compile(r'\s+|"(?:[^"\\]|\\.)*"|<\[\d+\]>|%json\b|[A-Za-z_][A-Za-z0-9_]*|[()|*?+]')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def json_to_gbnf(schema: dict, module: ModuleType) -> str:
    """The GBNF grammar for the JSON values `schema` allows, as compact JSON."""
    schemas = _converter(module)
    schemas.visit(schemas.resolve_refs(checked(schema), ""), "")
    return schemas.format_grammar()


def checked(schema: object) -> object:
    """`schema`, or ValueError for a numeric bound GBNF cannot keep (all but integer ranges)."""
    for part in _walk(schema):
        bounds = [k for k in BOUNDS if isinstance(part.get(k), int | float)]
        if bounds and (part.get("type") != "integer" or "multipleOf" in bounds):
            raise ValueError(
                f"llama.cpp's grammars cannot enforce {bounds[-1]!r} here (integer minimum and "
                "maximum only)"
            )
    return schema


def _walk(node: object):
    if isinstance(node, dict):
        yield node
        for key, value in node.items():
            if key not in ("enum", "const"):
                yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _converter(module: ModuleType):
    """llama.cpp's SchemaConverter writing compact JSON (no free whitespace, as llguidance's
    grammars on the other backends) and integer ranges, which this version of it leaves out."""

    class Converter(module.SchemaConverter):
        def __init__(self) -> None:
            super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
            self._rules["space"] = '""'

        def visit(self, schema, name):
            if isinstance(schema, dict) and "allOf" in schema:
                schema = _all_of(schema, self._refs)
            if isinstance(schema, dict) and schema.get("type") == "integer":
                low, high = _integer_bounds(schema)
                if low is not None or high is not None:
                    rule = name + "-" if name in module.RESERVED_NAMES else name or "root"
                    return self._add_rule(rule, integer_range(low, high) + " space")
            return super().visit(schema, name)

    return Converter()


def _all_of(schema: dict, refs: dict) -> dict:
    """An allOf of objects as one object: the converter takes each property's last schema, so
    one named in several parts is merged here, and refused where the parts disagree."""
    parts = [refs.get(p["$ref"], p) if "$ref" in p else p for p in schema["allOf"]]
    if not all("properties" in p and "anyOf" not in p for p in parts):
        return schema
    properties: dict = {}
    for part in parts:
        for key, value in part["properties"].items():
            known = properties.setdefault(key, value)
            if any(known.get(k, v) != v for k, v in value.items()):
                raise ValueError(f"allOf gives property {key!r} schemas llama.cpp cannot intersect")
            properties[key] = {**known, **value}
    required = sorted({key for part in parts for key in part.get("required", ())})
    rest = {k: v for k, v in schema.items() if k != "allOf"}
    return {**rest, "type": "object", "properties": properties, "required": required}


def _integer_bounds(schema: dict) -> tuple[int | None, int | None]:
    low = high = None
    if "minimum" in schema:
        low = math.ceil(schema["minimum"])
    elif "exclusiveMinimum" in schema:
        low = math.floor(schema["exclusiveMinimum"]) + 1
    if "maximum" in schema:
        high = math.floor(schema["maximum"])
    elif "exclusiveMaximum" in schema:
        high = math.ceil(schema["exclusiveMaximum"]) - 1
    return low, high


def integer_range(low: int | None, high: int | None) -> str:
    """GBNF for the integers from `low` to `high` (None: no bound) as JSON writes them."""
    if low is not None and high is not None and low > high:
        raise ValueError(f"no integer is at least {low} and at most {high}")
    alternatives = []
    if low is None or low < 0:  # "-" and a magnitude
        smallest = 1 if high is None or high >= 0 else -high
        alternatives.append('"-" ' + _naturals(smallest, None if low is None else -low))
    if high is None or high >= 0:
        alternatives.append(_naturals(max(low or 0, 0), high))
    return "(" + " | ".join(alternatives) + ")"


def _naturals(low: int, high: int | None) -> str:
    """Digits without leading zeros for low..high (None: no bound)."""
    shortest = len(str(low))
    longest = len(str(high)) if high is not None else shortest
    alternatives = []
    for length in range(shortest, longest + 1):
        first = max(low, 10 ** (length - 1) if length > 1 else 0)
        last = 10**length - 1 if high is None else min(high, 10**length - 1)
        alternatives.append(_same_length(str(first), str(last)))
    if high is None:
        alternatives.append(f"[1-9] [0-9]{{{shortest},}}")
    return "(" + " | ".join(alternatives) + ")"


def _same_length(low: str, high: str) -> str:
    if low == high:
        return f'"{low}"'
    if len(low) == 1:
        return f"[{low}-{high}]"
    if low == "0" * len(low) and high == "9" * len(high):
        return f"[0-9]{{{len(low)}}}"
    if low[0] == high[0]:
        return f'"{low[0]}" ' + _same_length(low[1:], high[1:])
    rest = len(low) - 1
    alternatives = [f'"{low[0]}" ' + _same_length(low[1:], "9" * rest)]
    if int(low[0]) + 1 <= int(high[0]) - 1:
        alternatives.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}] [0-9]{{{rest}}}")
    alternatives.append(f'"{high[0]}" ' + _same_length("0" * rest, high[1:]))
    return "(" + " | ".join(alternatives) + ")"


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
    schemas = _converter(converter)
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
            schema = schemas.resolve_refs(checked(schema), "tool")
            out.append(schemas.visit(schema, f"json-{index}-{count}"))
            count, at = count + 1, end
        elif token in "*?+" and out:
            out[-1] += token
        elif token.startswith("<[") or token in "()|":
            out.append(token)
        else:
            out.append(_name(token))
    return " ".join(out)
