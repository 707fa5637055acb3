"""Bad input to `smallfour convert`: one clear line, exit code 1, no traceback, no output file."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import HF
from helpers import SMALLFOUR, assert_one_line_error, run_cli


@pytest.fixture
def damaged(checkpoint, tmp_path) -> Path:
    """A private copy of the HF fixture to break."""
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint(HF), copy)
    return copy


def header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return length, json.loads(f.read(length))


def convert(source: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("convert", source, "-o", output, "--recipe", "f32", *extra)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_missing_shard(damaged, tmp_path):
    (damaged / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "out.gguf"
    assert_one_line_error(convert(damaged, out), "missing 1 of 2 shards", "model-00002-of-00002.safetensors")
    assert leftovers(tmp_path) == ["ckpt"]


def test_truncated_shard(damaged, tmp_path):
    shard = damaged / "model-00001-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    assert_one_line_error(convert(damaged, tmp_path / "out.gguf"), "corrupt safetensors file", shard.name)
    assert leftovers(tmp_path) == ["ckpt"]


def test_corrupt_header(damaged, tmp_path):
    shard = damaged / "model-00002-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"{garbage")
    assert_one_line_error(convert(damaged, tmp_path / "out.gguf"), "corrupt safetensors file", "not valid JSON")
    assert leftovers(tmp_path) == ["ckpt"]


def test_unsupported_architecture(damaged, tmp_path):
    config = json.loads((damaged / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    config["text_config"]["model_type"] = "llama"
    (damaged / "config.json").write_text(json.dumps(config))
    assert_one_line_error(convert(damaged, tmp_path / "out.gguf"), "unsupported architecture LlamaForCausalLM")
    assert leftovers(tmp_path) == ["ckpt"]


@pytest.mark.parametrize(("key", "value"), [("n_routed_experts", 8), ("kv_lora_rank", 64), ("num_hidden_layers", 3)])
def test_config_does_not_match_tensors(damaged, tmp_path, key, value):
    config = json.loads((damaged / "config.json").read_text())
    config["text_config"][key] = value
    (damaged / "config.json").write_text(json.dumps(config))
    result = convert(damaged, tmp_path / "out.gguf")
    expected = "has no tensor" if key == "num_hidden_layers" else "config does not match tensors"
    assert_one_line_error(result, expected)
    assert leftovers(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("bits", [0x7FC0, 0x7F80], ids=["nan", "inf"])
def test_non_finite_weights(damaged, tmp_path, bits):
    shard = damaged / "model-00002-of-00002.safetensors"
    length, entries = header(shard)
    name = next(n for n, e in entries.items() if n != "__metadata__" and e["dtype"] == "BF16" and "norm" in n)
    with open(shard, "r+b") as f:
        f.seek(8 + length + entries[name]["data_offsets"][0] + 2)
        f.write(struct.pack("<H", bits))
    assert_one_line_error(convert(damaged, tmp_path / "out.gguf"), name, "NaN or Inf")
    assert leftovers(tmp_path) == ["ckpt"]


def test_existing_output_needs_force(checkpoint, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    assert_one_line_error(convert(checkpoint(HF), out), "already exists", "--force")
    assert out.read_bytes() == b"precious"
    assert leftovers(tmp_path) == ["out.gguf"]


def test_not_a_checkpoint(tmp_path):
    assert_one_line_error(convert(tmp_path, tmp_path / "out.gguf"), "neither config.json")
    assert_one_line_error(convert(tmp_path / "nowhere", tmp_path / "out.gguf"), "not a checkpoint directory")
    assert leftovers(tmp_path) == []


def test_disk_full(checkpoint, tmp_path):
    """A real full disk: a 16 MB tmpfs in a private mount namespace (the f32 GGUF needs ~140 MB)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    script = (
        f"mount -t tmpfs -o size=16m tmpfs {mount_point} && "
        f"{' '.join(SMALLFOUR)} convert {checkpoint(HF)} -o {mount_point}/out.gguf --recipe f32; "
        f"echo exit=$?; ls -A {mount_point}"
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert "exit=1" in result.stdout, result.stdout + result.stderr
    assert result.stdout.strip().endswith("exit=1"), f"files left on the full disk: {result.stdout}"
    assert "no space left on device" in result.stderr and "Traceback" not in result.stderr


# --- outputs: one transaction, never each other, never an input, no leftovers ---------------------


@pytest.mark.parametrize("alias", ["same", "dotdot", "symlink"])
def test_two_outputs_one_file_refused(checkpoint, tmp_path, alias):
    """`-o m.gguf --mmproj m.gguf --force` once kept only the projector; any spelling of one file is refused."""
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    (tmp_path / "sub").mkdir()
    other = {"same": out, "dotdot": tmp_path / "sub" / ".." / "m.gguf", "symlink": tmp_path / "link.gguf"}[alias]
    if alias == "symlink":
        other.symlink_to(out)
    result = convert(checkpoint(HF), out, "--mmproj", other, "--force")
    assert_one_line_error(result, "two outputs are the same file")
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"m.gguf", "sub", other.name})


def test_output_that_is_an_input_refused(damaged, tmp_path):
    config = damaged / "config.json"
    before = config.read_bytes()
    assert_one_line_error(convert(damaged, config, "--force"), "is the input", "config.json")
    assert config.read_bytes() == before
    assert not [p for p in damaged.iterdir() if p.name.endswith(".partial")]


def test_quantize_output_onto_its_input_refused(converted, tmp_path):
    source = tmp_path / "in.gguf"
    shutil.copy(converted(HF, "f32"), source)
    (tmp_path / "alias.gguf").symlink_to(source)
    before = source.stat().st_size
    result = run_cli("quantize", source, "-o", tmp_path / "alias.gguf", "--recipe", "q8_0", "--force")
    assert_one_line_error(result, "is the input")
    assert source.stat().st_size == before
    assert leftovers(tmp_path) == ["alias.gguf", "in.gguf"]


def test_force_onto_a_directory_fails_before_work(checkpoint, tmp_path):
    (tmp_path / "out.gguf").mkdir()
    assert_one_line_error(convert(checkpoint(HF), tmp_path / "out.gguf", "--force"), "is a directory")
    assert leftovers(tmp_path) == ["out.gguf"]


def test_projector_failure_keeps_no_text_model(damaged, tmp_path):
    """A NaN in the vision tower fails the projector after the text model is written: neither file lands."""
    shard, entries = None, {}
    for candidate in sorted(damaged.glob("model-*.safetensors")):
        length, entries = header(candidate)
        names = [n for n, e in entries.items() if n.startswith("vision_tower") and e.get("dtype") == "BF16"]
        if names:
            shard, name = candidate, names[0]
            break
    assert shard is not None, "the fixture has a vision tower"
    with open(shard, "r+b") as f:
        f.seek(8 + length + entries[name]["data_offsets"][0])
        f.write(struct.pack("<H", 0x7FC0))
    result = convert(damaged, tmp_path / "out.gguf")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert leftovers(tmp_path) == ["ckpt"]
    # and a rerun is not told that the model "already exists"
    assert "already exists" not in convert(damaged, tmp_path / "out.gguf").stderr


def test_sigterm_removes_partial_outputs(checkpoint, tmp_path):
    """SIGTERM mid-conversion cleans up as Ctrl-C does: exit 143, one line, nothing left."""
    process = subprocess.Popen([*SMALLFOUR, "convert", str(checkpoint(HF)), "-o", str(tmp_path / "out.gguf"),
                                "--recipe", "f32"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.gguf.*.partial")):
        assert process.poll() is None and time.monotonic() < deadline, "no partial file appeared"
        time.sleep(0.02)
    process.terminate()
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == \
        ["error: terminated (SIGTERM); partial output removed"]
    assert leftovers(tmp_path) == []


def test_stale_partial_of_a_dead_writer_is_removed(checkpoint, tmp_path):
    """kill -9 cannot clean up; the next run beside it removes the dead writer's partial file and says so."""
    process = subprocess.Popen([*SMALLFOUR, "convert", str(checkpoint(HF)), "-o", str(tmp_path / "out.gguf"),
                                "--recipe", "f32"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.gguf.*.partial")):
        assert process.poll() is None and time.monotonic() < deadline, "no partial file appeared"
        time.sleep(0.02)
    process.kill()
    process.wait(timeout=60)
    stale = list(tmp_path.glob(".out.gguf.*.partial"))
    assert len(stale) == 1
    live = tmp_path / f".other.gguf.{os.getpid()}.partial"  # a live writer's: locked, so kept
    with open(live, "wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        doctor = run_cli("doctor", "--scan", tmp_path)
        assert stale[0].name in doctor.stdout + doctor.stderr and live.name not in doctor.stdout + doctor.stderr
        result = convert(checkpoint(HF), tmp_path / "next.gguf")
        assert result.returncode == 0, result.stderr
        assert f"removed {stale[0]}" in result.stderr and "interrupted run" in result.stderr
        assert leftovers(tmp_path) == sorted([live.name, "next-mmproj.gguf", "next.gguf"])
