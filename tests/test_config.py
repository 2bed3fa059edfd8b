"""Configuration: one reader for every LLM_SERVICE_* variable (the settings' and the CLI's share
it), a bad value stops the server with a message naming the variable, and the Settings page
lists every variable the settings read."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.helpers import BIN, ROOT


def test_the_settings_page_lists_every_variable_the_settings_read():
    from llmservice.dashboard import config

    source = (ROOT / "llmservice" / "settings.py").read_text()
    read = {"LLM_SERVICE_" + n for n in re.findall(r'env_\w+\(\s*"([A-Z_]+)"', source)}
    read |= {"LLM_SERVICE_" + n for n in re.findall(r'env_raw\("([A-Z_]+)"\)', source)}
    listed = {row[0] for row in config.effective()}
    assert read - listed == set()


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("LLM_SERVICE_OPENBLAS", "maybe", "LLM_SERVICE_OPENBLAS must be true or false"),
        ("LLM_SERVICE_SGEMM", "perhaps", "LLM_SERVICE_SGEMM must be true or false"),
        ("LLM_SERVICE_SGEMM_THREADS", "-1", "LLM_SERVICE_SGEMM_THREADS must be >= 0"),
    ],
)
def test_a_bad_value_stops_serve_with_a_message_naming_it(tmp_path, variable, value, message):
    env = {**os.environ, "LLM_SERVICE_DATA_DIR": str(tmp_path), variable: value}
    result = subprocess.run(
        [str(BIN / "llm-service"), "serve", "--no-demo", "--no-worker", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
