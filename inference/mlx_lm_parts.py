"""mlx-lm's tool-call parsers and its inference of a model's tool-call and reasoning formats,
loaded from mlx-lm's files without importing the `mlx_lm` package.

Every backend reads its answers with them, but importing anything under `mlx_lm` first runs
its `__init__`, which imports mlx, transformers' model classes, torch and scikit-learn: several
seconds on the event loop at a server's first chat, and a few hundred MB, where the models run
on llama.cpp or vLLM. The parsers are plain Python modules and the inference functions plain
functions of a vocabulary and a template, so they are loaded on their own.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

_PARSERS = "inference._mlx_lm_tool_parsers"
# The functions of mlx_lm/tokenizer_utils.py we call, and what they call.
_FUNCTIONS = ("_is_xtml_vocab", "_infer_thinking", "_infer_tool_parser")


@functools.cache
def _root() -> Path:
    spec = importlib.util.find_spec("mlx_lm")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mlx-lm is not installed (a dependency of llm-service)")
    return Path(next(iter(spec.submodule_search_locations)))


def tool_parser(name: str) -> ModuleType:
    """The module `mlx_lm.tool_parsers.<name>`: `tool_call_start`, `tool_call_end` and
    `parse_tool_call`."""
    if _PARSERS not in sys.modules:
        folder = _root() / "tool_parsers"
        spec = importlib.util.spec_from_file_location(
            _PARSERS, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[_PARSERS] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{_PARSERS}.{name}")


@functools.cache
def _functions() -> dict[str, Any]:
    path = _root() / "tokenizer_utils.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in _FUNCTIONS]
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), namespace)
    missing = [name for name in _FUNCTIONS if name not in namespace]
    if missing:
        raise ImportError(f"mlx-lm's tokenizer_utils.py no longer defines {', '.join(missing)}")
    return namespace


def infer_thinking(tokenizer: Any) -> tuple:
    """mlx-lm's `_infer_thinking`: (start, end, start ids, end ids), Nones where none."""
    return _functions()["_infer_thinking"](tokenizer)


def infer_tool_parser(tokenizer: Any) -> str | None:
    """mlx-lm's `_infer_tool_parser`: a tool_parsers module name from the tokenizer's
    `chat_template` and `get_vocab()`, or None."""
    return _functions()["_infer_tool_parser"](tokenizer)
