"""Session-wide fixtures: tiny checkpoints (cached on disk by content hash) and their GGUFs."""

from __future__ import annotations

import os
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
