"""Downloading models from the Hugging Face hub into MODELS_DIR: progress, cancel, resume, registration.

A repo gives a model folder (config.json and safetensors weights) or, when the files to fetch are
GGUF (`--include '*Q4_K_M.gguf'`), one GGUF file, registered as it is for the llamacpp backend.

Plain huggingface_hub + Django, no Celery: models_app/tasks.py wraps `run_download` in a task, and the
commands and the admin call the other functions here.

How this uses huggingface_hub 2.4 (read in its source, file_download.py):

* `hf_hub_download` / `snapshot_download` write each file to a *process-unique*
  `<etag>.<uuid>.incomplete` and unlink it when the download fails, so since 2.x a process killed
  mid-file starts that file over. We therefore drive the same building blocks one file at a time:
  `HfApi.model_info(files_metadata=True)` (commit, sizes, LFS sha256), `get_hf_file_metadata` (the
  HEAD call: ETag, X-Repo-Commit, size, CDN location) and `file_download.http_get(resume_size=n)`,
  which sends `Range: bytes=n-`, copes with a server that ignores it (200: truncate, start over),
  and resumes by itself on transient network errors within one process. Our partial file has a
  stable name, `<target>/.download/<file>.<etag>.incomplete`, so the next process resumes it; the
  etag in the name means bytes of an older version of the file are never appended to.
* Progress: `http_get` reports every chunk to `tqdm_class(...).update(n)`. Ours adds it up and
  writes the row at most `PROGRESS_INTERVAL` apart, reading the cancel flag at the same moment;
  raising there stops `http_get` mid-transfer. The chunk size is the module constant
  `constants.DOWNLOAD_CHUNK_SIZE` (10 MiB: the granularity of progress, cancel, and of what a
  killed process loses), which we lower to 256 KiB.
* Xet is not used: plain HTTP from `resolve/` serves every file, Xet-backed ones included (that is
  huggingface_hub's own fallback when hf_xet is absent), and it is what can resume.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import httpx2
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers, filter_repo_objects, validate_repo_id

from models_app.importing import embedding_config, folder_size, model_dir
from models_app.models import Download, LLMModel, model_name_validator

logger = logging.getLogger(__name__)

# What mlx-lm itself fetches (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS) minus `*.py`: we never run repo code.
DEFAULT_INCLUDE = [
    "*.json",
    "model*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]
PROGRESS_INTERVAL = 0.25  # seconds between row updates (and cancel checks) while bytes flow
RATE_WINDOW = 3.0  # seconds of history the transfer rate is averaged over
CHUNK_SIZE = 256 * 1024
# A running row whose worker has not written for this long is taken to be orphaned.
STALE_AFTER = timedelta(seconds=60)
WORK_DIR = ".download"  # inside the target folder: partial files and state.json, removed at the end
STATE_FILE = "state.json"


class DownloadError(Exception):
    """A readable reason a download cannot happen or failed; it goes on the row as is."""


class DownloadCancelled(Exception):
    """The row asked us to stop."""


class Superseded(Exception):
    """The row was re-queued under another task id: a newer run owns it now."""


# --- creating, cancelling, retrying (called by commands and the admin) ---------------------------


def hub_endpoint() -> str:
    """The hub we talk to: HF_ENDPOINT (read now, not at import) or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_name_free(name: str, *, exclude_pk: int | None = None) -> None:
    if LLMModel.objects.filter(name=name).exists():
        raise DownloadError(f"a model named {name!r} is already registered")
    active = Download.objects.filter(name=name, status__in=Download.ACTIVE).exclude(pk=exclude_pk)
    if active.exists():
        raise DownloadError(f"a download of {name!r} is already queued or running")


def validate_request(repo_id: str, revision: str, name: str | None) -> tuple[str, str, str]:
    """Check what a user asked for; returns (repo_id, revision, name) cleaned."""
    repo_id = (repo_id or "").strip()
    revision = (revision or "").strip() or "main"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise DownloadError(f"invalid repo id {repo_id!r}: {exc}") from None
    name = (name or "").strip() or repo_id
    try:
        model_name_validator(name)
    except ValidationError as exc:
        raise DownloadError(f"invalid model name {name!r}: {' '.join(exc.messages)}") from None
    check_name_free(name)
    return repo_id, revision, name


def create_download(
    repo_id: str,
    *,
    revision: str = "main",
    include: list[str] | None = None,
    name: str | None = None,
) -> Download:
    """A new queued row (not yet sent to a worker: see models_app.tasks.enqueue)."""
    repo_id, revision, name = validate_request(repo_id, revision, name)
    patterns = [p.strip() for p in include or [] if p and p.strip()]
    return Download.objects.create(repo_id=repo_id, revision=revision, include=patterns, name=name)


def _ended(status: str, now=None, **extra) -> dict:
    """The fields of a row that has stopped: its status, when, and no transfer rate or ETA left."""
    now = now or timezone.now()
    fields = dict(status=status, finished_at=now, updated_at=now, rate=0.0, eta_seconds=None)
    fields.update(extra)
    return fields


def request_cancel(download_id: int) -> Download:
    """Ask a download to stop. A queued one (or one whose worker died) is cancelled right here."""
    row = Download.objects.filter(pk=download_id).first()
    if row is None:
        raise DownloadError(f"there is no download {download_id}")
    if row.status in Download.FINISHED:
        return row
    now = timezone.now()
    finished = _ended(Download.Status.CANCELLED, now, cancel_requested=True)
    orphaned = Q(status=Download.Status.QUEUED) | Q(
        status=Download.Status.RUNNING, updated_at__lt=now - STALE_AFTER
    )
    if Download.objects.filter(orphaned, pk=row.pk).update(**finished):
        remove_partial_files(row)
    else:
        # A worker has it: it notices the flag at its next progress update. (Leave updated_at alone:
        # it is the worker's heartbeat.)
        Download.objects.filter(pk=row.pk, status__in=Download.ACTIVE).update(cancel_requested=True)
    row.refresh_from_db()
    return row


def prepare_retry(row: Download) -> Download:
    """Reset a failed or cancelled row to queued (a failed one resumes from its files on disk)."""
    if row.status not in (Download.Status.FAILED, Download.Status.CANCELLED):
        raise DownloadError(
            f"download {row.pk} is {row.status}; only failed or cancelled ones retry"
        )
    check_name_free(row.name, exclude_pk=row.pk)
    if row.status == Download.Status.CANCELLED:
        row.bytes_done = row.files_done = 0
    row.status = Download.Status.QUEUED
    row.error = ""
    row.cancel_requested = False
    row.started_at = row.finished_at = None
    row.rate, row.eta_seconds, row.model = 0.0, None, None
    row.save()
    return row


def interrupted_downloads(worker: str | None) -> list[Download]:
    """Rows a worker that is gone left behind: `running` ones of this worker's previous life or
    silent for STALE_AFTER, and `queued` ones that old (their message may be lost: a filesystem
    broker drops a message a killed worker had taken; Redis holds one for its visibility timeout).
    Re-queueing a row whose message is alive is harmless: the old message no longer matches the
    row's task id and does nothing."""
    stale = Q(updated_at__lt=timezone.now() - STALE_AFTER)
    orphaned = stale & Q(status__in=Download.ACTIVE)
    if worker:
        orphaned |= Q(status=Download.Status.RUNNING, worker=worker)
    return list(Download.objects.filter(orphaned))


def remove_partial_files(row: Download) -> None:
    """Delete the target folder of this unfinished download (never one it did not make, one a
    newer download of the same name is using, or a registered model's)."""
    target = model_dir(row.name)
    try:
        state = json.loads((target / WORK_DIR / STATE_FILE).read_text())
    except (OSError, ValueError):
        return
    if state.get("download_id") != row.pk or _registered_in(target):
        return
    shutil.rmtree(target, ignore_errors=True)


# --- display helpers ------------------------------------------------------------------------------


def human_bytes(n: float | None) -> str:
    n = float(n or 0)
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_progress(row: Download) -> str:
    parts = [
        f"[{row.status}]",
        row.percent_display,
        f"{human_bytes(row.bytes_done)} / {human_bytes(row.bytes_total)}",
    ]
    if row.status == Download.Status.RUNNING:
        parts += [f"{human_bytes(row.rate)}/s", f"ETA {human_seconds(row.eta_seconds)}"]
    parts.append(f"files {row.files_done}/{row.files_total}")
    return "  ".join(parts)


def describe_error(exc: BaseException, row: Download) -> str:
    """A one-line reason for the row, never a traceback."""
    repo = row.repo_id
    if isinstance(exc, DownloadError):
        return str(exc)
    if isinstance(exc, GatedRepoError):
        return f"Access to {repo} is gated: accept its conditions on the hub and set HF_TOKEN"
    if isinstance(exc, RepositoryNotFoundError):
        return f"Repository not found: {repo} (check the id; private repos need HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return f"Revision not found: {row.revision} in {repo}"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"File not found on the hub: {exc.response.url}"
    if isinstance(exc, HfHubHTTPError):
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        return f"The hub answered an error for {repo}: {first}"
    if isinstance(exc, httpx2.TransportError):
        return f"Cannot reach the Hugging Face hub at {hub_endpoint()}: {exc or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    if isinstance(exc, OSError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


# --- running a download (in the worker) -----------------------------------------------------------


class _Progress:
    """Adds up what http_get reports, and writes it to the row at most every PROGRESS_INTERVAL."""

    def __init__(self, row: Download, task_id: str | None, *, total: int, files_total: int) -> None:
        self.pk, self.task_id = row.pk, task_id
        self.total, self.files_total = total, files_total
        self.completed = 0  # bytes of finished files
        self.current = 0  # bytes of the file in flight that are on disk (or about to be)
        self.files_done = 0
        self.transferred = 0  # bytes received by this run, for the rate
        self.samples: deque[tuple[float, int]] = deque()
        self.rate = 0.0
        self.last_write = 0.0
        progress = self

        class Bar:  # what http_get expects of a tqdm class: kwargs in, update(n), a context manager
            def __init__(self, *args, initial: int = 0, **kwargs) -> None:
                progress.current = initial

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> bool:
                return False

            def update(self, n: int | float | None = 1) -> None:
                progress.add(int(n or 0))

            def close(self) -> None:
                pass

        self.bar_class = Bar

    @property
    def done(self) -> int:
        return self.completed + self.current

    def start_file(self, on_disk: int) -> None:
        self.current = on_disk
        self.write(force=True)

    def add(self, n: int) -> None:
        self.current += n
        if n > 0:
            self.transferred += n
        self.write()

    def finish_file(self, size: int) -> None:
        self.completed += size
        self.current = 0
        self.files_done += 1
        self.write(force=True)

    def _update_rate(self, now: float) -> None:
        self.samples.append((now, self.transferred))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW:
            self.samples.popleft()
        t0, b0 = self.samples[0]
        if now - t0 >= 1.0:  # less than a second of history says little (per-file latency)
            self.rate = (self.transferred - b0) / (now - t0)

    def write(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < PROGRESS_INTERVAL:
            return
        self.last_write = now
        self._update_rate(now)
        flags = (
            Download.objects.filter(pk=self.pk)
            .values_list("cancel_requested", "celery_task_id")
            .first()
        )
        if flags is None:
            raise DownloadCancelled("the download row was deleted")
        if flags[0]:
            raise DownloadCancelled("cancel requested")
        if self.task_id and flags[1] and flags[1] != self.task_id:
            raise Superseded(flags[1])
        remaining = max(self.total - self.done, 0)
        eta = remaining / self.rate if self.rate > 0 else None
        Download.objects.filter(pk=self.pk).update(
            bytes_done=self.done,
            bytes_total=self.total,
            rate=self.rate,
            eta_seconds=eta,
            files_done=self.files_done,
            files_total=self.files_total,
            updated_at=timezone.now(),
        )


def _claim(download_id: int, task_id: str | None, worker: str) -> Download | None:
    """Atomically move the row to running for this task; None if it is not ours to run."""
    now = timezone.now()
    rows = Download.objects.filter(pk=download_id)
    if task_id:
        # A message for an older queueing (e.g. redelivered by the broker) has a stale id: skip it.
        rows = rows.filter(Q(celery_task_id=task_id) | Q(celery_task_id=""))
    # Running but silent: a broker redelivering the task of a worker that was killed.
    rows = rows.filter(
        Q(status=Download.Status.QUEUED)
        | Q(status=Download.Status.RUNNING, updated_at__lt=now - STALE_AFTER)
    )
    changes = dict(
        status=Download.Status.RUNNING,
        started_at=now,
        finished_at=None,
        worker=worker,
        error="",
        rate=0.0,
        eta_seconds=None,
        updated_at=now,
    )
    if task_id:
        changes["celery_task_id"] = task_id
    if not rows.update(**changes):
        return None
    return Download.objects.get(pk=download_id)


def _ours(row: Download, task_id: str | None):
    """The row, as long as this run still owns it (running, and under our task id)."""
    rows = Download.objects.filter(pk=row.pk, status=Download.Status.RUNNING)
    return rows.filter(celery_task_id=task_id) if task_id else rows


def run_download(download_id: int, *, task_id: str | None = None, worker: str = "") -> str:
    """Download, verify and register one queued row. Returns the row's final status (or "skipped")."""
    row = _claim(download_id, task_id, worker)
    if row is None:
        current = Download.objects.filter(pk=download_id).values_list("status", flat=True).first()
        logger.info("download %s: not run by task %s (row is %s)", download_id, task_id, current)
        return "skipped"
    logger.info("download %s: %s@%s -> %s", row.pk, row.repo_id, row.revision, row.name)
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, CHUNK_SIZE)
    try:
        if row.cancel_requested:
            raise DownloadCancelled("cancel requested before start")
        _download_and_register(row, task_id)
    except DownloadCancelled:
        remove_partial_files(row)
        _ours(row, task_id).update(**_ended(Download.Status.CANCELLED))
        logger.info("download %s: cancelled, files removed", row.pk)
        return Download.Status.CANCELLED
    except Superseded as exc:
        logger.info("download %s: re-queued as task %s; this run stops", row.pk, exc)
        return "superseded"
    except Exception as exc:
        message = describe_error(exc, row)
        if isinstance(exc, (DownloadError, HfHubHTTPError, httpx2.TransportError)):
            logger.warning("download %s failed: %s", row.pk, message)
        else:
            logger.exception("download %s failed: %s", row.pk, message)
        if (
            _ours(row, task_id)
            .filter(cancel_requested=False)
            .update(**_ended(Download.Status.FAILED, error=message))
        ):
            _remove_if_empty(row)
        else:  # cancelled meanwhile (or re-queued): a cancel's cleanup still applies
            if Download.objects.filter(pk=row.pk, cancel_requested=True).exists():
                remove_partial_files(row)
            _ours(row, task_id).update(**_ended(Download.Status.CANCELLED))
        return Download.Status.FAILED
    logger.info("download %s: completed and registered as %s", row.pk, row.name)
    return Download.Status.COMPLETED


def _remove_if_empty(row: Download) -> None:
    """After a failure keep partial files (a retry resumes them), but not a folder with nothing."""
    target = model_dir(row.name)
    work = target / WORK_DIR
    if not (work / STATE_FILE).is_file():
        return
    kept = [p for p in target.rglob("*") if p.is_file() and p != work / STATE_FILE]
    if not kept:
        remove_partial_files(row)


def _file_size(sibling) -> int | None:
    return sibling.lfs.size if sibling.lfs is not None else sibling.size


def _download_and_register(row: Download, task_id: str | None) -> None:
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint)
    info = api.model_info(row.repo_id, revision=row.revision, files_metadata=True)
    commit = info.sha or row.revision
    patterns = row.include or DEFAULT_INCLUDE
    files = list(
        filter_repo_objects(info.siblings or [], allow_patterns=patterns, key=lambda s: s.rfilename)
    )
    where = f"{row.repo_id}@{row.revision}"
    if not files:
        raise DownloadError(f"no files of {where} match {', '.join(patterns)}")
    names = {f.rfilename for f in files}
    gguf = _gguf_entry(names, where)
    if gguf is not None:
        pass  # a GGUF file (or a split set) as it is: llama.cpp reads it, no config.json
    elif "config.json" not in names:
        raise DownloadError(
            f"{where} has no config.json among the files to fetch: not an mlx-lm / "
            "transformers model (or add config.json to --include)"
        )
    elif not any(n.endswith(".safetensors") for n in names):
        raise DownloadError(
            f"{where} has no .safetensors weights among the files to fetch "
            "(only safetensors models can be served)"
        )
    files.sort(key=lambda s: (_file_size(s) or 0, s.rfilename))  # small files first
    total = sum(_file_size(f) or 0 for f in files)

    target = model_dir(row.name)
    state = _prepare_target(target, row, commit)
    on_disk = folder_size(target)
    free = shutil.disk_usage(target).free
    if free < total - on_disk:
        raise DownloadError(
            f"not enough disk space in {target.parent}: need "
            f"{human_bytes(total - on_disk)}, {human_bytes(free)} free"
        )
    Download.objects.filter(pk=row.pk).update(
        commit=commit, bytes_total=total, files_total=len(files), updated_at=timezone.now()
    )

    progress = _Progress(row, task_id, total=total, files_total=len(files))
    for sibling in files:
        _fetch_file(row, endpoint, commit, target, sibling, state, progress)
    _verify(target, files, where, gguf)
    _register(row, task_id, target, commit, total, len(files), gguf=gguf)
    shutil.rmtree(target / WORK_DIR, ignore_errors=True)


def _prepare_target(target: Path, row: Download, commit: str) -> dict:
    """Make (or reuse) the folder; state.json marks it as a download's and remembers finished files."""
    state_path = target / WORK_DIR / STATE_FILE
    if target.exists():
        if _registered_in(target):
            raise DownloadError(
                f"{target} is the folder of a registered model; choose another name"
            )
        if not state_path.is_file() and any(target.iterdir()):
            raise DownloadError(
                f"{target} already exists and was not made by a download; "
                "remove it or choose another name"
            )
    state: dict = {}
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except ValueError:
            state = {}
    state.update(download_id=row.pk, repo_id=row.repo_id, commit=commit)
    state.setdefault("files", {})
    _write_state(target, state)
    return state


def _write_state(target: Path, state: dict) -> None:
    path = target / WORK_DIR / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fetch_file(
    row: Download,
    endpoint: str,
    commit: str,
    target: Path,
    sibling,
    state: dict,
    progress: _Progress,
) -> None:
    filename = sibling.rfilename
    listed = _file_size(sibling)
    final = target / filename
    url = hf_hub_url(row.repo_id, filename, revision=commit, endpoint=endpoint)
    meta = get_hf_file_metadata(url, endpoint=endpoint, retry_on_errors=True)
    if not meta.etag or not meta.commit_hash:
        raise DownloadError(
            f"{endpoint} does not answer like the Hugging Face hub (no ETag or "
            f"X-Repo-Commit for {filename}); check HF_ENDPOINT"
        )
    size = meta.size if meta.size is not None else listed
    if listed is not None and size != listed:
        raise DownloadError(f"{filename}: the hub lists {listed} bytes but serves {size}")

    if (
        state["files"].get(filename) == meta.etag
        and final.is_file()
        and final.stat().st_size == size
    ):
        progress.finish_file(size)  # finished by an earlier run
        return

    safe_etag = "".join(c for c in meta.etag if c.isalnum() or c in "-_")[:80]
    partial = target / WORK_DIR / f"{filename}.{safe_etag}.incomplete"
    partial.parent.mkdir(parents=True, exist_ok=True)
    for stale in partial.parent.glob(glob.escape(Path(filename).name) + ".*.incomplete"):
        if stale != partial:
            stale.unlink(missing_ok=True)  # bytes of another version of the file
    resume = partial.stat().st_size if partial.exists() else 0
    if size is not None and resume > size:
        partial.unlink()
        resume = 0
    if resume:
        logger.info("download %s: resuming %s at byte %d of %s", row.pk, filename, resume, size)

    headers = build_hf_headers()
    if urlparse(meta.location).netloc != urlparse(url).netloc:
        # Like hf_hub_download: never send the token to a CDN.
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    progress.start_file(resume)
    with open(partial, "ab") as f:
        http_get(
            meta.location,
            f,
            resume_size=resume,
            headers=headers,
            expected_size=size,
            displayed_filename=filename,
            tqdm_class=progress.bar_class,
        )

    if sibling.lfs is not None and sibling.lfs.sha256 and _sha256(partial) != sibling.lfs.sha256:
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"{filename}: checksum mismatch after download (removed; retry fetches it again)"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    state["files"][filename] = meta.etag
    _write_state(target, state)
    progress.finish_file(final.stat().st_size)


def _verify(target: Path, files: list, where: str, gguf: str | None = None) -> None:
    problems = []
    for sibling in files:
        path = target / sibling.rfilename
        expected = _file_size(sibling)
        if not path.is_file():
            problems.append(f"{sibling.rfilename} missing")
        elif expected is not None and path.stat().st_size != expected:
            problems.append(
                f"{sibling.rfilename} has {path.stat().st_size} bytes, the hub lists {expected}"
            )
    if gguf is None and (
        not (target / "config.json").is_file() or not any(target.glob("*.safetensors"))
    ):
        problems.append("config.json or *.safetensors missing")
    if gguf is not None and not problems:
        from models_app.importing import gguf_file_problem

        if problem := gguf_file_problem(target / gguf):
            problems.append(problem)
    if problems:
        raise DownloadError(f"{where}: verification failed: {'; '.join(problems)}")


def _registered_in(target: Path) -> bool:
    """A registered model is this folder or a (GGUF) file in it."""
    inside = Q(path=str(target)) | Q(path__startswith=str(target) + os.sep)
    return LLMModel.objects.filter(inside).exists()


def _gguf_entry(names: set[str], where: str) -> str | None:
    """The GGUF file to register when the files to fetch are GGUF weights (one file, or the parts
    of one split file: llama.cpp opens the first), else None."""
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if not ggufs:
        return None
    if any(n.endswith(".safetensors") for n in names):
        raise DownloadError(f"{where}: pick GGUF or safetensors weights, not both (--include)")
    stems = {re.sub(r"-\d{5}-of-\d{5}\.gguf$", "", n, flags=re.I) for n in ggufs}
    if len(stems) > 1:
        raise DownloadError(
            f"{where} has {len(ggufs)} GGUF files ({', '.join(ggufs[:4])}...): pick one with "
            "--include, e.g. --include '*Q4_K_M.gguf'"
        )
    if settings.LLAMA_SERVER is None:
        raise DownloadError(
            "GGUF files are served by llama.cpp, whose llama-server is not built here "
            "(`make setup` builds it, or set LLM_SERVICE_LLAMA_SERVER)"
        )
    return ggufs[0]


def _register(
    row: Download,
    task_id: str | None,
    target: Path,
    commit: str,
    total: int,
    files_total: int,
    gguf: str | None = None,
) -> None:
    """Register the model and complete the row in one transaction: never half-registered."""
    now = timezone.now()
    with transaction.atomic():
        if LLMModel.objects.filter(name=row.name).exists():
            raise DownloadError(
                f"a model named {row.name!r} was registered meanwhile; the files stay in {target}"
            )
        model = LLMModel.objects.create(
            name=row.name,
            source=LLMModel.Source.HUGGINGFACE,
            source_ref=row.repo_id,
            revision=commit,
            path=str(target / gguf) if gguf else str(target),
            format=LLMModel.Format.GGUF if gguf else LLMModel.Format.MLX,
            backend="llamacpp" if gguf else "auto",
            size_bytes=total,
            status=LLMModel.Status.AVAILABLE,
            **((embedding_config(target) or {}) if not gguf else {}),
        )
        if (
            model.kind == LLMModel.Kind.CHAT
            and not LLMModel.objects.filter(is_default=True).exists()
        ):
            model.make_default()
        completed = (
            _ours(row, task_id)
            .filter(cancel_requested=False)
            .update(
                **_ended(
                    Download.Status.COMPLETED,
                    now,
                    model=model,
                    commit=commit,
                    bytes_done=total,
                    bytes_total=total,
                    files_done=files_total,
                    files_total=files_total,
                    eta_seconds=0.0,
                    error="",
                )
            )
        )
        if not completed:  # cancelled or taken over at the last moment: roll the model back
            raise DownloadCancelled("the row changed before registration")
