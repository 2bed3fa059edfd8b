import time

from django.core.management.base import BaseCommand, CommandError

from models_app import downloads
from models_app.models import Download


class Command(BaseCommand):
    help = "Stop a queued or running model download; its partial files are deleted."

    def add_arguments(self, parser):
        parser.add_argument("download_id", type=int)
        parser.add_argument(
            "--no-wait",
            action="store_true",
            help="only ask the worker to stop; do not wait until it has",
        )

    def handle(self, *args, download_id, no_wait, **options):
        try:
            row = downloads.request_cancel(download_id)
        except downloads.DownloadError as exc:
            raise CommandError(str(exc)) from exc
        if row.status in (Download.Status.COMPLETED, Download.Status.FAILED):
            raise CommandError(f"download {row.pk} already {row.status}; nothing to cancel")
        if row.status == Download.Status.RUNNING and not no_wait:
            deadline = time.monotonic() + 30
            while row.status == Download.Status.RUNNING and time.monotonic() < deadline:
                time.sleep(0.2)
                row.refresh_from_db()
        if row.status == Download.Status.CANCELLED:
            self.stdout.write(f"Download {row.pk} cancelled.")
        else:
            self.stdout.write(
                f"Download {row.pk}: cancel requested; the worker stops it at its next "
                "progress update."
            )
