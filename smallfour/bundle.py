"""`smallfour bundle`: everything an offline install needs, written on a connected machine.

A bundle directory holds:

- `wheels/`: a wheel of every runtime dependency for the target Python and platform (`pip download
  --only-binary=:all:`), the build requirements of llama-cpp-python (scikit-build-core), and
  smallfour's own wheel, built from this checkout;
- `llama_cpp_python-<pin>.tar.gz`: the pinned llama-cpp-python sdist, repacked without its git
  metadata (`.git`, 39 MB of the 77 MB download, never read by the build) and, unless asked to
  keep them, without llama.cpp's test vocabularies (`vendor/llama.cpp/models`, 23 MB);
- `manifest.json`: what is in it (name, size and sha256 of every file), for which target, and
  what was left out because the target already has it;
- `install.sh`: creates a venv (or uses the active environment), builds llama-cpp-python from
  the sdist for the backend asked (`--cuda [ARCH]`, `--metal`, CPU by default) and installs
  smallfour, all with `pip --no-index`: it never touches the network.

Given the target's `pip freeze`, a package the target already has at a version every
requirement in the bundle accepts is left out (the venv install.sh creates then sees the
target's own site-packages). The directory is written under a temporary name and renamed
into place when complete.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from email.parser import HeaderParser
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, Protocol
from zipfile import ZipFile

from packaging.markers import InvalidMarker, UndefinedEnvironmentName, default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from smallfour.doctor import LLAMA_CPP_PIN
from smallfour.errors import SmallfourError
from smallfour.fixtures.checkpoint import default_cache_dir

LLAMA_CPP = "llama-cpp-python"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PIN}.tar.gz"
# Paths inside the sdist's top directory that the build never reads: always dropped, or dropped unless kept.
ALWAYS_DROPPED = (".git", "vendor/llama.cpp/.git")
TEST_VOCAB = "vendor/llama.cpp/models"
WHEELS = "wheels"
MANIFEST = "manifest.json"
INSTALLER = "install.sh"
REQUIREMENTS = "requirements.txt"
BUILD_REQUIREMENTS = "build-requirements.txt"
# The platform tags pip accepts in --platform (manylinux_2_28_x86_64, macosx_14_0_arm64, win_amd64, linux_x86_64, …).
PLATFORM_TAG = re.compile(r"^[a-z0-9_.]+$")
PYTHON_VERSION = re.compile(r"^3\.\d+$")


class BundleError(SmallfourError):
    """The bundle could not be written (bad option, download refused, no source tree)."""


class Steps(Protocol):
    """The bundle's progress: one named step at a time, with an optional total (bytes or items) and advances."""

    def start(self, description: str, total: float | None = None, *, unit: str = "items") -> None: ...

    def advance(self, amount: float = 1, detail: str = "") -> None: ...

    def finish(self) -> None: ...


@dataclass(frozen=True)
class Target:
    """The machine the bundle is for; None/empty: this interpreter's version and platform."""

    python_version: str | None = None
    platforms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.python_version is not None and not PYTHON_VERSION.match(self.python_version):
            raise BundleError(f"--python-version {self.python_version!r}: give it as X.Y, e.g. 3.11")
        for tag in self.platforms:
            if not PLATFORM_TAG.match(tag):
                raise BundleError(f"--platform {tag!r}: give a wheel platform tag, e.g. manylinux_2_28_x86_64")

    @property
    def python(self) -> str:
        return self.python_version or f"{sys.version_info.major}.{sys.version_info.minor}"

    def pip_options(self) -> list[str]:
        options = ["--only-binary=:all:"]
        if self.python_version:
            options += ["--python-version", self.python_version]
        for tag in dict.fromkeys(t for tag in self.platforms for t in compatible_platforms(tag)):
            options += ["--platform", tag]
        return options

    def marker_environment(self) -> dict[str, str]:
        """The environment markers are evaluated in: this machine's, with the target's Python and OS."""
        environment = default_environment()
        environment.update(python_version=self.python, python_full_version=f"{self.python}.0")
        if self.platforms:
            tag = self.platforms[0]
            system = ("Darwin", "darwin") if tag.startswith("macosx") else (
                ("Windows", "win32") if tag.startswith("win") else ("Linux", "linux"))
            environment.update(platform_system=system[0], sys_platform=system[1],
                               os_name="nt" if system[1] == "win32" else "posix")
            linux = MANYLINUX.match(compatible_platforms(tag)[0])
            if linux:
                environment["platform_machine"] = linux.group(2)
        return environment


MANYLINUX = re.compile(r"^manylinux_2_(\d+)_(\w+)$")
LEGACY_MANYLINUX = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}


def compatible_platforms(tag: str) -> list[str]:
    """`tag` and the older manylinux tags a machine with that glibc also runs (pip takes --platform literally):
    manylinux_2_28_x86_64 → manylinux_2_28 … manylinux_2_5, manylinux2014, manylinux2010, manylinux1."""
    for legacy, glibc in LEGACY_MANYLINUX.items():
        if tag.startswith(legacy + "_"):
            tag = f"manylinux_2_{glibc}_{tag.removeprefix(legacy + '_')}"
    match = MANYLINUX.match(tag)
    if not match:
        return [tag]
    glibc, arch = int(match.group(1)), match.group(2)
    return [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)] + \
        [f"{legacy}_{arch}" for legacy, minor in LEGACY_MANYLINUX.items() if minor <= glibc]


@dataclass
class Bundle:
    path: Path
    size: int
    files: dict[str, dict] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)


# --- what goes in ----------------------------------------------------------------------------------------------


def source_root() -> Path:
    """The checkout smallfour runs from (its wheel is built from it)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise BundleError(f"smallfour is installed without its source tree ({root} has no pyproject.toml): "
                          "run `smallfour bundle` from a checkout installed with pip install -e")
    return root


def project_requirements(root: Path) -> list[str]:
    return list(tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"])


def sdist_metadata(sdist: Path) -> tuple[list[str], list[str]]:
    """(runtime requirements without extras, build-system requirements) read from the sdist itself."""
    top = SDIST_NAME.removesuffix(".tar.gz")
    with tarfile.open(sdist) as archive:
        info = HeaderParser().parsestr(archive.extractfile(f"{top}/PKG-INFO").read().decode())
        build = tomllib.loads(archive.extractfile(f"{top}/pyproject.toml").read().decode())["build-system"]["requires"]
    runtime = [r for r in info.get_all("Requires-Dist") or [] if "extra ==" not in r]
    return runtime, list(build)


def llama_sdist(steps: Steps) -> Path:
    """The pinned llama-cpp-python sdist: `$SMALLFOUR_CACHE/sdist/`, downloaded there with pip once."""
    directory = default_cache_dir().parent / "sdist"
    path = directory / SDIST_NAME
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    steps.start(f"downloading {SDIST_NAME}")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=directory) as scratch:  # no half file in the cache
        _pip(["download", "--no-deps", "--no-binary=:all:", "--dest", scratch, f"{LLAMA_CPP}=={LLAMA_CPP_PIN}"], steps)
        if not (Path(scratch) / SDIST_NAME).is_file():
            raise BundleError(f"pip downloaded no {SDIST_NAME}")
        os.replace(Path(scratch) / SDIST_NAME, path)
    steps.finish()
    return path


def repack_sdist(source: Path, target: Path, *, keep_test_vocab: bool, steps: Steps) -> list[str]:
    """`source` → `target` without the paths the build never reads; returns the dropped top-level paths."""
    dropped = ALWAYS_DROPPED + (() if keep_test_vocab else (TEST_VOCAB,))
    steps.start("repacking the llama-cpp-python sdist", source.stat().st_size, unit="bytes")
    read = 0
    # gzip without a timestamp: the same sdist repacks to the same bytes (the manifest's sha256 stays put).
    with source.open("rb") as raw, tarfile.open(fileobj=raw, mode="r:gz") as archive, \
            gzip.GzipFile(target, "wb", mtime=0) as packed, tarfile.open(fileobj=packed, mode="w") as repacked:
        for member in archive:
            inner = member.name.partition("/")[2]
            if not any(inner == d or inner.startswith(d + "/") for d in dropped):
                repacked.addfile(member, archive.extractfile(member) if member.isfile() else None)
            steps.advance(raw.tell() - read)
            read = raw.tell()
    steps.finish()
    return list(dropped)


def build_own_wheel(root: Path, wheels: Path, steps: Steps) -> Path:
    """smallfour's wheel, built from a clean copy of the checkout (no stale `build/` leaks into it)."""
    steps.start("building the smallfour wheel")
    project = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    with tempfile.TemporaryDirectory(prefix="smallfour-wheel-") as scratch:
        copy = Path(scratch) / "src"
        copy.mkdir()
        for name in ("pyproject.toml", project["project"].get("readme", "README.md")):
            shutil.copy2(root / name, copy / name)
        for package in sorted(p for p in root.iterdir() if p.is_dir() and any(fnmatch(p.name, pat) for pat in patterns)
                              and (p / "__init__.py").is_file()):
            shutil.copytree(package, copy / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        before = set(wheels.glob("smallfour-*.whl"))
        _pip(["wheel", "--no-deps", "--wheel-dir", str(wheels), str(copy)], steps)
    made = sorted(set(wheels.glob("smallfour-*.whl")) - before)
    steps.finish()
    if len(made) != 1:
        raise BundleError("pip wheel wrote no smallfour wheel")
    return made[0]


def download_wheels(requirements: list[str], target: Target, wheels: Path, steps: Steps) -> None:
    steps.start("downloading wheels")
    _pip(["download", *target.pip_options(), "--dest", str(wheels), *requirements], steps,
         on_line=lambda line: steps.advance(1, line.split()[-1].rsplit("/", 1)[-1]) if line.startswith("Saved ")
         else None)
    steps.finish()


def _pip(arguments: list[str], steps: Steps, on_line: Callable[[str], None] | None = None) -> None:
    """Runs pip (this interpreter's) with its output read line by line; its last ERROR line becomes the message."""
    command = [sys.executable, "-m", "pip", *arguments, "--progress-bar", "off", "--disable-pip-version-check"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        if on_line:
            on_line(line.strip())
    if process.wait() != 0:
        errors = [line for line in lines if line.startswith("ERROR:")] or [line for line in lines if line] or ["?"]
        raise BundleError(f"pip {arguments[0]} failed: {errors[-1].removeprefix('ERROR: ')}")


# --- leaving out what the target has ---------------------------------------------------------------------------


def read_freeze(path: Path) -> dict[str, str]:
    """`pip freeze` output → {canonical name: version}; editable, URL and other lines without `==` are skipped."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise BundleError(f"--exclude-from {path}: {exc.strerror or exc}") from None
    frozen = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        name, sep, version = line.partition("==")
        if sep and name and not line.startswith("-"):
            frozen[canonicalize_name(name.split("[")[0].strip())] = version.strip()
    if not frozen:
        raise BundleError(f"--exclude-from {path}: no `name==version` lines (give the target's `pip freeze` output)")
    return frozen


def wheel_requirements(wheel: Path) -> list[str]:
    with ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return HeaderParser().parsestr(archive.read(name).decode()).get_all("Requires-Dist") or []


def satisfied_by_target(frozen: dict[str, str], requirements: list[str], wheels: list[Path],
                        environment: dict[str, str]) -> dict[str, str]:
    """{name: target's version} of the packages among `wheels` the target has at a version every requirement accepts.

    The requirements are the bundle's top-level ones and those of every wheel in it, with
    markers evaluated for the target (an `extra` marker never applies); a requirement whose
    marker cannot be evaluated counts, so doubt keeps a wheel.
    """
    constraints: dict[str, list[Requirement]] = {}
    for text in requirements + [r for wheel in wheels for r in wheel_requirements(wheel)]:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        if requirement.marker is not None:
            try:
                if not requirement.marker.evaluate({**environment, "extra": ""}):
                    continue
            except (InvalidMarker, UndefinedEnvironmentName):
                pass
        constraints.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    kept_out = {}
    for wheel in wheels:
        name = canonicalize_name(parse_wheel_filename(wheel.name)[0])
        version = frozen.get(name)
        if version is None:
            continue
        try:
            parsed = Version(version)
        except InvalidVersion:
            continue
        if all(r.specifier.contains(parsed, prereleases=True) for r in constraints.get(name, [])):
            kept_out[name] = version
    return kept_out


# --- the bundle --------------------------------------------------------------------------------------------------


def build_bundle(directory: Path, target: Target, steps: Steps, *, exclude_from: Path | None = None,
                 keep_test_vocab: bool = False) -> Bundle:
    directory = directory.expanduser()
    if directory.exists():
        raise BundleError(f"{directory} exists: give a new directory for the bundle")
    if not directory.parent.is_dir():
        raise BundleError(f"{directory.parent} is not a directory")
    frozen = read_freeze(exclude_from) if exclude_from else {}
    root = source_root()
    sdist = llama_sdist(steps)
    llama_runtime, llama_build = sdist_metadata(sdist)
    own = [r for r in project_requirements(root) if canonicalize_name(Requirement(r).name) != LLAMA_CPP]
    runtime = own + llama_runtime
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent))
    try:
        wheels = staging / WHEELS
        wheels.mkdir()
        download_wheels(runtime + llama_build, target, wheels, steps)
        excluded = satisfied_by_target(frozen, runtime + llama_build, sorted(wheels.glob("*.whl")),
                                       target.marker_environment()) if frozen else {}
        for wheel in wheels.glob("*.whl"):
            if canonicalize_name(parse_wheel_filename(wheel.name)[0]) in excluded:
                wheel.unlink()
        dropped = repack_sdist(sdist, staging / SDIST_NAME, keep_test_vocab=keep_test_vocab, steps=steps)
        own_wheel = build_own_wheel(root, wheels, steps)
        (staging / REQUIREMENTS).write_text("".join(f"{r}\n" for r in runtime))
        (staging / BUILD_REQUIREMENTS).write_text("".join(f"{r}\n" for r in llama_build))
        (staging / INSTALLER).write_text(installer_script(target.python, own_wheel.name, system_site=bool(excluded)))
        (staging / INSTALLER).chmod(0o755)
        files = {str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest = {"smallfour": own_wheel.name.split("-")[1], "llama_cpp_python": LLAMA_CPP_PIN,
                    "python": target.python, "platforms": list(target.platforms) or ["this machine's"],
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "sdist_dropped": dropped, "excluded": excluded, "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp made it private; a bundle is meant to be copied and shared
        os.rename(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return Bundle(directory, size, files, excluded)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- install.sh ---------------------------------------------------------------------------------------------------


def installer_script(python: str, own_wheel: str, *, system_site: bool) -> str:
    return (INSTALLER_TEMPLATE.replace("@PYTHON@", python).replace("@WHEEL@", own_wheel)
            .replace("@SDIST@", SDIST_NAME).replace("@PIN@", LLAMA_CPP_PIN)
            .replace("@SYSTEM_SITE@", "1" if system_site else "0"))


INSTALLER_TEMPLATE = r"""#!/usr/bin/env bash
# Offline install of smallfour from this bundle (written by `smallfour bundle`). Never uses the network.
#
#   ./install.sh [--venv DIR | --active] [--python PYTHON] [--cuda [ARCH]] [--metal] [--jobs N] [--rebuild]
#
#   --venv DIR     the venv to create or update (default: ./smallfour-venv)
#   --active       install into the Python environment of --python (e.g. an active venv's python) instead
#   --python PY    the interpreter (default: python3); it must be Python @PYTHON@, as the bundle's wheels
#   --cuda [ARCH]  build llama.cpp with CUDA (needs nvcc); ARCH such as 90 (H100/H200) or 89, or "80;90"
#                  (default: llama.cpp's own list of architectures, much slower to build)
#   --metal        build llama.cpp with Metal (Apple silicon)
#   --jobs N       parallel compile jobs (default: all cores)
#   --rebuild      build llama-cpp-python even if this backend's build of it is already installed
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$PWD/smallfour-venv"
ACTIVE=0
PYTHON=python3
BACKEND=cpu
CMAKE_FLAGS=""
JOBS="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 4)"
REBUILD=0
SYSTEM_SITE=@SYSTEM_SITE@  # 1: the bundle left out packages the target already has; the venv must see them

die() { echo "error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --venv) [ $# -ge 2 ] || die "--venv needs a directory"; VENV="$2"; shift 2 ;;
    --active) ACTIVE=1; shift ;;
    --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON="$2"; shift 2 ;;
    --cuda)
      BACKEND=cuda; CMAKE_FLAGS="-DGGML_CUDA=on"; shift
      if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
        ARCH="${1//sm_/}"; CMAKE_FLAGS="$CMAKE_FLAGS -DCMAKE_CUDA_ARCHITECTURES=$ARCH"; BACKEND="cuda-$ARCH"; shift
      fi ;;
    --metal) BACKEND=metal; CMAKE_FLAGS="-DGGML_METAL=on"; shift ;;
    --jobs) [ $# -ge 2 ] || die "--jobs needs a number"; JOBS="$2"; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see ./install.sh --help)" ;;
  esac
done

command -v "$PYTHON" >/dev/null || die "$PYTHON not found (give --python)"
HAVE="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
[ "$HAVE" = "@PYTHON@" ] \
  || die "$PYTHON is Python $HAVE; the bundle's wheels are for Python @PYTHON@ (bundle with --python-version $HAVE)"
command -v cmake >/dev/null || die "CMake is needed to build llama.cpp (install cmake >= 3.21)"
if [ "${BACKEND%%-*}" = cuda ]; then
  command -v nvcc >/dev/null || [ -n "${CUDACXX:-}" ] || [ -x /usr/local/cuda/bin/nvcc ] \
    || die "--cuda needs the CUDA toolkit's nvcc (on PATH, in CUDACXX, or /usr/local/cuda/bin)"
  command -v nvcc >/dev/null || [ -n "${CUDACXX:-}" ] || export CUDACXX=/usr/local/cuda/bin/nvcc
fi

# pip stays off the network whatever the environment says.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS

if [ "$ACTIVE" = 1 ]; then
  PY="$PYTHON"
else
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    if [ "$SYSTEM_SITE" = 1 ]; then
      "$PYTHON" -m venv --system-site-packages "$VENV"
      # A PYTHON that is itself a venv: the new venv would see the interpreter's base install, not
      # the packages the bundle left out because PYTHON has them; a .pth file adds PYTHON's own site-packages.
      parent="$("$PYTHON" -c 'import sys, sysconfig
if sys.prefix != sys.base_prefix: print(*dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib")), sep="\n")')"
      if [ -n "$parent" ]; then
        printf '%s\n' "$parent" > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_smallfour_parent_env.pth"
      fi
    else
      "$PYTHON" -m venv "$VENV"
    fi
  fi
  PY="$VENV/bin/python"
fi
PIP=("$PY" -m pip install --no-index --find-links "$HERE/wheels")
PREFIX="$("$PY" -c 'import sys; print(sys.prefix)')"
MARK="$PREFIX/.smallfour-llama-cpp-build"
WANT="@PIN@ $BACKEND $CMAKE_FLAGS"

installed="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true)"
if [ "$REBUILD" = 0 ] && [ "$installed" = "@PIN@" ] && [ -f "$MARK" ] && [ "$(cat "$MARK")" = "$WANT" ]; then
  echo "llama-cpp-python @PIN@ ($BACKEND) is already built in $PREFIX (--rebuild to build it again)"
else
  echo "building llama-cpp-python @PIN@ for $BACKEND with $JOBS jobs (CMAKE_ARGS=\"$CMAKE_FLAGS\"; minutes)"
  "${PIP[@]}" -r "$HERE/@BUILD_REQUIREMENTS@"
  rm -f "$MARK"
  CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
    "${PIP[@]}" --no-build-isolation --no-cache-dir --force-reinstall --no-deps "$HERE/@SDIST@"
  echo "$WANT" > "$MARK"
fi
echo "installing smallfour"
if [ "$ACTIVE" = 0 ]; then
  # The venv takes the bundle's version of every package the bundle carries, also where PYTHON's own packages
  # would satisfy a requirement: what was resolved together is what runs (PYTHON fills only what was left out).
  "${PIP[@]}" --no-deps "$HERE"/wheels/*.whl
fi
"${PIP[@]}" --force-reinstall --no-deps "$HERE/wheels/@WHEEL@"
"${PIP[@]}" "$HERE/wheels/@WHEEL@"
"$PY" -c 'import llama_cpp, smallfour.model'  # the library loads and llama.cpp's shared library with it
SMALLFOUR="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/smallfour"
"$SMALLFOUR" --version
echo "installed: $SMALLFOUR  (next: $SMALLFOUR demo, then $SMALLFOUR doctor --check-gpu)"
""".replace("@BUILD_REQUIREMENTS@", BUILD_REQUIREMENTS)
