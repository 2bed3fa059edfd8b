"""Celery tasks: thin wrappers around models_app.downloads (no mlx, no inference on this path)."""

from __future__ import annotations

import logging
import uuid

from celery import shared_task
from celery.signals import worker_ready
from django.db import transaction
from django.utils import timezone

from models_app import downloads
from models_app.models import Download

logger = logging.getLogger(__name__)


@shared_task(
    name="models_app.download_model",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def download_model(self, download_id: int) -> str:
    """Run one download. Late ack + reject on worker loss: a killed worker's task is not lost; the
    row's task id makes a stale redelivery a no-op, and worker_ready re-queues what a killed worker
    left running (the filesystem transport has no redelivery at all)."""
    return downloads.run_download(
        download_id, task_id=self.request.id, worker=self.request.hostname or ""
    )


def enqueue(row: Download) -> Download:
    """Send a queued row to the workers once the current transaction commits.

    Every queueing gets a fresh task id stored on the row before the message exists, so only the
    newest message for a row can run it.
    """
    task_id = str(uuid.uuid4())
    Download.objects.filter(pk=row.pk).update(
        celery_task_id=task_id, status=Download.Status.QUEUED, updated_at=timezone.now()
    )
    row.celery_task_id, row.status = task_id, Download.Status.QUEUED
    pk = row.pk

    def send() -> None:
        try:
            download_model.apply_async(args=[pk], task_id=task_id)
        except (
            Exception
        ) as exc:  # broker down: say so on the row rather than leave it queued forever
            logger.warning("could not queue download %s: %s", pk, exc)
            now = timezone.now()
            Download.objects.filter(pk=pk, celery_task_id=task_id).update(
                status=Download.Status.FAILED,
                finished_at=now,
                updated_at=now,
                error=f"Could not queue the download: the task broker is unreachable ({exc})",
            )

    transaction.on_commit(send)
    return row


def resume_interrupted_downloads(worker: str | None = None) -> list[int]:
    """Re-queue downloads left `running` by a worker that died (SIGKILL, power loss, ...).

    They resume from the bytes on disk. Called when a worker starts, with its node name: rows that
    node was running belong to its previous life; rows of other nodes only once they went silent
    (see downloads.interrupted_downloads, which also picks up long-queued rows).
    """
    requeued = []
    for row in downloads.interrupted_downloads(worker):
        # Conditional on the row being unchanged since we read it: a live worker's write wins.
        reset = Download.objects.filter(pk=row.pk, status=row.status, updated_at=row.updated_at)
        if reset.update(
            status=Download.Status.QUEUED, rate=0.0, eta_seconds=None, updated_at=timezone.now()
        ):
            enqueue(row)
            requeued.append(row.pk)
    if requeued:
        logger.info("re-queued interrupted downloads %s", requeued)
    return requeued


@worker_ready.connect
def _resume_on_worker_start(sender=None, **kwargs) -> None:
    try:
        resume_interrupted_downloads(getattr(sender, "hostname", None))
    except Exception:  # never keep a worker from starting
        logger.exception("could not re-queue interrupted downloads")
