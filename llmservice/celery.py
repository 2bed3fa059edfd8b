"""The Celery app, and the download worker that `llm-service serve` runs next to the web server.

Workers only download files (models_app.tasks); they never load a model, so nothing on their import
path may import mlx (or `inference`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from celery import Celery
from celery.signals import beat_embedded_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmservice.settings")

app = Celery("llmservice")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

logger = logging.getLogger(__name__)

WORKER_NODE = "downloads@%h"


def worker_command(*, queue: str | None = None, loglevel: str = "INFO") -> list[str]:
    """The command line of one download worker: one task at a time, in the worker process itself.

    `--pool=solo` keeps it to one process (works with the filesystem transport and with Redis); a
    stable node name lets a restarted worker recognise the downloads its killed predecessor left
    running (models_app.tasks.resume_interrupted_downloads).
    """
    from django.conf import settings

    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "llmservice",
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "-Q",
        queue or settings.CELERY_QUEUE,
        "-n",
        WORKER_NODE,
        "--without-mingle",
        "--without-gossip",
        # Embedded beat for the hourly analytics prune; one worker per server, so one beat.
        "--beat",
        "--schedule",
        settings.CELERY_BEAT_SCHEDULE_FILENAME,
        f"--loglevel={loglevel}",
    ]


def _die_with_parent(parent: int | None = None) -> None:
    """Linux: have the kernel SIGKILL the worker if `serve` dies without cleaning up (SIGKILL,
    the OOM killer). Not SIGTERM, Celery's warm shutdown: it would first finish the download in
    progress, however long that takes, orphaned meanwhile; nor SIGQUIT, whose cold shutdown
    fails the download with the solo pool. Killed, it leaves the row running, and the next
    worker resumes it from the bytes on disk."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        return
    if parent is not None and os.getppid() != parent:  # it died before the line above
        os._exit(1)


@beat_embedded_init.connect
def _beat_dies_with_worker(**kwargs) -> None:
    # The worker's embedded beat is its own child process; the kernel clears a parent-death
    # signal for children, and a worker killed outright would leave beat running.
    if sys.platform.startswith("linux"):
        _die_with_parent(os.getppid())


def start_worker_subprocess(**kwargs) -> subprocess.Popen:
    """Start a download worker as a child process; its output goes to ours."""
    env = dict(os.environ)
    # The worker never runs mlx: no reason to preload OpenBLAS or our matrix product into it.
    preload = [
        p
        for p in env.get("LD_PRELOAD", "").split(":")
        if p and "openblas" not in p and "libllm_sgemm" not in p
    ]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    proc = subprocess.Popen(
        worker_command(**kwargs),
        env=env,
        # Own process group: a Ctrl-C in the terminal reaches `serve`, which stops the worker itself.
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    logger.info("download worker started (pid %s)", proc.pid)
    return proc


def stop_worker_subprocess(proc: subprocess.Popen, timeout: float = 2.0) -> None:
    """SIGTERM (Celery's warm shutdown), then SIGKILL if it lingers past `timeout`.

    Waiting longer buys nothing: an idle worker polling the filesystem broker needs about 4 s for a
    warm shutdown, and a busy one would first finish its whole download. A download it was running
    stays `running` on its row and resumes from the bytes on disk when a worker starts again.
    """
    if proc.poll() is not None:
        return
    # The whole process group: the worker and its embedded beat process.
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait(5)
    else:
        _signal_group(proc, signal.SIGKILL)  # a beat child that outlived its worker


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session made the worker its group's leader
    except (ProcessLookupError, PermissionError):
        pass
