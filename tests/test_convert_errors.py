"""Bad input to `smallfour convert`: one clear line, exit code 1, no traceback, no output file."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
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
