"""A local stand-in for the Hugging Face hub, which is unreachable from the test machines (and CI).

It serves folders on disk as hub repos over real HTTP and speaks the part of the hub API that
huggingface_hub's download path uses; tests point `HF_ENDPOINT` at it:

* `GET /api/models/{repo}` and `/api/models/{repo}/revision/{rev}` (`?blobs=true` adds sizes, blob
  ids and LFS sha256), as `HfApi.model_info` / `repo_info` read them;
* `GET /api/models/{repo}/tree/{rev}[/{path}]`, the listing `snapshot_download` reads;
* `HEAD` / `GET /{repo}/resolve/{rev}/{file}` with `ETag`, `X-Repo-Commit`, `Content-Length`,
  `Accept-Ranges`, `X-Linked-Etag`/`X-Linked-Size` for LFS files, and `Range: bytes=N-` (206 with
  `Content-Range`). No Xet headers, so clients fall back to plain HTTP.
* Errors like the hub's: an unknown repo is 404 with `X-Error-Code: RepoNotFound`, an unknown revision
  `RevisionNotFound`, an unknown file `EntryNotFound`.

Fault injection and evidence: `throttle` (bytes per second per response, changeable while running),
`drop_after[filename] = n` (the next GET of that file closes the connection after n bytes; one-shot),
`faults[filename] = [...]` (a script for the next GETs of that file, one entry each: `("drop", n)`,
`("status", 503)` or None for a normal answer), and `requests` / `bytes_served()` / `ranges()` record
what clients asked for and got.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = {".safetensors", ".bin", ".gguf", ".pt", ".onnx", ".npz"}
CHUNK = 64 * 1024


@dataclass
class HubFile:
    path: Path
    size: int
    git_oid: str
    sha256: str
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class HubRepo:
    repo_id: str
    commit: str
    files: dict[str, HubFile]


def _describe_folder(repo_id: str, folder: Path) -> HubRepo:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        name = path.relative_to(folder).as_posix()
        files[name] = HubFile(
            path=path,
            size=len(data),
            git_oid=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
            sha256=hashlib.sha256(data).hexdigest(),
            lfs=path.suffix in LFS_SUFFIXES,
        )
    listing = repo_id + "".join(f"{n}:{f.git_oid}" for n, f in files.items())
    return HubRepo(repo_id, hashlib.sha1(listing.encode()).hexdigest(), files)


class HubServer:
    def __init__(self, repos: dict[str, Path] | None = None, *, throttle: float | None = None):
        self.repos: dict[str, HubRepo] = {}
        for repo_id, folder in (repos or {}).items():
            self.add_repo(repo_id, folder)
        self.throttle = throttle
        self.drop_after: dict[str, int] = {}
        self.faults: dict[str, list[tuple[str, int] | None]] = {}
        self.requests: list[dict] = []
        self._served: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, folder: Path) -> HubRepo:
        self.repos[repo_id] = repo = _describe_folder(repo_id, Path(folder))
        return repo

    # --- lifecycle ---

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="hub").start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def reset(self) -> None:
        with self._lock:
            self.throttle = None
            self.drop_after.clear()
            self.faults.clear()
            self.requests.clear()
            self._served.clear()

    # --- evidence ---

    def record(self, **entry) -> None:
        with self._lock:
            self.requests.append(entry)

    def count(self, filename: str, n: int) -> None:
        with self._lock:
            self._served[filename] += n

    def bytes_served(self, filename: str) -> int:
        with self._lock:
            return self._served[filename]

    def ranges(self, filename: str) -> list[str | None]:
        """The Range header of every GET of `filename` (None: no Range)."""
        with self._lock:
            return [
                r["range"]
                for r in self.requests
                if r["method"] == "GET" and r.get("file") == filename
            ]

    def take_fault(self, filename: str) -> tuple[str, int] | None:
        with self._lock:
            script = self.faults.get(filename)
            if script:
                return script.pop(0)
            if filename in self.drop_after:
                return ("drop", self.drop_after.pop(filename))
            return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, format, *args) -> None:  # quiet
        pass

    # --- routing ---

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, *, head: bool) -> None:
        hub = self.server_hub
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            hub.record(
                method=self.command,
                path=url.path,
                repo=repo_id,
                file=None,
                range=None,
                authorization=self.headers.get("Authorization"),
            )
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            if not rest:
                return self._json(self._info(repo, blobs="blobs" in query), head)
            if rest[0] == "revision" and len(rest) >= 2:
                if not self._revision_ok(repo, "/".join(rest[1:])):
                    return self._error(404, "RevisionNotFound", "Invalid rev id")
                return self._json(self._info(repo, blobs="blobs" in query), head)
            if rest[0] == "tree" and len(rest) >= 2:
                if not self._revision_ok(repo, rest[1]):
                    return self._error(404, "RevisionNotFound", "Invalid rev id")
                return self._json(self._tree(repo, "/".join(rest[2:])), head)
            return self._error(404, None, "Not found")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            hub.record(
                method=self.command,
                path=url.path,
                repo=repo_id,
                file=filename,
                range=self.headers.get("Range"),
            )
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            if not self._revision_ok(repo, revision):
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            hub_file = repo.files.get(filename)
            if hub_file is None:
                return self._error(
                    404,
                    "EntryNotFound",
                    f'{filename} does not exist on "{revision}"',
                    commit=repo.commit,
                )
            return self._send_file(repo, filename, hub_file, head)
        hub.record(method=self.command, path=url.path, repo=None, file=None, range=None)
        return self._error(404, None, "Not found")

    @staticmethod
    def _revision_ok(repo: HubRepo, revision: str) -> bool:
        return revision in ("main", repo.commit)

    # --- bodies ---

    @staticmethod
    def _info(repo: HubRepo, *, blobs: bool) -> dict:
        siblings = []
        for name, f in repo.files.items():
            entry: dict = {"rfilename": name}
            if blobs:
                entry.update(size=f.size, blobId=f.git_oid)
                if f.lfs:
                    entry["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(entry)
        return {
            "_id": repo.commit[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": repo.commit,
            "private": False,
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": siblings,
        }

    @staticmethod
    def _tree(repo: HubRepo, prefix: str) -> list[dict]:
        out = []
        for name, f in repo.files.items():
            if prefix and not name.startswith(prefix.rstrip("/") + "/"):
                continue
            entry = {"type": "file", "oid": f.git_oid, "size": f.size, "path": name}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            out.append(entry)
        return out

    def _json(self, payload, head: bool) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(
        self, status: int, code: str | None, message: str, commit: str | None = None
    ) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_file(self, repo: HubRepo, filename: str, f: HubFile, head: bool) -> None:
        hub = self.server_hub
        start, end = 0, f.size - 1
        requested = self.headers.get("Range")
        fault = None if head else hub.take_fault(filename)
        if fault and fault[0] == "status":
            return self._error(fault[1], None, "Injected failure")
        drop = fault[1] if fault else None
        if requested and not head:
            spec = requested.strip().removeprefix("bytes=")
            first, _, last = spec.partition("-")
            start = int(first) if first else 0
            end = min(int(last), f.size - 1) if last else f.size - 1
            if start >= f.size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{f.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        partial = bool(requested) and not head
        self.send_response(206 if partial else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{f.etag}"')
        self.send_header("X-Repo-Commit", repo.commit)
        if f.lfs:
            self.send_header("X-Linked-Etag", f'"{f.sha256}"')
            self.send_header("X-Linked-Size", str(f.size))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{f.size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if head:
            return

        sent = 0
        try:
            with open(f.path, "rb") as src:
                src.seek(start)
                remaining = end - start + 1
                while remaining > 0:
                    size = min(CHUNK, remaining)
                    if drop is not None:
                        size = min(size, drop - sent)
                        if size <= 0:
                            break
                    chunk = src.read(size)
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    sent += len(chunk)
                    remaining -= len(chunk)
                    hub.count(filename, len(chunk))
                    throttle = hub.throttle  # read per chunk: a test may change it mid-transfer
                    if throttle:
                        time.sleep(len(chunk) / throttle)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if drop is not None and remaining > 0:
            # The fault: the connection goes away mid-body.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
