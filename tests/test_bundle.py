"""`smallfour bundle`: a bundle built here installs with pip kept off the network and runs the demo.

Building a bundle needs PyPI (pip download, as on the connected machine it is meant for);
installing from it runs in a network namespace with no network at all (`unshare -rn`), with
`PIP_NO_INDEX` and a dead proxy besides. Compiling llama-cpp-python from the bundle's sdist
takes minutes, so the venv it is built into is kept in `$SMALLFOUR_CACHE/bundle-venv/<hash>`,
keyed by the repacked sdist's bytes, install.sh and the Python version: a cold cache builds from
the bundle's sdist; a warm one re-runs install.sh, which finds that build and installs this
checkout's smallfour wheel from the new bundle over it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO
from helpers import assert_one_line_error, run_cli

OFFLINE_ENV = {"PIP_NO_INDEX": "1", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
HOPPER = ("--python-version", "3.11", "--platform", "manylinux_2_28_x86_64")
# What the target already has (with what those packages need), as its `pip freeze` would list them.
TARGET_HAS = ("numpy", "pillow", "rich", "typer", "jinja2", "huggingface-hub")


def _offline(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`command` in a network namespace without network: any download attempt fails."""
    return subprocess.run(["unshare", "-rn", *command], env={**os.environ, **OFFLINE_ENV, **kwargs.pop("env", {})},
                          capture_output=True, text=True, **kwargs)


def _sdist_members(bundle: Path) -> list[str]:
    with tarfile.open(next(bundle.glob("llama_cpp_python-*.tar.gz"))) as archive:
        return archive.getnames()


def test_bundle_installs_offline_and_runs_the_demo(tmp_path):
    started = time.perf_counter()
    made = run_cli("bundle", tmp_path / "bundle")
    assert made.returncode == 0, made.stderr
    bundle = tmp_path / "bundle"
    assert re.fullmatch(rf"{re.escape(str(bundle))}: [\d.]+ MB \([\d.]+ MiB\)\n", made.stdout), made.stdout
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["llama_cpp_python"] == "0.3.36" and manifest["excluded"] == {}
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    wheels = {canonicalize_name(p.name.split("-")[0]) for p in (bundle / "wheels").glob("*.whl")}
    assert {"smallfour", "numpy", "gguf", "mistral-common", "diskcache", "scikit-build-core"} <= wheels
    members = _sdist_members(bundle)
    assert not any("/vendor/llama.cpp/models/" in m or "/.git/" in m for m in members)
    assert any(m.endswith("/vendor/llama.cpp/CMakeLists.txt") for m in members)

    key = hashlib.sha256()
    for part in (next(bundle.glob("llama_cpp_python-*.tar.gz")).read_bytes(), (bundle / "install.sh").read_bytes(),
                 sys.version.encode()):
        key.update(part)
    venvs = Path(os.environ["SMALLFOUR_CACHE"]) / "bundle-venv"
    venv = venvs / key.hexdigest()[:12]
    cold = not (venv / ".smallfour-llama-cpp-build").exists()
    if cold:
        shutil.rmtree(venvs, ignore_errors=True)
        venvs.mkdir(parents=True)
    base_python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    install = _offline([str(bundle / "install.sh"), "--venv", str(venv), "--python", str(base_python)],
                       env={"PIP_CACHE_DIR": str(tmp_path / "pip-cache")}, timeout=3600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    if cold:  # really compiled from the bundle's sdist, for the CPU
        assert "Building wheel for llama_cpp_python" in install.stdout, install.stdout
    else:
        assert "is already built" in install.stdout, install.stdout
    assert "smallfour 0.1.0" in install.stdout

    smallfour = venv / "bin" / "smallfour"
    where = _offline([str(venv / "bin" / "python"), "-c", "import smallfour, llama_cpp; print(smallfour.__file__); "
                      "print(llama_cpp.__version__)"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == [str(venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" /
                                        "site-packages" / "smallfour" / "__init__.py"), "0.3.36"]
    demo = _offline([str(smallfour), "demo"], cwd=tmp_path, env={"SMALLFOUR_HOME": str(tmp_path / "home")},
                    timeout=600)
    assert demo.returncode == 0, demo.stderr
    assert "kept in the model store as `demo`" in demo.stderr and demo.stdout.strip()
    print(f"\nbundle + {'cold' if cold else 'warm'} offline install + demo: {time.perf_counter() - started:.0f} s")


def _freeze_of(names: tuple[str, ...]) -> str:
    """`pip freeze` lines of `names` and everything they require, at the versions this environment has."""
    seen: dict[str, str] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen[name] = dist.version
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return "".join(f"{name}=={version}\n" for name, version in sorted(seen.items()))


def test_a_hopper_bundle_leaves_out_what_the_target_has(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("# pip freeze of the target\n-e git+https://example.invalid/x#egg=x\n" + _freeze_of(TARGET_HAS)
                      + "fastapi==0.1.0\n")  # too old for smallfour: its wheel stays in the bundle
    made = run_cli("bundle", tmp_path / "hopper", *HOPPER, "--exclude-from", freeze)
    assert made.returncode == 0, made.stderr
    bundle = tmp_path / "hopper"
    manifest = json.loads((bundle / "manifest.json").read_text())
    wheels = {canonicalize_name(p.name.split("-")[0]): p.name for p in (bundle / "wheels").glob("*.whl")}
    assert set(TARGET_HAS) <= set(manifest["excluded"]) and not set(TARGET_HAS) & set(wheels)
    assert "fastapi" in wheels and "fastapi" not in manifest["excluded"]
    assert all("manylinux" in name or name.endswith("-any.whl") for name in wheels.values()), wheels
    assert (manifest["python"], manifest["platforms"]) == ("3.11", ["manylinux_2_28_x86_64"])
    assert "SYSTEM_SITE=1" in (bundle / "install.sh").read_text()  # the venv must see the target's packages
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size < 64 * 2**20, size
    print(f"\nHopper bundle without the target's packages: {size / 2**20:.1f} MiB")


def _wheel(directory: Path, name: str, version: str, requires: list[str]) -> Path:
    path = directory / f"{name}-{version}-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata)
    return path


def test_only_versions_every_requirement_accepts_are_left_out(tmp_path):
    from smallfour.bundle import Target, satisfied_by_target

    wheels = [_wheel(tmp_path, "app", "1.0", ["lib>=2", "tool<3", "winonly; sys_platform == 'win32'",
                                              "extra-thing; extra == 'dev'"]),
              _wheel(tmp_path, "lib", "2.5", []), _wheel(tmp_path, "tool", "2.0", []),
              _wheel(tmp_path, "other", "1.0", ["lib<2.4"]), _wheel(tmp_path, "winonly", "1.0", []),
              _wheel(tmp_path, "extra_thing", "1.0", [])]
    frozen = {"lib": "2.3", "tool": "3.1", "winonly": "0.1", "extra-thing": "0.1", "unrelated": "9"}
    environment = Target("3.11", ("manylinux_2_28_x86_64",)).marker_environment()
    # lib 2.3: >=2 and <2.4 both hold; tool 3.1 breaks <3; the marker-less packages need nothing.
    assert satisfied_by_target(frozen, ["app"], wheels, environment) == {"lib": "2.3", "winonly": "0.1",
                                                                         "extra-thing": "0.1"}


@pytest.mark.parametrize("args,message", [
    (("--python-version", "3"), "--python-version '3': give it as X.Y"),
    (("--platform", "Linux x86"), "--platform 'Linux x86': give a wheel platform tag"),
    (("--exclude-from", "/nonexistent/freeze.txt"), "--exclude-from /nonexistent/freeze.txt: No such file"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    result = run_cli("bundle", tmp_path / "b", *args)
    assert_one_line_error(result, message)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_directory_is_refused(tmp_path):
    (tmp_path / "b").mkdir()
    assert_one_line_error(run_cli("bundle", tmp_path / "b"), "exists: give a new directory")
    empty = tmp_path / "freeze.txt"
    empty.write_text("-e .\n")
    assert_one_line_error(run_cli("bundle", tmp_path / "c", "--exclude-from", empty), "no `name==version` lines")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "freeze.txt"]
