"""llm-service on PostgreSQL (`LLM_SERVICE_DATABASE_URL`): a throwaway cluster of the machine's own
PostgreSQL, with the server's migrations, keys, API and analytics on it, restarted under it."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import urllib.parse
from pathlib import Path

import openai
import psycopg
import pytest

from tests.helpers import Server, wait_until
from tests.test_analytics import make_key
from tests.test_chat_completions import ask


def _program(name: str) -> str:
    # Debian keeps PostgreSQL's server programs off PATH, in a folder per major version.
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        pytest.fail("PostgreSQL is not installed: `make test` installs it (.ci/sysdeps)")
    return found


class Cluster:
    """A PostgreSQL cluster in a folder of its own, listening only on a socket there."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="llm-service-pg-"))
        # PostgreSQL refuses to run as root: as root, its own user runs it.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.folder, "postgres")
        self.url = f"postgres://llm@{urllib.parse.quote(str(self.folder), safe='')}/llmservice"

    def run(self, name: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, _program(name), *args], check=True, capture_output=True, timeout=120
        )

    def pg_ctl(self, action: str) -> None:
        self.run(
            "pg_ctl", "-D", f"{self.folder}/data", "-l", f"{self.folder}/log", "-w",
            "-m", "fast", "-o", f"-k {self.folder} -c listen_addresses=''", action,
        )  # fmt: skip

    def query(self, sql: str, *params) -> list[tuple]:
        with psycopg.connect(host=str(self.folder), user="llm", dbname="llmservice") as db:
            return db.execute(sql, params).fetchall()


@pytest.fixture
def postgres():
    cluster = Cluster()
    try:
        cluster.run("initdb", "-D", f"{cluster.folder}/data", "-U", "llm", "--auth=trust")
        cluster.pg_ctl("start")
        cluster.run("createdb", "-h", str(cluster.folder), "-U", "llm", "llmservice")
        yield cluster
    finally:
        if (cluster.folder / "data" / "postmaster.pid").exists():
            cluster.pg_ctl("stop")
        shutil.rmtree(cluster.folder, ignore_errors=True)


def test_a_server_on_postgresql_answers_records_and_outlives_a_postgresql_restart(
    tmp_path, postgres, tiny_dir
):
    env = {"LLM_SERVICE_DATABASE_URL": postgres.url}
    with Server(tmp_path / "server", models=[("tiny", tiny_dir, True)], env=env) as server:
        key = make_key(server, "on-postgres")  # a key in the database: one more lookup
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)

        before = ask(client).choices[0].message.content
        # Every connection the server holds is cut; its next requests must not fail for it.
        postgres.pg_ctl("restart")
        assert ask(client).choices[0].message.content == before
        assert "tiny" in {m.id for m in client.models.list()}

        recorded = "SELECT endpoint, outcome FROM analytics_requestlog WHERE key_name = %s"
        wait_until(lambda: len(postgres.query(recorded, "on-postgres")) == 3, timeout=60)
        assert sorted(postgres.query(recorded, "on-postgres")) == [
            ("chat.completions", "ok"),
            ("chat.completions", "ok"),
            ("models", "ok"),
        ]
