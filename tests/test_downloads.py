"""Model downloads from the (stand-in) Hugging Face hub: real Celery workers, real HTTP, real files.

The hub is tests/hub_server.py serving the tiny test model as `test-org/tiny`; workers are
`celery -A llmservice worker` subprocesses on the filesystem broker (and once on a real Redis).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import API_KEY, BIN, ROOT, Server, wait_until
from tests.hub_server import HubServer

REPO = "test-org/tiny"
WEIGHTS = "model.safetensors"
FINISHED = ("completed", "failed", "cancelled")


def hub_env(hub: HubServer) -> dict[str, str]:
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_files(downloaded: Path, source: Path) -> bool:
    got = {
        p.relative_to(downloaded).as_posix(): digest(p)
        for p in downloaded.rglob("*")
        if p.is_file()
    }
    want = {p.relative_to(source).as_posix(): digest(p) for p in source.rglob("*") if p.is_file()}
    return got == want


class Install:
    """One llm-service data dir with its commands and Celery workers, pointed at the stand-in hub."""

    def __init__(self, data_dir: Path, hub: HubServer, **env: str) -> None:
        self.data_dir = data_dir
        self.models_dir = data_dir / "models"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("LLM_SERVICE_REDIS_URL", "LLM_SERVICE_DATABASE_URL")
        }
        self.env.update(
            LLM_SERVICE_DATA_DIR=str(data_dir),
            LLM_SERVICE_MODELS_DIR=str(self.models_dir),
            LLM_SERVICE_DEMO_MODEL="false",
            LLM_SERVICE_API_KEY=API_KEY,
            DJANGO_SETTINGS_MODULE="llmservice.settings",
            HF_HOME=str(data_dir / "hf-home"),
            **hub_env(hub),
            **env,
        )
        self.workers: list[subprocess.Popen] = []

    def manage(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "python"), str(ROOT / "manage.py"), *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def pull(self, *args: str) -> tuple[subprocess.CompletedProcess, int | None]:
        result = self.manage("pull_model", *args)
        # A worker may fail the download before the command reads its row back: then the
        # command says only that it failed.
        match = re.search(r"[Dd]ownload (\d+) (?:queued|failed)", result.stdout + result.stderr)
        return result, int(match.group(1)) if match else None

    def start_worker(self) -> subprocess.Popen:
        log = self.data_dir / f"worker{len(self.workers)}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [
                    str(BIN / "celery"),
                    "-A",
                    "llmservice",
                    "worker",
                    "--pool=solo",
                    "--concurrency=1",
                    "-Q",
                    "downloads",
                    "-n",
                    "downloads@%h",
                    "--without-mingle",
                    "--without-gossip",
                    "--loglevel=INFO",
                ],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers.append(proc)
        wait_until(lambda: proc.poll() is not None or " ready." in log.read_text(), timeout=60)
        assert proc.poll() is None, log.read_text()
        return proc

    def kill_worker(self, proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def worker_logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.data_dir.glob("worker*.log")))

    def stop(self) -> None:
        # The data dir is thrown away: no need for Celery's warm shutdown (4-5 s when idle).
        for proc in self.workers:
            if proc.poll() is None:
                self.kill_worker(proc)

    # Reading the database directly: much faster than a manage.py process per poll.
    def query(self, sql: str, *params) -> list[dict]:
        with sqlite3.connect(self.data_dir / "db.sqlite3", timeout=10) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(sql, params)]

    def download(self, pk: int) -> dict:
        return self.query("SELECT * FROM models_app_download WHERE id = ?", pk)[0]

    def models(self) -> list[dict]:
        return self.query("SELECT * FROM models_app_llmmodel ORDER BY name")

    def wait_finished(self, pk: int, timeout: float = 60) -> dict:
        try:
            return wait_until(
                lambda: (row := self.download(pk))["status"] in FINISHED and row, timeout=timeout
            )
        except AssertionError:
            raise AssertionError(
                f"download {pk} did not finish: {self.download(pk)}\n" + self.worker_logs()
            ) from None


@pytest.fixture(scope="module")
def hub(tiny_dir: Path):
    server = HubServer({REPO: tiny_dir}).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_hub(hub: HubServer):
    hub.reset()
    yield hub
    hub.reset()


@pytest.fixture
def install(tmp_path: Path, fresh_hub: HubServer):
    inst = Install(tmp_path, fresh_hub)
    assert inst.manage("migrate", "-v0").returncode == 0
    yield inst
    inst.stop()


def test_a_pull_with_wait_downloads_and_registers_a_model_that_then_answers_a_chat(
    tmp_path, fresh_hub, tiny_dir
):
    # `llm-service serve` starts the download worker itself.
    server = Server(tmp_path, env=hub_env(fresh_hub)).start()
    try:
        worker_pid = int(re.search(r"Download worker: pid (\d+)", server.log()).group(1))
        pulled = server.manage("pull_model", REPO, "--name", "tiny", "--wait", check=False)
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        assert re.search(r"Download \d+ queued: test-org/tiny@main -> model tiny", pulled.stdout)
        assert "[completed]  100.0%" in pulled.stdout
        assert f"Registered model tiny -> {tmp_path / 'models' / 'tiny'}" in pulled.stdout

        target = tmp_path / "models" / "tiny"
        assert same_files(target, tiny_dir)  # byte for byte, and no partial or state files left
        listed = server.manage("list_models").stdout
        assert re.search(
            r"tiny\s+\*\s+available\s+16\.\d MB\s+hf:test-org/tiny\s+" + re.escape(str(target)),
            listed,
        ), listed

        reply = server.openai().chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Hello"}], max_tokens=5
        )
        assert reply.model == "tiny"
        assert reply.choices[0].message.content
    finally:
        server.stop()

    def gone() -> bool:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, timeout=15)  # the worker stops with the server


def test_progress_is_written_to_the_row_several_times_while_bytes_flow(
    install, fresh_hub, tiny_dir
):
    fresh_hub.throttle = 4_000_000  # bytes/s: about 4 s for the 16 MB model
    install.start_worker()
    _, pk = install.pull(REPO, "--name", "tiny")
    observed = []

    def finished():
        row = install.download(pk)
        if row["status"] == "running":
            observed.append(row)
        return row["status"] in FINISHED and row

    row = wait_until(finished, timeout=60, interval=0.05)
    assert row["status"] == "completed", row["error"]

    done = [r["bytes_done"] for r in observed]
    assert len(set(done)) >= 5, done
    assert done == sorted(done)  # never goes backwards
    total = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    assert row["bytes_done"] == row["bytes_total"] == total
    assert row["files_done"] == row["files_total"] == len(list(tiny_dir.iterdir()))
    rates = [r["rate"] for r in observed if r["rate"]]
    assert rates and 1_000_000 < max(rates) < 8_000_000, rates  # near the throttle
    assert any(r["eta_seconds"] is not None and r["eta_seconds"] > 0 for r in observed)
    assert row["started_at"] and row["finished_at"] and row["model_id"]


def test_cancel_stops_the_transfer_removes_partial_files_and_registers_nothing(install, fresh_hub):
    fresh_hub.throttle = 2_000_000
    install.start_worker()
    _, pk = install.pull(REPO, "--name", "tiny")
    wait_until(lambda: install.download(pk)["bytes_done"] > 5_000_000, timeout=30)  # mid-weights
    assert (install.models_dir / "tiny").is_dir()
    # Nearly stalled from here: a slow `manage.py` start on a loaded machine still finds the
    # transfer running.
    fresh_hub.throttle = 20_000

    cancelled = install.manage("cancel_download", str(pk))
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"Download {pk} cancelled." in cancelled.stdout

    row = install.download(pk)
    assert row["status"] == "cancelled" and row["finished_at"]
    assert not (install.models_dir / "tiny").exists()
    assert install.models() == []
    served = fresh_hub.bytes_served(WEIGHTS)
    time.sleep(0.5)
    assert fresh_hub.bytes_served(WEIGHTS) == served  # the transfer really stopped
    again = install.manage("cancel_download", str(pk))
    assert again.returncode == 0 and "cancelled" in again.stdout


def test_a_worker_killed_mid_file_resumes_from_the_bytes_on_disk_after_restart(
    install, fresh_hub, tiny_dir
):
    size = (tiny_dir / WEIGHTS).stat().st_size
    fresh_hub.throttle = 3_000_000
    worker = install.start_worker()
    _, pk = install.pull(REPO, "--name", "tiny")
    work = install.models_dir / "tiny" / ".download"

    def partial_size() -> int:
        files = list(work.glob(f"{WEIGHTS}.*.incomplete"))
        return files[0].stat().st_size if files else 0

    wait_until(lambda: partial_size() > 4_000_000, timeout=30)
    install.kill_worker(worker)  # SIGKILL: no cleanup, no ack, the row stays "running"
    on_disk = partial_size()
    assert 4_000_000 < on_disk < size
    assert install.download(pk)["status"] == "running"

    fresh_hub.throttle = None
    install.start_worker()  # re-queues what the killed worker left running
    row = install.wait_finished(pk)
    assert row["status"] == "completed", row["error"]

    ranges = fresh_hub.ranges(WEIGHTS)
    assert ranges[0] is None and len(ranges) == 2, ranges
    assert ranges[1] == f"bytes={on_disk}-"  # continued where the file on disk ended
    assert fresh_hub.bytes_served(WEIGHTS) < 2 * size
    assert same_files(install.models_dir / "tiny", tiny_dir)
    assert [m["name"] for m in install.models()] == ["tiny"]
    assert "resuming model.safetensors at byte" in install.worker_logs()


def test_a_dropped_connection_is_resumed_with_a_range_request_in_the_same_run(
    install, fresh_hub, tiny_dir
):
    size = (tiny_dir / WEIGHTS).stat().st_size
    fresh_hub.drop_after[WEIGHTS] = 5_000_000
    install.start_worker()
    result, pk = install.pull(REPO, "--name", "tiny", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr

    ranges = fresh_hub.ranges(WEIGHTS)
    assert len(ranges) == 2 and ranges[0] is None, ranges
    start = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
    assert 0 < start <= 5_000_000
    assert fresh_hub.bytes_served(WEIGHTS) < 2 * size
    assert same_files(install.models_dir / "tiny", tiny_dir)


def test_a_failed_download_keeps_its_bytes_and_pulling_again_continues_from_them(
    install, fresh_hub, tiny_dir
):
    size = (tiny_dir / WEIGHTS).stat().st_size
    # The connection drops after 5 MB, and the hub then fails the resumed request.
    fresh_hub.faults[WEIGHTS] = [("drop", 5_000_000), ("status", 503)]
    install.start_worker()
    failed, pk = install.pull(REPO, "--name", "tiny", "--wait")
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    row = install.download(pk)
    assert row["status"] == "failed"
    assert (
        row["error"].startswith("The hub answered an error for test-org/tiny: ")
        and "503" in row["error"]
    )
    assert install.models() == []
    kept = list((install.models_dir / "tiny" / ".download").glob(f"{WEIGHTS}.*.incomplete"))
    assert len(kept) == 1 and 0 < kept[0].stat().st_size <= 5_000_000
    on_disk = kept[0].stat().st_size

    again, pk2 = install.pull(REPO, "--name", "tiny", "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    assert install.download(pk2)["status"] == "completed"
    assert fresh_hub.ranges(WEIGHTS)[-1] == f"bytes={on_disk}-"
    assert fresh_hub.bytes_served(WEIGHTS) < 2 * size
    assert same_files(install.models_dir / "tiny", tiny_dir)


def test_a_wrong_repo_id_fails_with_a_clear_error_on_the_row_and_a_non_zero_exit(install):
    install.start_worker()
    result, pk = install.pull("nope/missing", "--wait")
    assert result.returncode != 0
    assert "Repository not found: nope/missing" in result.stderr
    assert "Traceback" not in result.stderr
    row = install.download(pk)
    assert row["status"] == "failed"
    assert row["error"].startswith("Repository not found: nope/missing")
    assert install.models() == [] and not any(install.models_dir.glob("*"))

    # Refused before anything is queued:
    bad = install.manage("pull_model", "not a repo id")
    assert bad.returncode != 0 and "invalid repo id" in bad.stderr and "Traceback" not in bad.stderr
    wrong_rev, pk2 = install.pull(REPO, "--revision", "no-such-branch", "--wait")
    assert wrong_rev.returncode != 0
    assert "Revision not found: no-such-branch in test-org/tiny" in wrong_rev.stderr
    assert install.download(pk2)["status"] == "failed"


def test_list_models_shows_a_table_and_remove_model_deletes_only_files_it_owns(install, tiny_dir):
    assert install.manage("list_models").stdout.startswith("No models registered")
    assert (
        install.manage("import_model", str(tiny_dir), "--name", "outside", "--default").returncode
        == 0
    )
    inside = install.models_dir / "inside"
    shutil.copytree(tiny_dir, inside)
    assert install.manage("import_model", str(inside), "--name", "inside").returncode == 0

    table = install.manage("list_models").stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "DEFAULT", "STATUS", "SIZE", "SOURCE", "PATH"]
    assert re.match(
        r"\d+\s+inside\s+available\s+16\.\d MB\s+local\s+" + re.escape(str(inside)), table[1]
    )
    assert re.match(
        r"\d+\s+outside\s+\*\s+available\s+16\.\d MB\s+local\s+" + re.escape(str(tiny_dir)),
        table[2],
    )

    removed = install.manage("remove_model", "inside")
    assert removed.returncode == 0, removed.stderr
    assert f"deleted {inside}" in removed.stdout and not inside.exists()

    outside_id = str(install.models()[0]["id"])
    refused = install.manage("remove_model", outside_id)
    assert (
        refused.returncode != 0
        and "default model" in refused.stderr
        and "--force" in refused.stderr
    )
    assert [m["name"] for m in install.models()] == ["outside"]

    forced = install.manage("remove_model", outside_id, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "files left in place" in forced.stdout
    assert (tiny_dir / "config.json").is_file()  # never deletes what it did not put in MODELS_DIR
    assert install.models() == []
    assert "no model with id or name" in install.manage("remove_model", "ghost").stderr


def test_a_real_celery_worker_on_redis_downloads_and_registers_a_model(
    tmp_path, fresh_hub, redis_url, tiny_dir
):
    install = Install(tmp_path, fresh_hub, LLM_SERVICE_REDIS_URL=redis_url)
    try:
        assert install.manage("migrate", "-v0").returncode == 0
        install.start_worker()
        port = redis_url.rsplit(":", 1)[1].removesuffix("/0")
        assert f"Connected to redis://:**@127.0.0.1:{port}/0" in install.worker_logs()
        assert not (tmp_path / "celery").exists()  # no filesystem broker involved
        result, pk = install.pull(REPO, "--name", "tiny", "--wait")
        assert result.returncode == 0, result.stdout + result.stderr + install.worker_logs()
        assert install.download(pk)["status"] == "completed"
        assert [(m["name"], m["source"], m["source_ref"]) for m in install.models()] == [
            ("tiny", "hf", REPO)
        ]
        assert same_files(install.models_dir / "tiny", tiny_dir)
    finally:
        install.stop()


def test_the_download_worker_never_imports_mlx(install):
    code = (
        "import sys, django; django.setup(); from llmservice.celery import app; "
        "app.loader.import_default_modules(); import models_app.tasks; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')))"
    )
    result = subprocess.run(
        [str(BIN / "python"), "-c", code],
        env=install.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- the admin (in-process: Django's test client against the test database) ---------------------


def _queued_messages(task_id: str) -> list[Path]:
    from django.conf import settings

    folder = Path(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_out"])
    return [p for p in folder.glob("*") if task_id in p.read_text(errors="ignore")]


@pytest.mark.django_db(transaction=True)  # the admin queues in transaction.on_commit
def test_the_admin_queues_a_download_and_cancels_and_retries_it(admin_client, settings):
    from models_app.models import Download, LLMModel

    if settings.REDIS_URL:
        pytest.skip("checks the filesystem broker's messages")
    page = admin_client.get("/admin/models_app/download/add/")
    assert (
        page.status_code == 200
        and b"repo_id" in page.content
        and b"include_patterns" in page.content
    )

    bad = admin_client.post(
        "/admin/models_app/download/add/",
        {"repo_id": "not a repo", "revision": "main", "include_patterns": "", "name": ""},
    )
    assert bad.status_code == 200 and b"invalid repo id" in bad.content

    LLMModel.objects.create(name="taken", path="/x")
    taken = admin_client.post(
        "/admin/models_app/download/add/",
        {"repo_id": "org/x", "revision": "main", "include_patterns": "", "name": "taken"},
    )
    assert b"already registered" in taken.content

    sent = []
    try:
        added = admin_client.post(
            "/admin/models_app/download/add/",
            {
                "repo_id": "org/model",
                "revision": "v1",
                "include_patterns": "*.json, *.safetensors",
                "name": "",
            },
        )
        assert added.status_code == 302
        row = Download.objects.get()
        assert (row.repo_id, row.revision, row.name, row.status) == (
            "org/model",
            "v1",
            "org/model",
            "queued",
        )
        assert row.include == ["*.json", "*.safetensors"]
        sent += _queued_messages(row.celery_task_id)
        assert len(sent) == 1  # the message is in the broker for a worker to take

        listing = admin_client.get("/admin/models_app/download/")
        assert b"org/model" in listing.content and b"queued" in listing.content

        admin_client.post(
            "/admin/models_app/download/",
            {"action": "cancel_downloads", "_selected_action": [row.pk]},
        )
        row.refresh_from_db()
        assert row.status == "cancelled" and row.cancel_requested

        first_task = row.celery_task_id
        admin_client.post(
            "/admin/models_app/download/",
            {"action": "retry_downloads", "_selected_action": [row.pk]},
        )
        row.refresh_from_db()
        assert row.status == "queued" and not row.cancel_requested
        assert row.celery_task_id != first_task  # the old message, if ever delivered, is a no-op
        sent += _queued_messages(row.celery_task_id)
        assert len(sent) == 2
        assert admin_client.get(f"/admin/models_app/download/{row.pk}/change/").status_code == 200
    finally:
        for message in sent:
            message.unlink(missing_ok=True)


def test_a_sentence_transformers_repo_is_registered_as_an_embedding_model(install, fresh_hub):
    from tests.helpers import minilm_path

    fresh_hub.add_repo("test-org/minilm", minilm_path())
    install.start_worker()
    result, pk = install.pull("test-org/minilm", "--name", "minilm", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = install.models()
    assert (row["kind"], row["pooling"], row["normalize"]) == ("embedding", "mean", 1)
    assert not row["is_default"]  # the default is a chat model


def test_a_gguf_picked_from_a_repo_with_include_is_registered_for_llama_cpp(
    install, fresh_hub, tmp_path
):
    from tests.helpers import demo_gguf_path

    repo = tmp_path / "gguf-repo"
    repo.mkdir()
    (repo / "SmolLM2-135M-Instruct.Q4_1.gguf").symlink_to(demo_gguf_path())
    (repo / "SmolLM2-135M-Instruct.Q8_0.gguf").write_bytes(b"GGUF another quantization")
    (repo / "README.md").write_text("# SmolLM2 GGUF\n")
    fresh_hub.add_repo("test-org/smol-gguf", repo)
    install.start_worker()

    both, pk = install.pull("test-org/smol-gguf", "--name", "both", "--include", "*.gguf", "--wait")
    assert both.returncode != 0
    assert "pick one with --include" in install.download(pk)["error"]

    result, pk = install.pull(
        "test-org/smol-gguf", "--name", "smol", "--include", "*Q4_1.gguf", "--wait"
    )
    assert result.returncode == 0, result.stdout + result.stderr + install.worker_logs()
    (row,) = install.models()
    target = install.models_dir / "smol"
    assert row["path"] == str(target / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (row["format"], row["backend"], row["source"]) == ("gguf", "llamacpp", "hf")
    assert sorted(p.name for p in target.iterdir()) == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert digest(target / "SmolLM2-135M-Instruct.Q4_1.gguf") == digest(demo_gguf_path())

    removed = install.manage("remove_model", "smol", "--force")
    assert removed.returncode == 0, removed.stderr
    assert not target.exists()  # the download's folder goes with its file
