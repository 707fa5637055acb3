"""`smallfour pull` against a Hub stand-in on loopback: fresh, resumed, corrupted, pinned, pickle-free.

The stub (tests/hub_stub.py) speaks the Hub's HTTP API to the real huggingface_hub client; the
pull runs as the real CLI in a subprocess with a private HF_HOME and SMALLFOUR_HOME.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import HF
from helpers import default_sigint
from hub_stub import SMALLFOUR, HubStub, assert_one_line_error, cli, repo_dir, sha256_of, smallfour_env

REPO = "mistralai/Tiny-Small-4"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
MiB = 1 << 20
# huggingface_hub writes downloads in 10 MiB pieces: an interrupted file keeps whole pieces only.
PIECE = 10 * MiB


@pytest.fixture
def fixture_files(checkpoint) -> dict[str, Path]:
    """The HF-layout fixture checkpoint's files, as a repo holds them."""
    return {p.name: p for p in sorted(checkpoint(HF).iterdir())}


def add_release(hub: HubStub, fixture_files: dict[str, Path], **extra) -> str:
    """The fixture as Mistral publishes it: HF layout plus Mistral-layout weights, a pickle and a README."""
    files = dict(fixture_files)
    files |= {"params.json": b'{"dim": 128}', "consolidated.safetensors": b"\0" * 4096,
              "pytorch_model.bin": b"\x80\x04pickle" * 64, "original/model.pt": b"\x80\x04pickle" * 64,
              "README.md": b"# Tiny Small 4\n", ".gitattributes": b"*.safetensors filter=lfs\n"}
    return hub.add_commit(REPO, files | extra)


def snapshot_files(env, commit: str) -> dict[str, Path]:
    snapshot = repo_dir(env, REPO) / "snapshots" / commit
    return {p.relative_to(snapshot).as_posix(): p for p in snapshot.rglob("*") if p.is_file()}


def test_fresh_pull_takes_what_conversion_needs_in_the_hub_cache(hub, env, fixture_files):
    commit = add_release(hub, fixture_files)
    result = cli(env, "pull", REPO)
    assert result.returncode == 0, result.stderr
    snapshot = repo_dir(env, REPO) / "snapshots" / commit
    assert result.stdout.strip() == str(snapshot)
    # One layout (HF), its configs and tokenizer; no Mistral-layout weights, no pickles, no README.
    files = snapshot_files(env, commit)
    assert sorted(files) == sorted(fixture_files)
    for name, source in fixture_files.items():
        assert files[name].read_bytes() == source.read_bytes(), name
    for name in ("pytorch_model.bin", "original/model.pt", "consolidated.safetensors", "params.json", "README.md"):
        assert not hub.touched(name), f"{name} was requested"
    # The hub cache layout: snapshot entries link to blobs named by the hash the Hub reported.
    for name in (SHARD1, "config.json"):
        link = snapshot / name
        assert link.is_symlink()
        remote = hub.file(REPO, name)
        assert link.resolve() == (repo_dir(env, REPO) / "blobs" / (remote.sha256 if remote.lfs else remote.git_sha1))
    assert (repo_dir(env, REPO) / "refs" / "main").read_text() == commit
    record = json.loads((Path(env["SMALLFOUR_HOME"]) / "pulls.json").read_text())[REPO]
    assert (record["commit"], record["revision"]) == (commit, "main")
    assert "skipped pickle files: original/model.pt, pytorch_model.bin" in result.stderr

    # Other tools read the same cache.
    from huggingface_hub import try_to_load_from_cache

    assert try_to_load_from_cache(REPO, "config.json", cache_dir=str(repo_dir(env, REPO).parent)) == str(
        snapshot / "config.json")

    # A second pull finds everything in place and downloads nothing.
    served = len(hub.downloads())
    again = cli(env, "pull", REPO)
    assert again.returncode == 0, again.stderr
    assert len(hub.downloads()) == served
    assert "0 B downloaded" in again.stderr


def test_dropped_connection_resumes_with_a_range_request(hub, env, fixture_files):
    commit = add_release(hub, fixture_files)
    hub.drop_once(SHARD1, after=25_000_000)
    result = cli(env, "pull", REPO)
    assert result.returncode == 0, result.stderr
    first, second = hub.downloads(SHARD1)
    size = fixture_files[SHARD1].stat().st_size
    assert first["range"] is None and first["dropped_at"] == 25_000_000
    resumed_at = 25_000_000 // PIECE * PIECE
    assert second["range"] == f"bytes={resumed_at}-"
    assert second["sent"] == size - resumed_at
    assert sha256_of(snapshot_files(env, commit)[SHARD1]) == sha256_of(fixture_files[SHARD1])


def test_interrupted_pull_resumes_from_the_partial_file(hub, env, fixture_files):
    """Ctrl-C mid-file keeps the partial blob; the next pull asks only for the rest."""
    commit = add_release(hub, fixture_files)
    remote = hub.file(REPO, SHARD2)
    partial = repo_dir(env, REPO) / "blobs" / f"{remote.sha256}.incomplete"
    hub.stall(SHARD2, after=25_000_000)
    # The stall must outlast the wait for the other files: on a loaded machine that can take longer than
    # huggingface_hub's 10 s read timeout, after which it resumes on its own and finishes before the Ctrl-C.
    patient = env | {"HF_HUB_DOWNLOAD_TIMEOUT": "600"}
    process = subprocess.Popen([*SMALLFOUR, "pull", REPO], env=patient, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        assert hub.stalled.wait(60), "the download never reached the stall"
        deadline = time.monotonic() + 30
        while not (partial.exists() and partial.stat().st_size >= 2 * PIECE):
            assert time.monotonic() < deadline, "the partial file never grew"
            time.sleep(0.05)
        blobs = repo_dir(env, REPO) / "blobs"
        others = [hub.file(REPO, name) for name in fixture_files if name != SHARD2]
        while not all((blobs / (f.sha256 if f.lfs else f.git_sha1)).exists() for f in others):
            assert time.monotonic() < deadline, "the other files never landed in the store"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        hub.release()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    kept = partial.stat().st_size
    assert kept == 2 * PIECE
    assert not (repo_dir(env, REPO) / "snapshots" / commit / SHARD2).exists()
    served_before = {name: len(hub.downloads(name)) for name in fixture_files}

    result = cli(env, "pull", REPO)
    assert result.returncode == 0, result.stderr
    resumed = hub.downloads(SHARD2)[-1]
    assert resumed["range"] == f"bytes={kept}-"
    assert resumed["sent"] == remote.size - kept
    assert sha256_of(snapshot_files(env, commit)[SHARD2]) == remote.sha256
    assert not partial.exists()
    for name in fixture_files:  # files that had finished are not fetched again
        if name != SHARD2:
            assert len(hub.downloads(name)) == served_before[name], name


def test_corrupted_download_is_detected_and_not_kept(hub, env, fixture_files, tmp_path):
    commit = add_release(hub, fixture_files)
    remote = hub.file(REPO, SHARD2)
    hub.corrupt(SHARD2)
    result = cli(env, "pull", REPO)
    line = assert_one_line_error(result, f"{SHARD2} is corrupted", "sha256", remote.sha256[:16])
    assert "deleted" in line
    blobs = repo_dir(env, REPO) / "blobs"
    assert not (blobs / remote.sha256).exists()
    assert not (blobs / f"{remote.sha256}.incomplete").exists()
    assert not (repo_dir(env, REPO) / "snapshots" / commit / SHARD2).exists()
    # Nothing half-pulled passes for a checkpoint.
    out = tmp_path / "out.gguf"
    assert_one_line_error(cli(env, "convert", REPO, "-o", out), REPO, "smallfour pull")
    assert not out.exists()

    # Once the Hub serves the right bytes, the next pull fetches only that file.
    hub.corrupt(SHARD2, on=False)
    served = {name: len(hub.downloads(name)) for name in fixture_files}
    result = cli(env, "pull", REPO)
    assert result.returncode == 0, result.stderr
    assert sha256_of(snapshot_files(env, commit)[SHARD2]) == remote.sha256
    for name in fixture_files:
        assert len(hub.downloads(name)) == served[name] + (name == SHARD2), name


def test_verify_rehashes_the_store_and_repairs_a_damaged_file(hub, env, fixture_files):
    commit = add_release(hub, fixture_files)
    assert cli(env, "pull", REPO).returncode == 0
    stored = snapshot_files(env, commit)[SHARD1]
    with open(stored.resolve(), "r+b") as file:  # same size, one byte flipped
        file.seek(1000)
        byte = file.read(1)
        file.seek(1000)
        file.write(bytes([byte[0] ^ 1]))
    assert cli(env, "pull", REPO).returncode == 0  # sizes match: a plain pull trusts the store
    assert len(hub.downloads(SHARD1)) == 1
    result = cli(env, "pull", REPO, "--verify")
    assert result.returncode == 0, result.stderr
    assert len(hub.downloads(SHARD1)) == 2
    assert sha256_of(snapshot_files(env, commit)[SHARD1]) == sha256_of(fixture_files[SHARD1])


def test_revision_is_pinned_and_recorded(hub, env):
    repo = "acme/pinned"
    old = hub.add_commit(repo, {"config.json": b'{"version": 1}', "model.safetensors": b"\1" * 2048}, refs=("v1",))
    new = hub.add_commit(repo, {"config.json": b'{"version": 2}', "model.safetensors": b"\2" * 2048})
    folder = repo_dir(env, repo)

    result = cli(env, "pull", repo, "--revision", "v1", "--json")
    assert result.returncode == 0, result.stderr
    pulled = json.loads(result.stdout)
    assert (pulled["revision"], pulled["commit"]) == ("v1", old)
    assert Path(pulled["snapshot"]) == folder / "snapshots" / old
    assert (folder / "snapshots" / old / "config.json").read_bytes() == b'{"version": 1}'
    assert (folder / "refs" / "v1").read_text() == old
    assert not (folder / "refs" / "main").exists()

    assert cli(env, "pull", repo).returncode == 0
    assert (folder / "refs" / "main").read_text() == new
    assert (folder / "snapshots" / new / "config.json").read_bytes() == b'{"version": 2}'
    records = json.loads((Path(env["SMALLFOUR_HOME"]) / "pulls.json").read_text())[repo]
    assert records["commit"] == new
    assert {c: r["revision"] for c, r in records["revisions"].items()} == {old: "v1", new: "main"}

    # A full commit hash pins exactly; the old snapshot is already there.
    served = len(hub.downloads())
    result = cli(env, "pull", f"{repo}@{old}", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["commit"] == old and len(hub.downloads()) == served
    assert_one_line_error(cli(env, "pull", repo, "--revision", "v9"), "revision v9 not found in acme/pinned")


def test_pickle_only_repo_is_refused(hub, env):
    repo = "acme/old-pickles"
    hub.add_commit(repo, {"config.json": b"{}", "pytorch_model.bin": b"\x80\x04pickle" * 64, "README.md": b"hi"})
    assert_one_line_error(cli(env, "pull", repo), "only pickle weights", "pytorch_model.bin", "refused")
    assert not any(r.get("resolve") or r.get("file") for r in hub.requests)
    assert not repo_dir(env, repo).exists()
    assert_one_line_error(cli(env, "pull", repo, "--include", "*.bin"), "only pickle files match", "refused")
    assert not hub.touched("pytorch_model.bin")


def test_include_never_reaches_a_pickle(hub, env):
    repo = "acme/both"
    commit = hub.add_commit(repo, {"config.json": b"{}", "model.safetensors": b"\0" * 4096,
                                   "pytorch_model.bin": b"\x80\x04pickle" * 64, "training_args.pt": b"\x80\x04p"})
    result = cli(env, "pull", repo, "--include", "*")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (repo_dir(env, repo) / "snapshots" / commit).iterdir()) == [
        "config.json", "model.safetensors"]
    assert not hub.touched("pytorch_model.bin") and not hub.touched("training_args.pt")


def test_gguf_repo_needs_a_choice_and_run_accepts_its_id(hub, env, converted):
    repo = "acme/Tiny-Small-4-GGUF"
    gguf = converted(HF, "q8_0")
    commit = hub.add_commit(repo, {"tiny-Q8_0.gguf": gguf, "tiny-BF16.gguf": b"GGUF" + b"\0" * 4096,
                                   "mmproj-F16.gguf": b"GGUF" + b"\0" * 512, "README.md": b"hi"})
    assert_one_line_error(cli(env, "pull", repo), "2 GGUFs", "tiny-BF16.gguf", "tiny-Q8_0.gguf", "--include")
    result = cli(env, "pull", repo, "--include", "*Q8_0*", "--include", "mmproj-*")
    assert result.returncode == 0, result.stderr
    snapshot = repo_dir(env, repo) / "snapshots" / commit
    assert sorted(p.name for p in snapshot.iterdir()) == ["mmproj-F16.gguf", "tiny-Q8_0.gguf"]
    assert not hub.touched("tiny-BF16.gguf")
    # `run` resolves the repo id (and an explicit quant) to the pulled file and loads it with llama.cpp.
    for name in (repo, f"{repo}:Q8_0"):
        result = cli(env, "run", name, "--dry-run", "-p", "hello")
        assert result.returncode == 0, result.stderr
        assert "[INST]hello[/INST]" in result.stdout
    assert_one_line_error(cli(env, "run", f"{repo}:Q2_K", "-p", "hi"), "no GGUF matching 'Q2_K'")
    assert_one_line_error(cli(env, "run", "acme/never-pulled", "-p", "hi"), "smallfour pull acme/never-pulled")


def test_convert_accepts_a_pulled_repo_id(hub, env, fixture_files, tmp_path):
    add_release(hub, fixture_files)
    assert cli(env, "pull", REPO).returncode == 0
    out = tmp_path / "tiny.gguf"
    result = cli(env, "convert", REPO, "-o", out, "--recipe", "q8_0")
    assert result.returncode == 0, result.stderr
    assert "hf layout" in result.stderr
    assert out.read_bytes()[:4] == b"GGUF"
    from quant.gguf_io import read_header

    assert read_header(out).fields["general.name"] == REPO.split("/")[1]  # the repo, not the snapshot's commit


def test_hub_errors_are_one_line(hub, env, tmp_path):
    assert_one_line_error(cli(env, "pull", "acme/nothing-here"), "repository acme/nothing-here not found")
    assert_one_line_error(cli(env, "pull", "not-a-repo-id"), "not a Hub repo id")
    offline = smallfour_env(tmp_path, hub, HF_HUB_OFFLINE="1")
    assert_one_line_error(cli(offline, "pull", REPO), "HF_HUB_OFFLINE")
    nowhere = smallfour_env(tmp_path, None, HF_ENDPOINT="http://127.0.0.1:9")  # discard port: refused
    assert_one_line_error(cli(nowhere, "pull", REPO), "cannot reach the Hub")
