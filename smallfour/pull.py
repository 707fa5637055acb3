"""`smallfour pull`: a checkpoint or a ready GGUF from the Hugging Face Hub into the shared hub cache.

1. One API call (`model_info` with file metadata) pins the revision to a commit and
   lists the files with the sizes and hashes the Hub reports for them.
2. Only what a conversion needs is chosen: the safetensors of one layout (Hugging
   Face or Mistral, never both), configs, tokenizer files, chat template. Pickle
   files (`*.bin`, `*.pt`, …) are never downloaded, and a repo whose only weights
   are pickles is refused: loading a pickle can run arbitrary code.
3. Each file downloads to `blobs/<hash>.incomplete` in the hub cache. When an earlier
   pull was interrupted, the download resumes from the bytes already there (an HTTP
   Range request) and huggingface_hub itself resumes a connection dropped mid-file.
4. A finished file is hashed — SHA-256 for LFS files, the git blob hash for small
   ones — and must match what the Hub reported, or it is deleted and the pull fails.
   Only then does it become `blobs/<hash>`, and huggingface_hub links it into
   `snapshots/<commit>/`: the layout every Hub-aware tool reads.
5. The revision asked for is written to `refs/` and recorded with its commit in
   `$SMALLFOUR_HOME/pulls.json`.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from smallfour import hardware, store
from smallfour.errors import SmallfourError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Small files a conversion reads beside the weights: configs, tokenizers, chat templates, system prompts.
SMALL_SUFFIXES = (".json", ".jinja", ".txt", ".model")
HASH_CHUNK = 8 * 1024 * 1024
# What a blob may be named: a git object id (SHA-1) or an LFS SHA-256, lower-case hex. Anything else from
# the server (an ETag such as `../../x`) would become a path outside the hub cache.
BLOB_NAME = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


class PullError(SmallfourError):
    """A pull that cannot go on, explained in one line."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    blob_id: str | None  # git object id
    sha256: str | None  # LFS files only

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def etag(self) -> str:
        """The blob name in the hub cache: the LFS SHA-256, else the git blob id (what the Hub's ETag says)."""
        return self.sha256 or self.blob_id or ""


def check_remote_files(repo_id: str, files: list[RemoteFile]) -> None:
    """Refuse a file list whose names leave the repo or whose hashes are not hashes, before anything is written."""
    for remote in files:
        parts = remote.path.split("/")
        if (not remote.path or remote.path.startswith("/") or "\\" in remote.path or "\0" in remote.path
                or any(part in ("", ".", "..") for part in parts)):
            raise PullError(f"the Hub listed a file name {remote.path!r} in {repo_id} that is not a path inside the "
                            "repo; refusing to download")
        if remote.etag and not BLOB_NAME.match(remote.etag):
            raise PullError(f"the Hub listed {remote.etag!r} as the hash of {remote.path}, which is not a SHA-1 or "
                            "SHA-256; refusing to download")


@dataclass
class Selection:
    files: list[RemoteFile]
    kind: str  # "checkpoint" or "gguf"
    layout: str | None = None  # "hf" / "native" for checkpoints
    skipped_pickles: list[str] = field(default_factory=list)


@dataclass
class PullResult:
    repo_id: str
    revision: str
    commit: str
    snapshot: Path
    kind: str
    layout: str | None
    files: list[str]
    total_bytes: int
    downloaded_bytes: int
    skipped_pickles: list[str]
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "snapshot": str(self.snapshot), "kind": self.kind, "layout": self.layout, "files": self.files,
                "total_bytes": self.total_bytes, "downloaded_bytes": self.downloaded_bytes,
                "skipped_pickles": self.skipped_pickles, "warnings": self.warnings}


def is_pickle(path: str) -> bool:
    return path.lower().endswith(PICKLE_SUFFIXES)


# --- choosing files ------------------------------------------------------------------------------------


def select_files(repo_id: str, files: list[RemoteFile], include: list[str] | None = None) -> Selection:
    """What to download: the files a conversion needs (or a GGUF), never a pickle."""
    pickles = sorted(f.path for f in files if is_pickle(f.path))
    candidates = [f for f in files if not is_pickle(f.path)]
    if include:
        chosen = [f for f in candidates if any(fnmatch.fnmatch(f.path, pattern) for pattern in include)]
        if not chosen:
            if any(fnmatch.fnmatch(p, pattern) for p in pickles for pattern in include):
                raise PullError(f"only pickle files match --include {' '.join(include)} in {repo_id}: refused "
                                "(loading a pickle can run arbitrary code); use a safetensors or GGUF release")
            listing = ", ".join(f.path for f in candidates[:8]) + (" …" if len(candidates) > 8 else "")
            raise PullError(f"no file of {repo_id} matches --include {' '.join(include)} (it has: {listing})")
        has_weights = any(f.path.endswith(".safetensors") for f in chosen)
        kind = "gguf" if not has_weights and any(f.path.endswith(".gguf") for f in chosen) else "checkpoint"
        return Selection(chosen, kind, _layout_of(chosen) if kind == "checkpoint" else None, pickles)

    root = {f.path: f for f in candidates if "/" not in f.path}
    safetensors = [f for f in candidates if f.path.endswith(".safetensors")]
    ggufs = [f for f in candidates if f.path.endswith(".gguf")]
    if safetensors:
        root_weights = [f for f in safetensors if "/" not in f.path]
        hf_weights = [f for f in root_weights if not f.path.startswith("consolidated")]
        native_weights = [f for f in root_weights if f.path.startswith("consolidated")]
        if "config.json" in root and hf_weights:
            layout, weights, other = "hf", hf_weights, {"params.json", store.INDEX_FILES["native"]}
        elif "params.json" in root and native_weights:
            layout, weights, other = "native", native_weights, {"config.json", store.INDEX_FILES["hf"]}
        else:
            layout, weights, other = None, root_weights or safetensors, set()
        small = [f for name, f in root.items() if name.endswith(SMALL_SUFFIXES) and name not in other]
        return Selection(sorted(weights + small, key=lambda f: f.path), "checkpoint", layout, pickles)
    if ggufs:
        models = [f for f in ggufs if not store.is_mmproj(f.path)]
        groups: dict[str, list[RemoteFile]] = {}
        for f in models:
            groups.setdefault(store.SPLIT_PART.sub(".gguf", f.path), []).append(f)
        if len(groups) > 1:
            names = ", ".join(sorted(groups)[:6]) + (" …" if len(groups) > 6 else "")
            example = store._variant_hint(sorted(groups)[0])
            raise PullError(f"{repo_id} has {len(groups)} GGUFs ({names}): choose one with --include, "
                            f"e.g. --include '*{example}*'")
        projectors = [f for f in ggufs if store.is_mmproj(f.path)]
        return Selection(sorted(models + projectors, key=lambda f: f.path), "gguf", None, pickles)
    if pickles:
        raise PullError(f"{repo_id} has only pickle weights ({', '.join(pickles[:3])}): refused, loading a pickle can "
                        "run arbitrary code; use a safetensors or GGUF release")
    raise PullError(f"{repo_id} has no safetensors or GGUF weights")


def _layout_of(files: list[RemoteFile]) -> str | None:
    names = {f.path for f in files}
    if "config.json" in names:
        return "hf"
    if "params.json" in names:
        return "native"
    return None


# --- hashing ---------------------------------------------------------------------------------------------


def file_digest(path: Path, remote: RemoteFile, on_bytes=None) -> str:
    """The hash the Hub reports for `remote`, computed over the local file at `path`."""
    if remote.lfs:
        digest = hashlib.sha256()
    else:
        digest = hashlib.sha1()
        digest.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return digest.hexdigest()


# --- the download ------------------------------------------------------------------------------------------


class _Cancelled(Exception):
    pass


class _Bars:
    """Rich progress: one bar for the whole pull, one per file while it downloads or verifies."""

    def __init__(self, progress, total: int, done: int, label: str):
        self.progress = progress
        self.lock = threading.Lock()
        self.overall = (progress.add_task(_short(label), total=total, completed=done, unit="bytes")
                        if progress else None)

    def file_task(self, name: str, total: int, completed: int = 0):
        if not self.progress:
            return None
        with self.lock:
            return self.progress.add_task(_short(name), total=total, completed=completed, unit="bytes")

    def advance(self, task, n: int, overall: bool = True) -> None:
        if not self.progress:
            return
        if task is not None:
            self.progress.update(task, advance=n)
        if overall:
            self.progress.update(self.overall, advance=n)

    def reset(self, task, description: str, total: int) -> None:
        if self.progress:
            self.progress.update(task, description=_short(description), completed=0, total=total)

    def done(self, task) -> None:
        if self.progress and task is not None:
            self.progress.remove_task(task)


def _short(name: str, width: int = 34) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


class Puller:
    def __init__(self, repo_id: str, commit: str, bars: _Bars, stop: threading.Event):
        self.repo_id, self.commit, self.bars, self.stop = repo_id, commit, bars, stop
        self.folder = store.repo_folder(repo_id)
        self.downloaded = 0
        self.lock = threading.Lock()

    def blob(self, remote: RemoteFile) -> Path:
        return self.folder / "blobs" / remote.etag

    def partial(self, remote: RemoteFile) -> Path:
        return self.folder / "blobs" / f"{remote.etag}.incomplete"

    def pointer(self, remote: RemoteFile) -> Path:
        return self.folder / "snapshots" / self.commit / remote.path

    def fetch(self, remote: RemoteFile) -> None:
        """Download `remote` into its blob, resuming a partial file, and verify it."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import WeakFileLock, build_hf_headers

        url = hf_hub_url(self.repo_id, remote.path, revision=self.commit)
        meta = get_hf_file_metadata(url)
        if meta.size is not None and meta.size != remote.size:
            raise PullError(f"{remote.path}: the Hub's download is {meta.size} bytes but its file list says "
                            f"{remote.size}; try again later")
        # The blob is named as huggingface_hub names it (the download's ETag), so its own calls find it.
        name = meta.etag or remote.etag
        if not BLOB_NAME.match(name):
            raise PullError(f"{remote.path}: the Hub's ETag {name!r} is not a SHA-1 or SHA-256; refusing to download")
        blob, partial = self.folder / "blobs" / name, self.folder / "blobs" / f"{name}.incomplete"
        blob.parent.mkdir(parents=True, exist_ok=True)
        lock_path = store.hub_cache() / ".locks" / self.folder.name / f"{name}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(str(lock_path)):
            if blob.exists():
                return  # another process finished it meanwhile
            headers = build_hf_headers()
            location = meta.location or url
            if urlparse(location).netloc != urlparse(url).netloc:
                headers.pop("authorization", None)  # a signed CDN address: the token stays with the Hub
            resume = partial.stat().st_size if partial.exists() else 0
            if resume > remote.size:
                partial.unlink()
                resume = 0
            task = self.bars.file_task(remote.path, remote.size, resume)

            def bar(**kwargs):
                return _FileBar(self, task)

            try:
                with open(partial, "r+b" if resume else "wb") as file:
                    file.seek(resume)
                    http_get(location, file, resume_size=resume, headers=headers, expected_size=remote.size,
                             displayed_filename=remote.path, tqdm_class=bar)
                self.bars.reset(task, f"verify {remote.path}", remote.size)
                digest = file_digest(partial, remote, lambda n: self.bars.advance(task, n, overall=False))
            finally:
                self.bars.done(task)
            if digest != remote.etag:
                partial.unlink(missing_ok=True)
                kind = "sha256" if remote.lfs else "git blob hash"
                raise PullError(f"{remote.path} is corrupted: its {kind} is {digest[:16]}…, the Hub reports "
                                f"{remote.etag[:16]}…; the bad download was deleted, run pull again")
            os.replace(partial, blob)

    def link(self, remote: RemoteFile) -> None:
        """Make `snapshots/<commit>/<path>` point at the verified blob, as huggingface_hub lays it out."""
        from huggingface_hub import hf_hub_download

        hf_hub_download(self.repo_id, remote.path, revision=self.commit, cache_dir=str(store.hub_cache()))


class _FileBar:
    """What huggingface_hub's `http_get` takes as its tqdm: forwards bytes to the rich bars, honours Ctrl-C."""

    def __init__(self, puller: Puller, task):
        self.puller, self.task = puller, task

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int | float | None = 1) -> None:
        if self.puller.stop.is_set():
            raise _Cancelled()
        n = int(n or 0)
        with self.puller.lock:
            self.puller.downloaded += n
        self.puller.bars.advance(self.task, n)

    def close(self) -> None:
        return None


def _describe(exc: BaseException, remote: RemoteFile) -> str:
    """One line for a failed file download."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, SmallfourError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return (f"no space left on device while downloading {remote.path}; the partial file is kept, "
                "free space and pull again")
    if isinstance(exc, (httpx2.TransportError, httpx2.TimeoutException)):
        return (f"connection lost while downloading {remote.path} ({type(exc).__name__}: {exc}); "
                "run pull again to resume")
    if isinstance(exc, HfHubHTTPError):
        return f"the Hub refused {remote.path}: {str(exc).splitlines()[0]}"
    if isinstance(exc, OSError):
        return f"download of {remote.path} failed: {str(exc).splitlines()[0]}; run pull again to resume"
    return f"download of {remote.path} failed: {type(exc).__name__}: {exc}"


def _run_parallel(puller: Puller, todo: list[RemoteFile], workers: int) -> list[tuple[RemoteFile, BaseException]]:
    """Fetch `todo` on daemon threads, so Ctrl-C stops the pull at once (partial files stay for a resume)."""
    jobs: queue.Queue = queue.Queue()
    for remote in todo:
        jobs.put(remote)
    results: queue.Queue = queue.Queue()

    def work() -> None:
        while not puller.stop.is_set():
            try:
                remote = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                puller.fetch(remote)
                results.put((remote, None))
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                results.put((remote, exc))

    count = max(1, min(workers, len(todo)))
    threads = [threading.Thread(target=work, daemon=True, name=f"pull-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    failures = []
    finished = 0
    try:
        while finished < len(todo):
            try:
                remote, exc = results.get(timeout=0.2)
            except queue.Empty:
                if not any(t.is_alive() for t in threads) and results.empty():
                    break
                continue
            finished += 1
            if exc is not None and not isinstance(exc, _Cancelled):
                failures.append((remote, exc))
    except BaseException:
        puller.stop.set()
        raise
    return failures


def _hub_error(exc: Exception, repo_id: str, revision: str) -> PullError:
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    if isinstance(exc, OfflineModeIsEnabled):
        return PullError("HF_HUB_OFFLINE is set: pull needs the Hub; unset it to download")
    if isinstance(exc, GatedRepoError):
        return PullError(f"{repo_id} is gated: accept its conditions on its Hub page, then log in "
                         "(`hf auth login`, or set HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return PullError(f"revision {revision} not found in {repo_id}")
    if isinstance(exc, RepositoryNotFoundError):
        return PullError(f"repository {repo_id} not found on the Hub ({constants.ENDPOINT}); if it is private or "
                         "gated, log in first (`hf auth login`, or set HF_TOKEN)")
    if isinstance(exc, HfHubHTTPError):
        return PullError(f"the Hub refused {repo_id}@{revision}: {str(exc).splitlines()[0]}")
    if isinstance(exc, (httpx2.TransportError, httpx2.TimeoutException)):
        return PullError(f"cannot reach the Hub at {constants.ENDPOINT}: {exc}")
    return PullError(f"cannot list {repo_id}@{revision}: {type(exc).__name__}: {exc}")


def _partial_size(puller: Puller, remote: RemoteFile) -> int:
    partial = puller.partial(remote)
    return min(partial.stat().st_size, remote.size) if partial.exists() else 0


def _intact(puller: Puller, path: Path, remote: RemoteFile, verify: bool) -> bool:
    """Whether the store's copy of `remote` at `path` is good: right size, and with `verify` the right hash."""
    if path.stat().st_size != remote.size:
        return False
    if not verify:
        return True
    task = puller.bars.file_task(f"verify {remote.path}", remote.size)
    try:
        return file_digest(path, remote, lambda n: puller.bars.advance(task, n, overall=False)) == remote.etag
    finally:
        puller.bars.done(task)


def _plan(puller: Puller, files: list[RemoteFile], verify: bool) -> tuple[list[RemoteFile], list[RemoteFile]]:
    """(files to download, files to link into the snapshot); damaged copies in the store are removed."""
    todo, to_link = [], []
    for remote in files:
        pointer, blob = puller.pointer(remote), puller.blob(remote)
        if pointer.exists():
            if _intact(puller, pointer, remote, verify):
                puller.bars.advance(None, remote.size)
                continue
            pointer.unlink()  # damaged: fetch it again
            blob.unlink(missing_ok=True)
        elif pointer.is_symlink():
            pointer.unlink()  # dangling link
        to_link.append(remote)
        if blob.exists():
            if _intact(puller, blob, remote, verify):
                puller.bars.advance(None, remote.size)
                continue
            blob.unlink()
        puller.bars.advance(None, _partial_size(puller, remote))
        todo.append(remote)
    return todo, to_link


def pull(repo_id: str, revision: str | None = None, include: list[str] | None = None, *, workers: int = 4,
         verify: bool = False, progress=None) -> PullResult:
    """Download `repo_id` at `revision` into the hub cache; see the module docstring for the steps."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    ref = store.parse_repo_ref(repo_id)
    if ref is None or ref.variant:
        raise PullError(f"{repo_id!r} is not a Hub repo id (OWNER/NAME)")
    if ref.revision:
        if revision and revision != ref.revision:
            raise PullError(f"two revisions given: {repo_id} and --revision {revision}")
        repo_id, revision = ref.repo_id, ref.revision
    revision = revision or "main"
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except (HfHubHTTPError, httpx2.TransportError, httpx2.TimeoutException, OSError, ValueError) as exc:
        raise _hub_error(exc, repo_id, revision) from None
    commit = info.sha
    if not commit or not store.COMMIT.match(commit):
        raise PullError(f"the Hub gave no commit for {repo_id}@{revision}")
    remote_files = [RemoteFile(s.rfilename, s.size if s.size is not None else (s.lfs.size if s.lfs else 0),
                               s.blob_id, s.lfs.sha256 if s.lfs else None) for s in info.siblings or []]
    check_remote_files(repo_id, remote_files)
    missing_meta = [f.path for f in remote_files if not f.etag]
    selection = select_files(repo_id, remote_files, include)
    if any(f.path in missing_meta for f in selection.files):
        raise PullError(f"the Hub listed no hashes for {repo_id}@{revision}; cannot verify the download")

    total = sum(f.size for f in selection.files)
    puller = Puller(repo_id, commit, _Bars(progress, total, 0, repo_id), threading.Event())
    todo, to_link = _plan(puller, selection.files, verify)
    needed = sum(f.size - _partial_size(puller, f) for f in todo)
    free = hardware.disk_free(puller.folder)
    if needed > free:
        raise PullError(f"{repo_id}@{revision} needs {store.human_bytes(needed)} more, {store.human_bytes(free)} free "
                        f"in {store.hub_cache()}: free space or set HF_HUB_CACHE to a bigger disk")
    failures = _run_parallel(puller, todo, workers) if todo else []
    if failures:
        remote, exc = failures[0]
        more = f" (and {len(failures) - 1} more files failed)" if len(failures) > 1 else ""
        raise PullError(_describe(exc, remote) + more)
    for remote in to_link:
        try:
            puller.link(remote)
        except (HfHubHTTPError, httpx2.TransportError, httpx2.TimeoutException, OSError) as exc:
            raise PullError(f"cannot link {remote.path} into the hub cache: {str(exc).splitlines()[0]}") from None

    if revision != commit:
        ref_path = puller.folder / "refs" / revision
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = ref_path.with_name(f".{ref_path.name}.{os.getpid()}.tmp")
        temporary.write_text(commit)
        os.replace(temporary, ref_path)
    snapshot = puller.folder / "snapshots" / commit
    warnings = []
    if selection.kind == "checkpoint":
        missing, listed = store.missing_shards(snapshot, selection.layout)
        if missing:
            message = (f"{repo_id}@{revision} is missing {len(missing)} of {listed} shards listed in its index "
                       f"({', '.join(missing[:3])})")
            if not include:
                raise PullError(message + ": the repo itself is incomplete")
            warnings.append(message + " (left out by --include)")
    files = [f.path for f in selection.files]
    store.record_pull(repo_id, revision, commit, files, selection.kind, selection.layout, total)
    return PullResult(repo_id, revision, commit, snapshot, selection.kind, selection.layout, files, total,
                      puller.downloaded, selection.skipped_pickles, warnings)

