"""A stand-in for the Hugging Face Hub on loopback: the part of its HTTP API huggingface_hub 2.4 downloads with.

Two servers share one state, as the real Hub and its CDN do:

- the **Hub** (`url`): `GET /api/models/{repo}[/revision/{rev}]` (model info, with `siblings`
  carrying `size`, `blobId` and `lfs.{sha256,size,pointerSize}` when `?blobs=true`),
  `GET /api/models/{repo}/tree/{rev}` (file listing, used by `snapshot_download`), and
  `HEAD`/`GET /{repo}/resolve/{rev}/{path}`. Small files are served there with
  `ETag: "<git blob sha1>"`; LFS files answer `302` to the CDN with `X-Linked-Etag: "<sha256>"`
  and `X-Linked-Size`, as huggingface.co does. Every answer carries `X-Repo-Commit`; errors carry
  `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound).
- the **CDN** (another port, hence another origin): `GET /{sha256}` with HTTP Range support
  (`206` + `Content-Range`).

Fault injection for the tests: `drop_once(path, after)` closes the connection after `after`
bytes of the next download of `path`; `stall(path, after)` sends `after` bytes and then waits
(until `release()`), so a test can kill the client mid-file; `corrupt(path)` serves altered
bytes under the reported hash. Every request is logged in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
LFS_MIN_SIZE = 1 << 20
CHUNK = 1 << 20


@dataclass
class StubFile:
    path: str
    source: Path | bytes
    size: int
    sha256: str
    git_sha1: str
    lfs: bool

    def read(self) -> bytes:
        return self.source if isinstance(self.source, bytes) else Path(self.source).read_bytes()


@dataclass
class StubRepo:
    refs: dict[str, str] = field(default_factory=dict)  # branch / tag → commit
    commits: dict[str, dict[str, StubFile]] = field(default_factory=dict)


def _describe(path: str, source: Path | bytes) -> StubFile:
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    git_sha1 = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
    lfs = path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
    return StubFile(path, source, len(data), sha256, git_sha1, lfs)


class HubStub:
    def __init__(self) -> None:
        self.repos: dict[str, StubRepo] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.drops: dict[str, int] = {}
        self.stalls: dict[str, int] = {}
        self.corrupted: set[str] = set()
        self.stalled = threading.Event()  # set when a stalled download is waiting
        self.released = threading.Event()
        self._commit_counter = 0
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=False))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=True))
        for server in (self.hub, self.cdn):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def close(self) -> None:
        self.released.set()
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    # --- content ---------------------------------------------------------------------------------

    def add_commit(self, repo_id: str, files: dict[str, Path | bytes], refs: tuple[str, ...] = ("main",)) -> str:
        """A new commit of `repo_id` holding `files` (path in repo → local file or bytes); `refs` point to it."""
        repo = self.repos.setdefault(repo_id, StubRepo())
        with self.lock:
            self._commit_counter += 1
            commit = hashlib.sha1(f"{repo_id}/{self._commit_counter}".encode()).hexdigest()
        repo.commits[commit] = {path: _describe(path, source) for path, source in files.items()}
        for ref in refs:
            repo.refs[ref] = commit
        return commit

    def file(self, repo_id: str, path: str, revision: str = "main") -> StubFile:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(revision, revision)][path]

    # --- faults ----------------------------------------------------------------------------------

    def drop_once(self, path: str, after: int) -> None:
        self.drops[path] = after

    def stall(self, path: str, after: int) -> None:
        self.stalls[path] = after

    def release(self) -> None:
        self.released.set()

    def corrupt(self, path: str, on: bool = True) -> None:
        (self.corrupted.add if on else self.corrupted.discard)(path)

    # --- the log ---------------------------------------------------------------------------------

    def downloads(self, path: str | None = None) -> list[dict]:
        """Body-carrying GETs of file content (Hub small files and CDN blobs), optionally of one path."""
        return [r for r in self.requests
                if r["method"] == "GET" and r.get("file") and (path is None or r["file"] == path)]

    def touched(self, path: str) -> bool:
        return any(path in (r.get("file"), r.get("resolve")) for r in self.requests)


def _handler(stub: HubStub, cdn: bool):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            return

        def do_HEAD(self) -> None:  # noqa: N802
            self._dispatch(head=True)

        def do_GET(self) -> None:  # noqa: N802
            self._dispatch(head=False)

        # --- plumbing ---

        def _log(self, **extra) -> dict:
            entry = {"method": self.command, "url": self.path, "range": self.headers.get("Range"), "cdn": cdn,
                     "sent": 0, **extra}
            with stub.lock:
                stub.requests.append(entry)
            return entry

        def _send(self, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, head: bool, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, headers, json.dumps({"error": message}).encode(), head)

        def _dispatch(self, head: bool) -> None:
            parsed = urlparse(self.path)
            path = unquote(parsed.path)
            try:
                if cdn:
                    self._cdn(path.strip("/"), head)
                elif path.startswith("/api/models/"):
                    self._api(parsed.path[len("/api/models/"):], parse_qs(parsed.query), head)
                elif "/resolve/" in path:
                    self._resolve(parsed.path, head)
                else:
                    self._log()
                    self._error(404, "NotFound", f"no route {path}", head)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _commit(self, repo_id: str, revision: str, head: bool) -> tuple[str, dict[str, StubFile]] | None:
            repo = stub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found", head)
                return None
            commit = repo.refs.get(revision, revision)
            if commit not in repo.commits:
                self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, head)
                return None
            return commit, repo.commits[commit]

        # --- the API ---

        def _api(self, rest: str, query: dict, head: bool) -> None:
            self._log()
            match = re.match(r"^([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?$", rest)
            if not match:
                return self._error(404, "NotFound", "bad api path", head)
            repo_id, kind, revision = unquote(match[1]), match[2], unquote(match[3] or "main")
            found = self._commit(repo_id, revision, head)
            if found is None:
                return
            commit, files = found
            if kind == "tree":
                listing = [{"type": "file", "oid": f.git_sha1, "size": f.size if not f.lfs else f.size, "path": f.path,
                            **({"lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}} if f.lfs else {})}
                           for f in files.values()]
                return self._send(200, {"Content-Type": "application/json"}, json.dumps(listing).encode(), head)
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for f in files.values():
                sibling = {"rfilename": f.path}
                if blobs:
                    sibling |= {"size": f.size, "blobId": f.git_sha1}
                    if f.lfs:
                        sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
                siblings.append(sibling)
            info = {"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                    "gated": False, "disabled": False, "tags": [], "siblings": siblings}
            self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), head)

        def _resolve(self, raw_path: str, head: bool) -> None:
            match = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", raw_path)
            if not match:
                self._log()
                return self._error(404, "NotFound", "bad resolve path", head)
            repo_id, revision, file_path = unquote(match[1]), unquote(match[2]), unquote(match[3])
            self._log(resolve=file_path)
            found = self._commit(repo_id, revision, head)
            if found is None:
                return
            commit, files = found
            entry = files.get(file_path)
            if entry is None:
                return self._error(404, "EntryNotFound", f"{file_path} does not exist", head, commit)
            headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
            if entry.lfs:
                headers |= {"Location": f"{stub.cdn_url}/{entry.sha256}", "X-Linked-Etag": f'"{entry.sha256}"',
                            "X-Linked-Size": str(entry.size), "ETag": f'"{entry.git_sha1}"'}
                return self._send(302, headers, b"", head)
            headers["ETag"] = f'"{entry.git_sha1}"'
            self._body(entry, headers, head)

        # --- content ---

        def _cdn(self, sha256: str, head: bool) -> None:
            entry = next((f for repo in stub.repos.values() for files in repo.commits.values() for f in files.values()
                          if f.sha256 == sha256), None)
            if entry is None:
                self._log()
                return self._send(404, {}, b"not found", head)
            self._body(entry, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}, head)

        def _body(self, entry: StubFile, headers: dict[str, str], head: bool) -> None:
            log = self._log(file=entry.path)
            data = entry.read()
            if entry.path in stub.corrupted:
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
            start = 0
            range_header = self.headers.get("Range")
            if range_header:
                match = re.match(r"bytes=(\d+)-(\d*)$", range_header.strip())
                if match:
                    start = int(match[1])
            if start >= len(data) and len(data):
                return self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"", head)
            status = 206 if start else 200
            body = data[start:]
            headers = dict(headers, **{"Content-Length": str(len(body)), "Content-Type": "application/octet-stream"})
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if head:
                return
            limit = None
            stall = False
            with stub.lock:
                if entry.path in stub.drops:
                    limit = stub.drops.pop(entry.path)
                elif entry.path in stub.stalls:
                    limit, stall = stub.stalls.pop(entry.path), True
            sent = 0
            while sent < len(body):
                end = len(body) if limit is None else min(len(body), limit)
                if sent >= end:
                    break
                piece = body[sent: min(end, sent + CHUNK)]
                self.wfile.write(piece)
                sent += len(piece)
                log["sent"] = sent
            if limit is not None and sent < len(body):
                self.wfile.flush()
                if stall:
                    stub.stalled.set()
                    stub.released.wait(timeout=120)
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                log["dropped_at"] = start + sent

    return Handler


# --- running the CLI against the stub ------------------------------------------------------------------------

SMALLFOUR = [sys.executable, "-m", "smallfour"]
HF_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                "HF_ENDPOINT", "XDG_CACHE_HOME", "HF_XET_CACHE")


def smallfour_env(root: Path, stub: HubStub | None = None, **extra: str) -> dict[str, str]:
    """An environment whose hub cache (`HF_HOME`), smallfour home and Hub (`HF_ENDPOINT`) are private to a test."""
    env = {k: v for k, v in os.environ.items() if k not in HF_VARIABLES}
    env |= {"HF_HOME": str(root / "hf"), "SMALLFOUR_HOME": str(root / "smallfour"), "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "COLUMNS": "200", "NO_COLOR": "1"}
    if stub is not None:
        env["HF_ENDPOINT"] = stub.url
    return env | extra


def cli(env: dict[str, str], *args, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SMALLFOUR, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def hub_cache(env: dict[str, str]) -> Path:
    return Path(env["HF_HOME"]) / "hub"


def repo_dir(env: dict[str, str], repo_id: str) -> Path:
    return hub_cache(env) / ("models--" + repo_id.replace("/", "--"))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
