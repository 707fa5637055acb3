"""The local model store (`models`, `rm`, name resolution for convert/run) and `doctor`."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from conftest import HF
from hub_stub import assert_one_line_error, cli, hub_cache, repo_dir

CKPT = "acme/Tiny-FP8"
GGUF_REPO = "acme/Tiny-GGUF"


def fp8_checkpoint_files() -> dict[str, bytes]:
    """A small stand-in checkpoint: an FP8 config and a two-shard index (the store reads no tensor)."""
    config = {"architectures": ["Mistral3ForConditionalGeneration"], "quantization_config": {"quant_method": "fp8"}}
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    return {"config.json": json.dumps(config).encode(), "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001-of-00002.safetensors": b"\1" * 3000, "model-00002-of-00002.safetensors": b"\2" * 5000,
            "tekken.json": b"{}"}


def by_name(env) -> dict[str, dict]:
    result = cli(env, "models", "--json")
    assert result.returncode == 0, result.stderr
    return {m["name"]: m for m in json.loads(result.stdout)["models"]}


def test_models_lists_checkpoints_and_ggufs_with_sizes_recipes_and_mmproj(hub, env, converted, tmp_path):
    gguf = converted(HF, "q8_0")
    ckpt_commit = hub.add_commit(CKPT, fp8_checkpoint_files())
    gguf_commit = hub.add_commit(GGUF_REPO, {"tiny-Q8_0.gguf": gguf, "mmproj-F16.gguf": b"GGUF" + b"\0" * 100})
    for repo in (CKPT, GGUF_REPO):
        assert cli(env, "pull", repo).returncode == 0
    store = Path(env["SMALLFOUR_HOME"]) / "models"
    store.mkdir(parents=True)
    (store / "small4-q8.gguf").symlink_to(gguf)
    (store / "small4-q8-mmproj.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    shutil.copy(gguf, store / "plain.gguf")

    models = by_name(env)
    assert set(models) == {CKPT, GGUF_REPO, "small4-q8", "plain"}
    ckpt = models[CKPT]
    assert (ckpt["kind"], ckpt["recipe"], ckpt["status"], ckpt["mmproj"]) == ("checkpoint", "fp8", "ok", None)
    assert ckpt["bytes"] == sum(len(v) for v in fp8_checkpoint_files().values())
    assert (ckpt["revision"], ckpt["commit"]) == ("main", ckpt_commit)
    pulled = models[GGUF_REPO]
    assert (pulled["kind"], pulled["recipe"], pulled["mmproj"]) == ("gguf", "q8_0", "mmproj-F16.gguf")  # smallfour.recipe
    assert pulled["bytes"] == gguf.stat().st_size and pulled["commit"] == gguf_commit
    assert (models["small4-q8"]["location"], models["small4-q8"]["mmproj"]) == ("store", "small4-q8-mmproj.gguf")
    assert (models["plain"]["recipe"], models["plain"]["mmproj"]) == ("q8_0", None)  # that mmproj is small4-q8's
    table = cli(env, "models")
    assert table.returncode == 0
    for text in (CKPT, GGUF_REPO, "small4-q8", "fp8", "q8_0", "mmproj-F16.gguf", ckpt_commit[:8]):
        assert text in table.stdout, text

    # A shard gone from the store: listed as incomplete, and convert says so before converting anything.
    (repo_dir(env, CKPT) / "snapshots" / ckpt_commit / "model-00002-of-00002.safetensors").unlink()
    assert by_name(env)[CKPT]["status"] == "incomplete: 1 of 2 shards missing"
    out = tmp_path / "out.gguf"
    assert_one_line_error(cli(env, "convert", CKPT, "-o", out), "missing 1 of 2 shards",
                          "model-00002-of-00002.safetensors", f"smallfour pull {CKPT}")
    assert not out.exists()


def test_rm_removes_a_repo_a_revision_or_a_store_gguf(hub, env, converted):
    repo = "acme/two-revisions"
    old = hub.add_commit(repo, {"config.json": b'{"v": 1}', "model.safetensors": b"\1" * 4000}, refs=("v1",))
    new = hub.add_commit(repo, {"config.json": b'{"v": 2}', "model.safetensors": b"\2" * 4000})
    hub.add_commit(CKPT, fp8_checkpoint_files())
    for args in ((repo, "--revision", "v1"), (repo,), (CKPT,)):
        assert cli(env, "pull", *args).returncode == 0
    assert {f"{repo}@v1", f"{repo}@main", CKPT} <= set(by_name(env))

    result = cli(env, "rm", f"{repo}@v1")
    assert result.returncode == 0, result.stderr
    assert "removed acme/two-revisions@v1" in result.stderr and "4.0 KB freed" in result.stderr
    folder = repo_dir(env, repo)
    assert not (folder / "snapshots" / old).exists() and not (folder / "refs" / "v1").exists()
    assert (folder / "snapshots" / new / "model.safetensors").read_bytes() == b"\2" * 4000
    assert set(by_name(env)) == {repo, CKPT}

    result = cli(env, "rm", CKPT)
    assert result.returncode == 0, result.stderr
    assert not repo_dir(env, CKPT).exists()
    assert CKPT not in json.loads((Path(env["SMALLFOUR_HOME"]) / "pulls.json").read_text())
    assert_one_line_error(cli(env, "rm", CKPT), f"{CKPT} is not in the model store")

    store = Path(env["SMALLFOUR_HOME"]) / "models"
    store.mkdir(parents=True)
    shutil.copy(converted(HF, "q8_0"), store / "small4.gguf")
    (store / "small4-mmproj.gguf").write_bytes(b"GGUF")
    (store / "other.gguf").write_bytes(b"GGUF")
    assert cli(env, "rm", "small4").returncode == 0
    assert sorted(p.name for p in store.iterdir()) == ["other.gguf"]
    assert_one_line_error(cli(env, "rm", "small4"), "no model named 'small4'")
    assert set(by_name(env)) == {repo, "other"}


def test_the_store_shares_the_hub_cache_with_huggingface_hub(hub, env, checkpoint, monkeypatch, tmp_path):
    """A checkpoint fetched by huggingface_hub itself is listed, converted by repo id, and a local path wins."""
    from huggingface_hub import snapshot_download

    from smallfour import store

    files = {p.name: p for p in checkpoint(HF).iterdir()}
    commit = hub.add_commit(CKPT, files)
    snapshot_download(CKPT, cache_dir=str(hub_cache(env)), endpoint=hub.url)
    assert by_name(env)[CKPT]["commit"] == commit

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub_cache(env)))
    monkeypatch.setenv("SMALLFOUR_HOME", env["SMALLFOUR_HOME"])
    snapshot = repo_dir(env, CKPT) / "snapshots" / commit
    assert store.resolve_checkpoint(CKPT) == snapshot
    assert store.resolve_checkpoint(f"{CKPT}@main") == snapshot
    assert store.resolve_checkpoint(f"{CKPT}@{commit[:10]}") == snapshot
    with pytest.raises(store.SmallfourError, match="revision v2 of acme/Tiny-FP8 is not in the model store"):
        store.resolve_checkpoint(f"{CKPT}@v2")
    with pytest.raises(store.SmallfourError, match="smallfour pull acme/elsewhere"):
        store.resolve_checkpoint("acme/elsewhere")
    with pytest.raises(store.SmallfourError, match="is a checkpoint, not a GGUF"):
        store.resolve_gguf(CKPT)
    # A path that exists wins over the repo id of the same name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "Tiny-FP8").mkdir(parents=True)
    assert store.resolve_checkpoint(CKPT) == Path(CKPT)
    assert store.resolve_gguf("missing.gguf") == Path("missing.gguf")  # the loader reports it


def test_doctor_on_this_machine(env):
    import llama_cpp

    result = cli(env, "doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    llama = report["llama_cpp"]
    assert llama["version"] == llama_cpp.__version__ == "0.3.36"
    # What llama.cpp itself says about this build.
    assert llama["system_info"] == llama_cpp.llama_print_system_info().decode().strip()
    assert "CPU" in llama["backends"] and "CPU" in llama["system_info_sections"]
    assert any(d["type"] == "CPU" for d in llama["devices"])
    assert llama["gpu_offload"] == bool(llama_cpp.llama_supports_gpu_offload())
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert report["memory"]["total"] == int(meminfo["MemTotal"].split()[0]) * 1024
    hub_disk = report["disks"][0]
    assert hub_disk["path"] == str(hub_cache(env))
    usage = shutil.disk_usage(Path(env["HF_HOME"]).parent)
    assert hub_disk["total"] == usage.total and abs(hub_disk["free"] - usage.free) < 0.05 * usage.total
    assert report["versions"]["llama-cpp-python"] == "0.3.36" and report["versions"]["python"]
    backend = next(f for f in report["findings"] if f["topic"] == "backend")
    if not llama["gpu_offload"] and not report["system_gpus"]:  # this CPU-only machine
        assert report["system_gpus"] == [] and llama["backends"] == ["CPU"]
        assert backend["level"] == "info" and "CPU-only" in backend["message"]
        assert 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall' in backend["fix"]
    memory = next(f for f in report["findings"] if f["topic"] == "memory")
    assert memory["level"] == ("warn" if report["memory"]["total"] < 67e9 else "ok")

    text = cli(env, "doctor")
    assert text.returncode == 0, text.stderr
    for fragment in ("llama-cpp-python 0.3.36; backends: CPU", "RAM", "hub cache (pulled checkpoints)",
                     str(hub_cache(env)), "llama-cpp-python==0.3.36", "huggingface-hub"):
        assert fragment in text.stdout, fragment


def test_doctor_points_at_the_cuda_build_when_a_gpu_is_unused(env, tmp_path):
    """An NVIDIA GPU (a stand-in nvidia-smi) with this CPU-only build: the advice is the CUDA reinstall."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559, 80000'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    result = cli(env | {"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}, "doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["system_gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert report["system_gpus"][0]["memory_free"] == 80000 * 2**20
    backend = next(f for f in report["findings"] if f["topic"] == "backend")
    assert backend["level"] == "warn" and "NVIDIA H100 80GB HBM3" in backend["message"]
    assert backend["fix"].startswith("rebuild llama-cpp-python for it: CMAKE_ARGS=\"-DGGML_CUDA=on\"")


def test_doctor_without_llama_cpp_says_how_to_install_it(env):
    script = ("import sys; sys.modules['llama_cpp'] = None; sys.argv = ['smallfour', 'doctor']; "
              "from smallfour.cli import main; main()")
    import subprocess

    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "llama-cpp-python cannot be imported" in result.stdout
    assert "pip install llama-cpp-python==0.3.36" in result.stdout
    assert "Traceback" not in result.stderr


def test_keep_gguf_links_under_a_name_and_replaces_only_that(tmp_path, monkeypatch):
    from smallfour.store import gguf_groups, keep_gguf, mmproj_for, resolve_gguf

    monkeypatch.setenv("SMALLFOUR_HOME", str(tmp_path / "home"))
    source, projector = tmp_path / "built.gguf", tmp_path / "built-mmproj.gguf"
    source.write_bytes(os.urandom(4096))
    projector.write_bytes(os.urandom(512))
    kept = keep_gguf(source, "demo", projector)
    assert kept == tmp_path / "home" / "models" / "demo.gguf" and kept.samefile(source)  # a link, not a copy
    assert mmproj_for(kept).read_bytes() == projector.read_bytes()
    assert resolve_gguf("demo") == kept and list(gguf_groups(kept.parent)) == ["demo.gguf"]
    rebuilt = tmp_path / "rebuilt.gguf"
    rebuilt.write_bytes(os.urandom(4096))
    assert keep_gguf(rebuilt, "demo").read_bytes() == rebuilt.read_bytes()  # the name now means the new build
    assert source.is_file()  # the old build itself is untouched
    assert sorted(p.name for p in kept.parent.iterdir()) == ["demo-mmproj.gguf", "demo.gguf"]  # no temporaries
