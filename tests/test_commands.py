"""The command-line interfaces: import_model, create_api_key, `llm-service serve`, settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import BIN, ROOT, Server, demo_gguf_path, free_port, wait_until


def run(args: list[str], data_dir: Path, **env) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "LLM_SERVICE_DATA_DIR": str(data_dir),
        "LLM_SERVICE_MODELS_DIR": str(data_dir / "models"),
        **env,
    }
    return subprocess.run(args, env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def manage(data_dir: Path, *args: str, **env) -> subprocess.CompletedProcess:
    return run([sys.executable, "manage.py", *args], data_dir, **env)


def test_a_gguf_is_converted_for_mlx_into_models_dir_and_registered(tmp_path):
    manage(tmp_path, "migrate", "-v0")
    result = manage(
        tmp_path,
        "import_model",
        str(demo_gguf_path()),
        *("--name", "smol", "--default", "--backend", "mlx"),
    )
    assert result.returncode == 0, result.stderr
    target = tmp_path / "models" / "smol"
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
    listed = manage(
        tmp_path,
        "shell",
        "--no-imports",
        "-c",
        "from models_app.models import LLMModel as M; "
        "print([(m.name, m.is_default, m.source, m.size_bytes > 4e8) for m in M.objects.all()])",
    )
    assert "('smol', True, 'gguf', True)" in listed.stdout


def test_an_unsupported_file_gets_a_clear_error_and_leaves_nothing(tmp_path):
    manage(tmp_path, "migrate", "-v0")
    bogus = tmp_path / "weights.gguf"
    bogus.write_bytes(b"NOPE" + b"\0" * 100)
    result = manage(tmp_path, "import_model", str(bogus), "--name", "bogus")
    assert result.returncode != 0
    assert "GGUF" in result.stderr and "Traceback" not in result.stderr
    models_dir = tmp_path / "models"
    assert not models_dir.exists() or not any(models_dir.iterdir())
    count = manage(
        tmp_path,
        "shell",
        "--no-imports",
        "-c",
        "from models_app.models import LLMModel; print(LLMModel.objects.count())",
    )
    assert count.stdout.strip() == "0"


def test_a_model_folder_is_registered_in_place(tmp_path, tiny_dir):
    manage(tmp_path, "migrate", "-v0")
    result = manage(tmp_path, "import_model", str(tiny_dir))
    assert result.returncode == 0, result.stderr
    assert "Imported tiny (default)" in result.stdout
    again = manage(tmp_path, "import_model", str(tiny_dir))
    assert again.returncode != 0 and "already registered" in again.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json" in manage(tmp_path, "import_model", str(empty)).stderr


def test_create_api_key_prints_a_key_that_is_stored_hashed(tmp_path):
    manage(tmp_path, "migrate", "-v0")
    key = manage(tmp_path, "create_api_key", "--name", "ci").stdout.strip()
    assert key.startswith("sk-llm-") and len(key) > 40
    db = (tmp_path / "db.sqlite3").read_bytes()
    assert key.encode() not in db


@pytest.mark.parametrize(
    "variable, value",
    [
        ("LLM_SERVICE_PORT", "eighty"),
        ("LLM_SERVICE_PORT", "70000"),
        ("LLM_SERVICE_BACKEND", "tpu"),
        ("LLM_SERVICE_MAX_QUEUE", "0"),
        ("LLM_SERVICE_DEBUG", "maybe"),
        ("LLM_SERVICE_DATABASE_URL", "nosuchdb://x"),
    ],
)
def test_an_invalid_setting_fails_at_start_naming_the_variable(tmp_path, variable, value):
    result = run([str(BIN / "llm-service"), "serve", "--no-demo"], tmp_path, **{variable: value})
    assert result.returncode != 0
    assert variable in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_starts_with_a_key_and_the_demo_model_on_first_start(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "LLM_SERVICE_DATA_DIR": str(tmp_path),
        "LLM_SERVICE_PORT": str(port),
        "LLM_SERVICE_HOST": "127.0.0.1",
        "LLM_SERVICE_DEMO_GGUF": str(demo_gguf_path()),
    }
    env.pop("LLM_SERVICE_API_KEY", None)
    log = tmp_path / "out.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "llm-service"), "serve"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: "Default model" in log.read_text() or proc.poll() is not None, timeout=300
        )
        text = log.read_text()
        assert f"http://127.0.0.1:{port}" in text
        key = next(
            line.split(": ", 1)[1] for line in text.splitlines() if "API key (shown once)" in line
        )
        assert "Default model: smollm2-135m-instruct" in text
        dashboard = next(line for line in text.splitlines() if line.startswith("Dashboard:"))
        password = dashboard.split("password: ")[1].split()[0]
        check = run(
            [
                sys.executable,
                "manage.py",
                "shell",
                "--no-imports",
                "-c",
                "from django.contrib.auth import authenticate; "
                "from django.test import RequestFactory; "
                "r = RequestFactory().post('/admin/login/'); "
                f"u = authenticate(r, username='admin', password={password!r}); "
                "print(u is not None and u.is_staff)",
            ],
            tmp_path,
        )
        assert check.stdout.strip() == "True"
        srv = Server(tmp_path)
        srv.port, srv.url = port, f"http://127.0.0.1:{port}"
        wait_until(srv._healthy_quiet, timeout=60)
        import openai

        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct"]
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        returncode = proc.wait(20)
    # It stops cleanly, and takes its download worker (and the worker's beat) with it.
    assert returncode == 0, log.read_text()[-2000:]
    assert "terminate called" not in log.read_text()
    worker_pid = int(log.read_text().split("Download worker: pid ")[1].split()[0])
    time.sleep(0.5)
    assert not Path(f"/proc/{worker_pid}").exists()
    # Second start: same key still valid, not shown again, no second import.
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "llm-service"), "serve"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "Dashboard:" in log.read_text(), timeout=120)
        assert "shown once" not in log.read_text()
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_admin_password_can_come_from_the_environment(tmp_path):
    result = run(
        [
            sys.executable,
            "-c",
            "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'llmservice.settings'); "
            "django.setup(); from llmservice.cli import bootstrap; print(bootstrap(demo=False))",
        ],
        tmp_path,
        LLM_SERVICE_ADMIN_PASSWORD="operator-secret-1",
    )
    assert "(LLM_SERVICE_ADMIN_PASSWORD)" in result.stdout, result.stderr
    check = manage(
        tmp_path,
        "shell",
        "--no-imports",
        "-c",
        "from django.contrib.auth import authenticate; "
        "from django.test import RequestFactory; "
        "r = RequestFactory().post('/admin/login/'); "
        "print(authenticate(r, username='admin', password='operator-secret-1') is not None)",
    )
    assert check.stdout.strip() == "True"


def test_serve_stops_on_sigint_even_when_started_with_sigint_ignored(tmp_path):
    # A shell's background job, and some process managers, start it with SIGINT ignored.
    server = Server(tmp_path)
    server.start(preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    worker = [p for p in psutil.Process(server.proc.pid).children(recursive=True)]
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(60) == 0
    psutil.wait_procs(worker, timeout=30)
    assert not [p for p in worker if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
