import time

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from models_app import downloads
from models_app.models import Download

QUEUED_HINT_AFTER = 15.0  # seconds


class Command(BaseCommand):
    help = (
        "Download a model from the Hugging Face hub into MODELS_DIR and register it. A Celery "
        "worker does the work (`llm-service serve` runs one); this prints the download id."
    )

    def add_arguments(self, parser):
        parser.add_argument("repo_id", help="e.g. mlx-community/SmolLM2-135M-Instruct")
        parser.add_argument(
            "--revision", default="main", help="branch, tag or commit (default main)"
        )
        parser.add_argument(
            "--include",
            nargs="+",
            action="extend",
            metavar="PATTERN",
            help="glob patterns of the files to fetch (default: "
            + " ".join(downloads.DEFAULT_INCLUDE)
            + "); from a GGUF repo, the one .gguf file to serve with llama.cpp, e.g. "
            "'*Q4_K_M.gguf'",
        )
        parser.add_argument("--name", help="the model name to register (default: the repo id)")
        parser.add_argument(
            "--wait",
            action="store_true",
            help="show progress until the download ends; exit non-zero if it fails",
        )

    def handle(self, *args, repo_id, revision, include, name, wait, **options):
        from models_app.tasks import enqueue

        try:
            with transaction.atomic():
                row = downloads.create_download(
                    repo_id, revision=revision, include=include, name=name
                )
                enqueue(row)
        except downloads.DownloadError as exc:
            raise CommandError(str(exc)) from exc
        row.refresh_from_db()
        if row.status == Download.Status.FAILED:  # not queued, or a worker failed it at once
            raise CommandError(f"download {row.pk} failed: {row.error}")
        self.stdout.write(
            f"Download {row.pk} queued: {row.repo_id}@{row.revision} -> model {row.name}"
        )
        if not wait:
            self.stdout.write(
                f"Follow it in the admin; stop it with `manage.py cancel_download {row.pk}`."
            )
            return
        try:
            self._wait(row)
        except KeyboardInterrupt:
            self.stdout.write(
                f"\nStopped waiting; download {row.pk} goes on in the worker "
                f"(`manage.py cancel_download {row.pk}` stops it)."
            )
            raise SystemExit(130) from None

    def _wait(self, row: Download) -> None:
        started = time.monotonic()
        last_line, hinted = None, False
        while True:
            row.refresh_from_db()
            line = downloads.format_progress(row)
            if line != last_line:
                self.stdout.write(f"download {row.pk}: {line}")
                self.stdout.flush()
                last_line = line
            if row.status == Download.Status.COMPLETED:
                path = row.model.path if row.model else downloads.model_dir(row.name)
                self.stdout.write(f"Registered model {row.name} -> {path}")
                return
            if row.status == Download.Status.FAILED:
                raise CommandError(f"download {row.pk} failed: {row.error}")
            if row.status == Download.Status.CANCELLED:
                raise CommandError(f"download {row.pk} was cancelled")
            if (
                row.status == Download.Status.QUEUED
                and not hinted
                and time.monotonic() - started > QUEUED_HINT_AFTER
            ):
                self.stderr.write(
                    "Still queued: is a worker running? `llm-service serve` starts one "
                    "(or run `celery -A llmservice worker -Q downloads --pool=solo`)."
                )
                hinted = True
            time.sleep(0.3)
