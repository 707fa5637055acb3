"""`smallfour plan --engine vllm|sglang`: the datacenter serve command for the FP8 release.

The expected numbers are recomputed here from the built-in inventory (parameter counts by
role, the MLA cache per token) and the stated assumptions of `smallfour.scale`, then read
back out of the printed command line, for the two reference profiles, a GPU pair whose
KV room is below the 256K cap, and hardware that cannot hold the model.
"""

from __future__ import annotations

import math

import pytest

from helpers import assert_one_line_error, run_cli
from smallfour import scale
from smallfour.hardware import profile
from smallfour.inventory import real_model
from smallfour.planner import MMPROJ_ESTIMATE_BYTES

GiB = 1024**3
BRIEF_KV_BYTES_PER_TOKEN = 23040  # 36 layers × (256 latent + 64 rope) × 2 bytes
MISTRAL_CONTEXT = 262144


def expected(gpu_bytes: int, n_gpus: int) -> tuple[int, int, int] | None:
    """(tensor parallel, data parallel, max model len), or None: no size fits."""
    model = real_model()
    fp8 = {"attention", "shared_expert", "routed_experts"}
    params = {}
    for t in model.tensors:
        params[t.role] = params.get(t.role, 0) + math.prod(t.shape)
    weights = sum(n * (1 if role in fp8 else 2) for role, n in params.items()) + MMPROJ_ESTIMATE_BYTES
    tp = 1
    while tp <= n_gpus:
        free = int(gpu_bytes * scale.GPU_MEMORY_UTILIZATION) - math.ceil(weights / tp) - scale.ENGINE_OVERHEAD_BYTES
        tokens = free // BRIEF_KV_BYTES_PER_TOKEN  # the whole cache on every rank
        if tokens >= scale.MIN_CONTEXT:
            return tp, n_gpus // tp, min(MISTRAL_CONTEXT, tokens // 1024 * 1024)
        tp *= 2
    return None


def test_fp8_weights_are_the_release_size():
    """The counts behind every command: ≈119e9 parameters, ≈120 GB as Mistral publishes the FP8 release."""
    weights = scale.fp8_weights_bytes(real_model())
    assert 119e9 < weights < 123e9, weights / 1e9


def _flag(command: list[str], name: str) -> int:
    return int(command[command.index(name) + 1])


@pytest.mark.parametrize("name", ["4xH100", "2xH200"])
def test_vllm_command_for_a_profile(name):
    hardware = profile(name)
    want = expected(hardware.gpus[0].capacity_bytes, len(hardware.gpus))
    result = run_cli("plan", "--engine", "vllm", "--profile", name)
    assert result.returncode == 0, result.stderr
    command = result.stdout.splitlines()[-1].split()
    assert command[:3] == ["vllm", "serve", scale.FP8_REPO]
    data_parallel = _flag(command, "--data-parallel-size") if "--data-parallel-size" in command else 1
    got = (_flag(command, "--tensor-parallel-size"), data_parallel, _flag(command, "--max-model-len"))
    assert got == want
    # 120 GB cannot sit on one 80 GB H100; on H200s one GPU holds it and the other is a second replica.
    assert got[0] == {"4xH100": 2, "2xH200": 1}[name]
    joined = " ".join(command)
    for flags in ("--tokenizer-mode mistral --config-format mistral --load-format mistral",
                  "--reasoning-parser mistral", "--enable-auto-tool-choice", "--tool-call-parser mistral"):
        assert flags in joined


def test_sglang_command_and_a_context_below_the_cap():
    """Two 70 GiB GPUs: the weights fit at tensor parallel 2, the KV room left holds fewer than 256K tokens."""
    want = expected(70 * GiB, 2)
    assert want is not None and scale.MIN_CONTEXT <= want[2] < MISTRAL_CONTEXT
    result = run_cli("plan", "--engine", "sglang", "--gpu", "70GB", "--gpu", "70GB")
    assert result.returncode == 0, result.stderr
    command = result.stdout.splitlines()[-1].split()
    assert command[:5] == ["python", "-m", "sglang.launch_server", "--model-path", scale.FP8_REPO]
    assert "--dp" not in command
    assert (_flag(command, "--tp"), 1, _flag(command, "--context-length")) == want
    assert "--reasoning-parser mistral --tool-call-parser mistral" in " ".join(command)


@pytest.mark.parametrize("name", ["1xH100+256GB", "cpu-96GB"])
def test_a_profile_that_cannot_hold_it_says_so_and_exits_3(name):
    hardware = profile(name)
    if hardware.gpus:
        assert expected(hardware.gpus[0].capacity_bytes, len(hardware.gpus)) is None
    for engine in scale.ENGINES:
        result = run_cli("plan", "--engine", engine, "--profile", name)
        assert result.returncode == 3, result.stderr
        assert result.stdout.splitlines() == [result.stdout.strip()] and "does not fit" in result.stdout
        assert name in result.stdout


def test_engine_errors_are_one_line():
    assert_one_line_error(run_cli("plan", "--engine", "tgi", "--profile", "4xH100"), "unknown engine", "vllm")
    assert_one_line_error(run_cli("plan", "--engine", "vllm", "--model", "mistral-small-4", "--profile", "4xH100"),
                          "no model")
