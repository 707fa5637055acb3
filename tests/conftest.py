"""Shared fixtures: tiny checkpoints (cached on disk by content hash), their GGUFs, the hub stub, a tmux terminal."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Fixture checkpoints live in the repo's own cache so a test session reuses them.
os.environ.setdefault("SMALLFOUR_CACHE", str(REPO / ".cache"))

from smallfour.fixtures.checkpoint import FixtureSpec, build_fixture  # noqa: E402

HF = FixtureSpec()
NATIVE = FixtureSpec(layout="native")
FP8_TENSOR = FixtureSpec(fp8="tensor")
FP8_EXPERT = FixtureSpec(fp8="expert")
FP8_BLOCK = FixtureSpec(fp8="block")
NATIVE_FP8 = FixtureSpec(layout="native", fp8="tensor")
DENSE_SHARED = FixtureSpec(first_dense_layers=1, n_shared_experts=2, n_layers=3)
# Positions up to 40 run far past an original context of 8: YaRN and llama-4 query scaling at work.
SHORT_ROPE = FixtureSpec(rope_original_context=8)


@pytest.fixture(scope="session")
def checkpoint():
    """`checkpoint(spec)` → directory of that fixture checkpoint."""
    return build_fixture


@pytest.fixture(scope="session")
def converted(tmp_path_factory, checkpoint):
    """`converted(spec, recipe)` → GGUF path, converted once per session."""
    from convert.writer import convert_checkpoint

    made: dict[tuple[FixtureSpec, str], Path] = {}
    root = tmp_path_factory.mktemp("gguf")

    def convert(spec: FixtureSpec, recipe: str = "f32") -> Path:
        key = (spec, recipe)
        if key not in made:
            path = root / f"{spec.name}-{recipe}.gguf"
            convert_checkpoint(checkpoint(spec), path, recipe)
            made[key] = path
        return made[key]

    return convert


@pytest.fixture
def hub():
    """A stand-in for the Hugging Face Hub on loopback (tests/hub_stub.py)."""
    from hub_stub import HubStub

    stub = HubStub()
    yield stub
    stub.close()


@pytest.fixture
def env(tmp_path, hub):
    """Environment for a smallfour child process that talks to `hub` and keeps its caches in tmp_path."""
    from hub_stub import smallfour_env

    return smallfour_env(tmp_path, hub)


@pytest.fixture
def terminal(tmp_path):
    """`terminal(*chat_args)` → a tmux pane running `smallfour chat` (tests/helpers.py: Terminal)."""
    from helpers import Terminal

    opened: list[Terminal] = []
    env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
    env.update(LANG="C.UTF-8", LC_ALL="C.UTF-8", SMALLFOUR_HOME=str(tmp_path / "home"))

    def start(*args: str) -> Terminal:
        chat = shlex.join([sys.executable, "-m", "smallfour", "chat", *map(str, args)])
        # The shell reports the REPL's exit status, then keeps the pane open for capture-pane.
        command = f"{chat}; echo \"[exited $?]\"; sleep 600"
        term = Terminal(f"smallfour-test-{os.getpid()}-{len(opened)}", command, env)
        opened.append(term)
        return term

    yield start
    for term in opened:
        term.close()
