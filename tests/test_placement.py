"""Expert offload and tensor overrides, checked in llama.cpp's own log on this CPU build."""

from __future__ import annotations

import json
import re

import pytest
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from conftest import DENSE_SHARED, HF
from helpers import assert_one_line_error, run_cli

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


@pytest.mark.parametrize("cpu_experts", [1, 2, 10, 19, 35])
def test_cpu_experts_pins_exactly_what_the_planner_counts(cpu_experts):
    """`--cpu-experts N` matches the expert tensors of layers 0…N-1 and no others (blk.1 never matches blk.1x)."""
    from smallfour.placement import expert_overrides
    from smallfour.inventory import real_model
    from smallfour.planner import CPU, Layout

    model = real_model("q8_0")
    (pattern, device), = expert_overrides(str(cpu_experts), model.n_layers)
    layout = Layout(gpu_start=0, cpu_experts=cpu_experts, layers_per_gpu=(model.n_layers + 1,))
    in_ram = {t.name for t in model.tensors if t.role == "routed_experts" and layout.device_of(t, model.n_layers) == CPU}
    assert {t.name for t in model.tensors if re.search(pattern, t.name)} == in_ram  # llama.cpp uses regex_search
    assert device == "CPU" and len(in_ram) == 2 * cpu_experts


def test_planned_override_moves_the_bytes_the_plan_puts_in_ram():
    from smallfour.hardware import profile
    from smallfour.inventory import real_model
    from smallfour.planner import Settings, plan

    model = real_model("q8_0")
    p = plan(model, profile("24GB+128GB"), Settings(n_ctx=32768))
    (override,) = p.llama_params["override_tensor"]
    pattern, _, device = override.rpartition("=")
    pinned = sum(t.nbytes for t in model.tensors if re.search(pattern, t.name))
    assert device == "CPU" and p.layout.cpu_experts and pinned == p.devices[-1].weights["routed_experts"]


def test_power_user_override(converted):
    model = converted(HF, "q8_0")
    moved = overridden(model, "-ot", r"attn_kv_a_mqa=CPU", "--override-tensor", r"^output\.=CPU")
    assert set(moved) == {"output.weight"} | {f"blk.{i}.attn_kv_a_mqa.weight" for i in range(HF.n_layers)}


def test_override_regex_may_contain_equals():
    """The device follows the last `=`: a lookahead `(?=…)` or a literal `=` stays in the pattern."""
    from smallfour.placement import parse_override

    assert parse_override(r"blk\.(?=1\.)\d+\.ffn_.*=CPU") == (r"blk\.(?=1\.)\d+\.ffn_.*", "CPU")
    assert parse_override("a=b=CUDA0") == ("a=b", "CUDA0")


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
    (("--kv-type", "q8_0", "--flash-attn"), "cached width (48) to be a multiple of 32"),
    (("--plan", "maybe"), "expected auto or check"),
])
def test_placement_errors(converted, flags, message):
    assert_one_line_error(run_cli("run", converted(HF, "q8_0"), "-p", "x", "-n", "1", *flags), message)


def test_gpus_on_a_cpu_build(converted):
    model = converted(HF, "q8_0")
    assert_one_line_error(run_cli("run", model, "-p", "x", "-n", "1", "--gpus", "1"), "sees 0 GPU(s)")
    cpu_only = run_cli("run", model, "-p", "x", "-n", "1", "--gpus", "0", "--json")
    assert cpu_only.returncode == 0 and json.loads(cpu_only.stdout)["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("flags", [("--plan", "auto"), ("--cpu-experts", "auto")])
def test_planned_placement_generates_the_same(converted, flags):
    model = converted(HF, "q8_0")
    common = ("run", model, "-p", "Quelle heure est-il ?", "-n", "12", "--temperature", "0", "--json")
    plain = json.loads(run_cli(*common).stdout)
    planned = run_cli(*common, *flags)
    assert planned.returncode == 0, planned.stderr
    assert "plan: --ctx 4096" in planned.stderr  # the planner's decision is shown as run flags
    assert json.loads(planned.stdout)["content"] == plain["content"]


def write_oversized_gguf(path) -> None:
    """A mistral4 GGUF header announcing 1 TiB of routed experts (the data is never written)."""
    writer = GGUFWriter(str(path), "mistral4")
    writer.add_block_count(1)
    writer.add_embedding_length(4096)
    writer.add_head_count(32)
    writer.add_kv_lora_rank(512)
    writer.add_rope_dimension_count(64)
    writer.add_expert_count(128)
    writer.add_expert_used_count(4)
    writer.add_expert_feed_forward_length(1 << 20)
    writer.add_vocab_size(1000)
    shape = (128, 1 << 20, 4096)
    writer.add_tensor_info("blk.0.ffn_down_exps.weight", shape, np.dtype(np.float16), 2 * int(np.prod(shape)),
                           raw_dtype=GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


@pytest.mark.parametrize("command", ["run", "chat", "batch"])
def test_a_model_that_cannot_fit_is_refused_before_loading(tmp_path, command):
    model = tmp_path / "oversized.gguf"
    write_oversized_gguf(model)
    args = {"run": ("-p", "hi"), "chat": (), "batch": (str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"))}
    (tmp_path / "in.jsonl").write_text("")
    assert_one_line_error(run_cli(command, model, *args[command]), "oversized.gguf: does not fit", "--force")
    assert not (tmp_path / "out.jsonl").exists()


def test_force_loads_past_the_planner(converted):
    from smallfour.errors import SmallfourError
    from smallfour.placing import placement_for
    from smallfour.hardware import Device, Hardware

    tiny = Hardware("tiny", (), Device("CPU RAM 1 MiB", "cpu", 1 << 20, 50e9))
    flags = dict(n_ctx=256, kv_type="f16", cpu_experts="none", override_tensor=None, gpu_layers=-1, gpus=None,
                 tensor_split=None, split_mode="layer", main_gpu=0, flash_attn=False, plan="check", hardware=tiny)
    model = converted(HF, "q8_0")
    with pytest.raises(SmallfourError, match="does not fit"):
        placement_for(model, force=False, **flags)
    assert placement_for(model, force=True, **flags).n_gpu_layers == -1


def test_quantized_kv_cache_needs_flash_attention(converted):
    from smallfour.errors import SmallfourError
    from smallfour.placement import Placement
    from smallfour.model import Model

    with pytest.raises(SmallfourError, match="needs --flash-attn"):
        Model.load(converted(HF, "q8_0"), kv_type="q8_0", placement=Placement(flash_attn=False))
