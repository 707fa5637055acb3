"""Expert offload and tensor overrides, checked in llama.cpp's own log on this CPU build."""

from __future__ import annotations

import json
import re

import pytest
from gguf import GGUFReader

from conftest import DENSE_SHARED, HF
from test_convert_errors import assert_one_line_error, run_cli

OVERRIDDEN = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")


def overridden(model, *flags: str) -> dict[str, str]:
    result = run_cli("run", model, "-p", "x", "-n", "1", "-v", *flags)
    assert result.returncode == 0, result.stderr
    return dict(OVERRIDDEN.findall(result.stderr))


def expert_tensors(model, layers=None) -> set[str]:
    names = {t.name for t in GGUFReader(model).tensors if re.search(r"ffn_(gate_up|down)_exps", t.name)}
    return {n for n in names if layers is None or int(n.split(".")[1]) in layers}


def test_all_experts_to_cpu_and_nothing_else(converted):
    model = converted(DENSE_SHARED, "q8_0")
    moved = overridden(model, "--cpu-experts", "all")
    assert set(moved) == expert_tensors(model) and len(moved) == 2 * (DENSE_SHARED.n_layers - 1)
    assert set(moved.values()) == {"CPU"}


def test_no_overrides_by_default(converted):
    model = converted(HF, "q8_0")
    assert overridden(model) == {}
    assert overridden(model, "--cpu-experts", "none") == {}


def test_first_n_layers_experts(converted):
    model = converted(DENSE_SHARED, "q8_0")
    # Layer 0 is dense: the first two layers hold only layer 1's experts.
    assert set(overridden(model, "--cpu-experts", "2")) == expert_tensors(model, layers={1})
    assert set(overridden(model, "--cpu-experts", "3")) == expert_tensors(model)


def test_power_user_override(converted):
    model = converted(HF, "q8_0")
    moved = overridden(model, "-ot", r"attn_kv_a_mqa=CPU", "--override-tensor", r"^output\.=CPU")
    assert set(moved) == {"output.weight"} | {f"blk.{i}.attn_kv_a_mqa.weight" for i in range(HF.n_layers)}


def test_generation_identical_with_and_without_overrides(converted):
    model = converted(HF, "q8_0")
    common = ("run", model, "-p", "Quelle heure est-il ?", "-n", "16", "--temperature", "0", "--json")
    plain = json.loads(run_cli(*common).stdout)
    offloaded = json.loads(run_cli(*common, "--cpu-experts", "all", "-ot", "token_embd=CPU").stdout)
    assert plain["content"] and plain["content"] == offloaded["content"]


@pytest.mark.parametrize(("flags", "message"), [
    (("--cpu-experts", "3"), "the model has 2 layers"),
    (("--cpu-experts", "some"), "expected all, none, auto or a number"),
    (("-ot", "ffn=CUDA7"), "unknown device 'CUDA7'"),
    (("-ot", "no-equals-sign"), "expected REGEX=DEVICE"),
    (("-ot", "ffn_(=CPU"), "invalid regex"),
    (("--tensor-split", "1,x"), "comma-separated numbers"),
    (("--split-mode", "diagonal"), "unknown split mode"),
    (("--kv-type", "q2_k"), "unknown KV cache type"),
])
def test_placement_errors(converted, flags, message):
    assert_one_line_error(run_cli("run", converted(HF, "q8_0"), "-p", "x", "-n", "1", *flags), message)


def test_gpus_on_a_cpu_build(converted):
    model = converted(HF, "q8_0")
    assert_one_line_error(run_cli("run", model, "-p", "x", "-n", "1", "--gpus", "1"), "sees 0 GPU(s)")
    cpu_only = run_cli("run", model, "-p", "x", "-n", "1", "--gpus", "0", "--json")
    assert cpu_only.returncode == 0 and json.loads(cpu_only.stdout)["usage"]["completion_tokens"] == 1
