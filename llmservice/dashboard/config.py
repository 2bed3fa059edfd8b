"""The effective configuration, as the Settings page shows it: every variable of the table in
llmservice/env.py with its value, never a secret's."""

from __future__ import annotations

import os

from django.conf import settings

from inference.backends import cpu_blas
from llmservice import env


def _database() -> str:
    db = settings.DATABASES["default"]
    engine = db["ENGINE"].rsplit(".", 1)[-1]
    if engine == "sqlite3":
        return f"sqlite3 ({db['NAME']})"
    return engine  # host, user and password stay out of the page


def _shown(variable: env.Variable, value) -> str:
    if variable.secret:
        return "set" if value else "not set"
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ", ".join(value) or "none"
    if isinstance(value, float):
        value = f"{value:g}"
    return f"{value} {variable.unit}".strip()


def _this_process() -> dict[str, str]:
    """What a few variables came to in this process, beside their values."""
    preloaded = "openblas" in os.environ.get("LD_PRELOAD", "")
    return {
        "DATABASE_URL": _database(),
        "MODELS_DIR": str(settings.MODELS_DIR),
        "OPENBLAS": "this process: " + ("OpenBLAS" if preloaded else "bundled BLAS"),
        "SGEMM": "this process: " + ("yes" if cpu_blas.active() else "no"),
    }


def effective() -> list[tuple[str, str, str, str]]:
    """(environment variable, meaning, effective value, default) rows, in the table's order."""
    notes = _this_process()
    rows = []
    for variable in env.VARIABLES:
        value = _shown(variable, settings.CONFIG[variable.name])
        if variable.name in notes:
            value = f"{value} ({notes[variable.name]})" if value else notes[variable.name]
        default = "" if variable.secret else _shown(variable, variable.default)
        rows.append((variable.env, variable.meaning, value, default))
    return rows
