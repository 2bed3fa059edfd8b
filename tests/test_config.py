"""Configuration: one Django-free table of LLM_SERVICE_* variables (llmservice/env.py) that the
settings, the CLI and the Settings page all read; an invalid value of any variable stops `serve`
with a message naming it."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from llmservice import env
from tests.helpers import BIN, ROOT

BAD_VALUES = {"int": "many", "float": "lots", "bool": "maybe", "choice": "nonsense"}


def test_the_settings_page_lists_every_variable_of_the_table():
    from llmservice.dashboard import config

    assert [row[0] for row in config.effective()] == [v.env for v in env.VARIABLES]


def test_the_settings_page_shows_secrets_only_as_set_or_not(settings):
    from llmservice.dashboard import config

    settings.CONFIG = {**settings.CONFIG, "API_KEY": "sk-very-secret", "METRICS_TOKEN": ""}
    shown = {row[0]: row[2] for row in config.effective()}
    assert shown["LLM_SERVICE_API_KEY"] == "set"
    assert shown["LLM_SERVICE_METRICS_TOKEN"] == "not set"
    assert not any("sk-very-secret" in cell for row in config.effective() for cell in row)


def test_the_table_is_django_free():
    source = (ROOT / "llmservice" / "env.py").read_text()
    assert not re.search(r"^\s*(from|import) django", source, re.MULTILINE)


def test_no_module_reads_an_llm_service_variable_around_the_table():
    around = re.compile(r"""(environ\.get\(|environ\[|getenv\()\s*["']LLM_SERVICE_""")
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("llmservice", "inference", "models_app", "analytics")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "env.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if around.search(line)
    ]
    assert found == []


def test_every_variable_the_settings_mention_is_in_the_table():
    source = (ROOT / "llmservice" / "settings.py").read_text()
    used = set(re.findall(r'CONFIG\["([A-Z_]+)"\]', source))
    assert used == set(env.TABLE)


def _serve(tmp_path, **variables) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "llm-service"), "serve", "--no-demo", "--no-worker", "--port", "1"],
        env={**os.environ, "LLM_SERVICE_DATA_DIR": str(tmp_path), **variables},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "variable",
    [v for v in env.VARIABLES if v.type in BAD_VALUES],
    ids=lambda v: v.name,
)
def test_an_invalid_value_of_any_variable_stops_serve_naming_it(tmp_path, variable):
    result = _serve(tmp_path, **{variable.env: BAD_VALUES[variable.type]})
    assert result.returncode != 0
    assert f"configuration error: {variable.env} must be" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("LLM_SERVICE_SGEMM_THREADS", "-1", "LLM_SERVICE_SGEMM_THREADS must be >= 0"),
        ("LLM_SERVICE_PORT", "70000", "LLM_SERVICE_PORT must be <= 65535"),
        ("LLM_SERVICE_MAX_REQUEST_MB", "nan", "LLM_SERVICE_MAX_REQUEST_MB must be a finite number"),
        ("LLM_SERVICE_DATABASE_URL", "nosuch://x", "LLM_SERVICE_DATABASE_URL is not a valid"),
    ],
)
def test_a_value_out_of_range_stops_serve_naming_it(tmp_path, variable, value, message):
    result = _serve(tmp_path, **{variable: value})
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_readme_documents_every_variable_of_the_table():
    readme = (ROOT / "README.md").read_text()
    assert [v.env for v in env.VARIABLES if f"`{v.env}`" not in readme] == []
