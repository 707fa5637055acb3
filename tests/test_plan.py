"""The planner: byte accounting (GGUF, config, the real model), KV and compute buffers against
llama.cpp's own allocation, placement on every built-in profile, and the `plan` CLI."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from dataclasses import replace

import pytest
from gguf import GGUFReader

from conftest import DENSE_SHARED, HF, NATIVE
from smallfour import hardware as hw
from smallfour import inventory
from smallfour.hardware import PROFILES, GiB, detect_hardware, profile
from smallfour.inventory import load_config, model_from_config, model_from_gguf, real_model
from smallfour.planner import (GB, GPU_RUNTIME_BYTES, MMPROJ_ESTIMATE_BYTES, VISION_COMPUTE_BYTES, Settings,
                            compute_bytes, kv_bytes_per_token, plan, plan_for_load)
from helpers import assert_one_line_error, run_cli

REFERENCE_CTX = 262144  # the 256K context Mistral serves
# The brief's sizes are decimal: BF16 ≈238 GB is 119e9 parameters × 2 bytes.
BRIEF_BF16_BYTES = 238e9
BRIEF_Q8_0_BYTES = 126e9
BRIEF_KV_BYTES_PER_TOKEN = 23040


def _weights_on_devices(p) -> int:
    return sum(sum(d.weights.values()) for d in p.devices)


# --- byte accounting ----------------------------------------------------------------------


@pytest.mark.parametrize("spec", [HF, DENSE_SHARED])
def test_every_gguf_byte_is_placed_exactly_once(converted, spec):
    model = model_from_gguf(converted(spec, "q8_0"))
    assert sum(model.bytes_by_role().values()) == model.weights_bytes
    # GPUs from too small for anything to roomy: all on CPU, experts of the first layers in RAM, all on GPU.
    settings = Settings(n_ctx=4096)
    fixed = GPU_RUNTIME_BYTES + compute_bytes(model, settings, holds_output=True)
    expert_layer = sum(t.nbytes for t in model.tensors if t.role == "routed_experts") // spec.n_layers
    layouts = set()
    for extra in range(0, model.weights_bytes, expert_layer // 2):
        gpu = hw.Device("GPU0", "gpu", int((fixed + extra) / (1 - hw.GPU_HEADROOM)), 1e12)
        p = plan(model, hw.Hardware("test", (gpu,), PROFILES["cpu-96GB"].ram), settings)
        assert _weights_on_devices(p) == model.weights_bytes
        assert p.devices[0].fits
        layouts.add((p.layout.gpu_start, p.layout.cpu_experts))
    assert (spec.n_layers + 1, 0) in layouts and (0, 0) in layouts  # CPU only; all on GPU
    assert any(start == 0 and 0 < experts for start, experts in layouts), layouts  # experts in RAM


# Conversions the other test files make too, so a full run converts nothing extra.
@pytest.mark.parametrize("spec,recipe", [(HF, "q8_0"), (NATIVE, "f32"), (DENSE_SHARED, "q8_0")])
def test_config_inventory_matches_the_converted_gguf(checkpoint, converted, spec, recipe):
    """Planning from config.json / params.json predicts every tensor of the GGUF convert writes."""
    from_config = model_from_config(load_config(checkpoint(spec)), recipe)
    from_gguf = model_from_gguf(converted(spec, recipe))
    predicted = {t.name: (t.nbytes, t.qtype, t.role, t.layer) for t in from_config.tensors}
    actual = {t.name: (t.nbytes, t.qtype, t.role, t.layer) for t in from_gguf.tensors}
    assert predicted == actual
    assert (from_config.kv_width, from_config.n_layers) == (from_gguf.kv_width, from_gguf.n_layers)


@pytest.mark.parametrize("recipe,brief_bytes", [("bf16", BRIEF_BF16_BYTES), ("q8_0", BRIEF_Q8_0_BYTES)])
def test_real_model_totals_match_the_brief(recipe, brief_bytes):
    model = real_model(recipe)
    assert abs(model.weights_bytes - brief_bytes) / brief_bytes < 0.02, model.weights_bytes / GB
    parameters = sum(math.prod(t.shape) for t in model.tensors)
    assert abs(parameters - 119e9) / 119e9 < 0.01
    roles = model.bytes_by_role()
    assert roles["routed_experts"] / model.weights_bytes > 0.96  # "≈97% of all weights"


def test_real_model_kv_cache_matches_the_brief():
    model = real_model("bf16")
    assert kv_bytes_per_token(model, "f16") == BRIEF_KV_BYTES_PER_TOKEN
    at_256k = plan(model, PROFILES["4xH100"], Settings(n_ctx=REFERENCE_CTX)).kv_bytes
    assert at_256k == REFERENCE_CTX * BRIEF_KV_BYTES_PER_TOKEN and abs(at_256k / GB - 6.0) < 0.1
    assert kv_bytes_per_token(model, "q8_0") == 36 * 320 // 32 * 34


def _load_in_llama_cpp(path, n_ctx: int, kv_type: str) -> tuple[str, int, int]:
    """llama.cpp's log of loading `path`, and its own count of weight bytes and parameters."""
    import llama_cpp

    from smallfour.model import Model

    # The runtime routes llama.cpp's log through Python's sys.stderr when verbose.
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        llm = Model.load(path, n_ctx=n_ctx, verbose=True, kv_type=kv_type)
        size, params = llama_cpp.llama_model_size(llm.model_pointer), llama_cpp.llama_model_n_params(llm.model_pointer)
        llm.close()
    return captured.getvalue(), size, params


def _mib(log: str, pattern: str) -> float:
    match = re.search(pattern, log)
    assert match, f"no {pattern!r} in llama.cpp's log"
    return float(match.group(1)) * 2**20


# Contexts that are not whole 256-cell blocks (40000 → 40192, 1000 → 1024 cells) as well as ones that are.
@pytest.mark.parametrize("spec,kv_type,n_ctx", [(HF, "f16", 65536), (DENSE_SHARED, "f16", 40000), (HF, "f32", 16384),
                                                (DENSE_SHARED, "f32", 1000)])
def test_weights_kv_and_compute_bytes_match_llama_cpp(converted, spec, kv_type, n_ctx):
    path = converted(spec, "q8_0")
    log, llama_weight_bytes, llama_params = _load_in_llama_cpp(path, n_ctx, kv_type)
    # "llama_kv_cache: size = 11.04 MiB ( 40192 cells, 3 layers, 1/1 seqs), K (f16): 11.04 MiB, V (f16): 0.00 MiB"
    kv_line = re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers.*"
                        r"K \((\w+)\):\s*([\d.]+) MiB, V \(\w+\):\s*([\d.]+) MiB", log)
    assert kv_line, "no KV cache line in llama.cpp's log"
    kv_mib, cells, layers, k_type, k_mib, v_mib = kv_line.groups()
    compute_allocated = _mib(log, r"CPU compute buffer size =\s*([\d.]+) MiB")
    flash = re.search(r"flash_attn\s*=\s*(\w+)", log).group(1) == "enabled"

    model = model_from_gguf(path)
    # The GGUF's byte accounting is exactly llama.cpp's sum over the tensors it loaded.
    assert model.weights_bytes == llama_weight_bytes
    assert sum(math.prod(t.shape) for t in model.tensors) == llama_params
    settings = Settings(n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash)
    p = plan(model, PROFILES["cpu-96GB"], settings)
    # The KV cache exactly: llama.cpp's cell count (padded to 256), its layers and type, and the bytes
    # as far as its log prints them (MiB to 2 decimals); MLA caches the latent as K and no V.
    assert (int(cells), int(layers), k_type) == (settings.kv_cells, model.n_layers, kv_type)
    assert p.kv_bytes == int(cells) * kv_bytes_per_token(model, kv_type)
    assert f"{p.kv_bytes / 2**20:.2f}" == kv_mib == k_mib and float(v_mib) == 0
    # Measured 0.18-0.56 % over these four loads and n_ctx 1000-65536 (f16 and f32): the docstring's 1 %.
    estimate = p.devices[-1].other["compute buffer"]
    assert abs(estimate - compute_allocated) / compute_allocated < 0.01, (estimate, compute_allocated)


# --- placement on the built-in profiles ------------------------------------------------------


@pytest.mark.parametrize("recipe", ["bf16", "q8_0"])
def test_reference_4xh100_holds_everything_on_gpu_at_256k(recipe):
    p = plan(real_model(recipe), profile("4xH100"), Settings(n_ctx=REFERENCE_CTX))
    assert p.fits, p.verdict
    params = p.llama_params
    assert params["n_gpu_layers"] == 37 and params["cpu_experts"] == 0 and params["override_tensor"] == []
    assert len(params["tensor_split"]) == 4 and sum(params["tensor_split"]) == 37
    assert params["n_ctx"] == REFERENCE_CTX and params["flash_attn"] is True
    ram = p.devices[-1]
    assert set(ram.weights) == {"embeddings"}  # llama.cpp keeps only the input layer on the CPU
    gpus = p.devices[:-1]
    assert all(d.fits and d.layers for d in gpus) and gpus[-1].holds_output
    assert sum(d.other["KV cache (f16)"] for d in gpus) == p.kv_bytes
    assert max(d.used_bytes for d in gpus) - min(d.used_bytes for d in gpus) < 2 * GiB  # balanced


@pytest.mark.parametrize("name", list(PROFILES))
@pytest.mark.parametrize("recipe", ["bf16", "q8_0", "q4_k"])
def test_every_profile_plans_consistently(name, recipe):
    model = real_model(recipe)
    p = plan(model, PROFILES[name], Settings(n_ctx=32768))
    assert _weights_on_devices(p) == model.weights_bytes
    assert p.fits == all(d.used_bytes <= d.device.usable_bytes for d in p.devices)
    assert p.verdict.startswith("fits" if p.fits else "does not fit")
    placed = [layer for d in p.devices for layer in d.expert_layers]
    assert sorted(placed) == list(range(36))  # each layer's experts live in exactly one place
    est = p.decode_estimate()
    assert 0 < est["tokens_per_s_full_context"] <= est["tokens_per_s"] < est["ceiling_tokens_per_s"]


def test_24gb_gpu_keeps_the_first_expert_layers_in_ram():
    model = real_model("q8_0")
    p = plan(model, profile("24GB+128GB"), Settings(n_ctx=32768))
    assert p.fits, p.verdict
    n = p.llama_params["cpu_experts"]
    assert 0 < n < 36 and p.llama_params["n_gpu_layers"] == 37
    gpu, ram = p.devices
    assert ram.expert_layers == list(range(n)) and gpu.expert_layers == list(range(n, 36))
    assert gpu.used_bytes > 0.8 * gpu.device.usable_bytes  # the GPU is filled before RAM is used
    # The override is llama.cpp's --n-cpu-moe N: exactly the routed experts of layers 0…N-1.
    [override] = p.llama_params["override_tensor"]
    pattern, device = override.rsplit("=", 1)
    assert device == "CPU"
    matched = {t.name for t in model.tensors if re.search(pattern, t.name)}
    assert matched == {t.name for t in model.tensors if t.role == "routed_experts" and t.layer < n}
    # Decode is bound by the experts read from dual-channel DDR5: the brief's ~40 tok/s ceiling at 4.5 bpw.
    q4 = plan(real_model("q4_k"), profile("24GB+128GB"), Settings(n_ctx=4096)).decode_estimate()
    assert 25 < q4["ceiling_tokens_per_s"] < 60


def test_decode_estimate_reads_active_experts_only():
    p = plan(real_model("bf16"), profile("4xH100"), Settings(n_ctx=REFERENCE_CTX))
    est = p.decode_estimate()
    # ≈3.6B expert weights + ≈2.5B always-active weights per token, 2 bytes each.
    assert abs(est["bytes_per_token"] - 6.1e9 * 2) / (6.1e9 * 2) < 0.05
    assert est["ceiling_tokens_per_s"] == pytest.approx(4 * 3.35e12 / 4 / est["bytes_per_token"], rel=0.01)
    q8 = plan(real_model("q8_0"), profile("4xH100"), Settings(n_ctx=REFERENCE_CTX)).decode_estimate()
    assert 200 < q8["ceiling_tokens_per_s"] < 1000  # "several hundred"


def _apply(suggestion: str, model, settings, hardware):
    flag, value = suggestion.split()[:2]
    if flag == "--recipe":
        return inventory.retyped(model, value), settings, hardware
    if flag == "--ctx":
        return model, replace(settings, n_ctx=int(value)), hardware
    if flag == "--kv-type":
        return model, replace(settings, kv_type=value), hardware
    assert flag == "--ram", suggestion
    return model, settings, hw.hardware_from_specs([], value, hardware)


@pytest.mark.parametrize("name,recipe,n_ctx,first_change", [
    ("cpu-96GB", "bf16", 32768, "--recipe q5_k"),
    ("24GB+128GB", "bf16", 32768, "--recipe q8_0"),
    ("cpu-96GB", "q4_k", 1048576, "--kv-type q8_0"),
    ("24GB+128GB", "q8_0", 1048576, "--ctx 524288"),
])
def test_too_small_reports_the_smallest_change_that_fits(name, recipe, n_ctx, first_change):
    model, settings, hardware = real_model(recipe), Settings(n_ctx=n_ctx), profile(name)
    p = plan(model, hardware, settings)
    assert not p.fits
    assert p.verdict.startswith("does not fit") and f"Smallest change that fits: {first_change}" in p.verdict
    assert p.suggestions[0].startswith(first_change)
    for suggestion in p.suggestions:
        m, s, hw = _apply(suggestion, model, settings, hardware)
        assert plan(m, hw, s).fits, suggestion


def test_plan_for_load_gives_runtime_parameters(converted):
    p = plan_for_load(converted(HF, "q8_0"), n_ctx=8192, kv_type="f16", hardware=profile("cpu-96GB"))
    assert p.fits and p.verdict.startswith("fits")
    assert p.llama_params["n_gpu_layers"] == 0 and p.llama_params["n_ctx"] == 8192
    local = plan_for_load(converted(HF, "q8_0"), n_ctx=4096)
    assert local.hardware.name == "local"


def test_detect_hardware_reads_this_machine():
    import llama_cpp

    hardware = detect_hardware()
    if not llama_cpp.llama_supports_gpu_offload():
        assert hardware.gpus == ()
    mem_total = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1)) * 1024
    assert 0 < hardware.ram.capacity_bytes <= mem_total


def test_machine_probes(tmp_path):
    import os
    import shutil

    assert 1 <= hw.physical_cores() <= os.cpu_count()
    assert 0 < hw.mem_available() == hw.memory().available <= hw.memory().total
    not_yet = tmp_path / "a" / "b.gguf"  # where a download would go: its nearest existing folder counts
    assert abs(hw.disk_free(not_yet) - shutil.disk_usage(tmp_path).free) < 0.05 * shutil.disk_usage(tmp_path).total


def test_hardware_specs_parse():
    assert hw.parse_gpu("h100", 0).capacity_bytes == 81559 * 2**20
    gpu = hw.parse_gpu("24GB@936GB/s", 1)
    assert gpu.capacity_bytes == 24 * GiB and gpu.bandwidth == 936e9 and gpu.name.startswith("GPU1")
    assert hw.parse_ram("256GB@300GB/s").bandwidth == 300e9
    edited = hw.hardware_from_specs(["h200", "h200"], None, profile("cpu-96GB"))
    assert len(edited.gpus) == 2 and edited.ram == profile("cpu-96GB").ram


# --- the CLI ------------------------------------------------------------------------------


def test_cli_json_schema_for_the_reference():
    result = run_cli("plan", "--model", "mistral-small-4", "--recipe", "q8_0", "--profile", "4xH100",
                     "--ctx", REFERENCE_CTX, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["fits"] is True and isinstance(info["weights_bytes"], int) and isinstance(info["kv_bytes"], int)
    assert info["kv_bytes"] == REFERENCE_CTX * BRIEF_KV_BYTES_PER_TOKEN
    assert [d["kind"] for d in info["devices"]] == ["gpu"] * 4 + ["cpu"]
    for device in info["devices"]:
        assert {"name", "kind", "capacity_bytes", "used_bytes"} <= set(device)
        assert all(isinstance(device[k], int) for k in ("capacity_bytes", "used_bytes"))
    assert {"n_gpu_layers", "tensor_split", "split_mode", "main_gpu", "cpu_experts", "override_tensor", "n_ctx",
            "kv_type", "flash_attn"} <= set(info["llama_params"])
    assert info["decode"]["tokens_per_s"] > 0 and info["assumptions"]["gpu_bandwidth_efficiency"] > 0


def test_cli_not_fitting_exits_3_with_a_change(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(inventory.real_hf_config()))
    result = run_cli("plan", "--config", config, "--recipe", "bf16", "--profile", "cpu-96GB", "--json")
    assert result.returncode == 3, result.stderr
    info = json.loads(result.stdout)
    assert info["fits"] is False and info["suggestions"] and "Smallest change" in info["verdict"]
    assert abs(info["weights_bytes"] - BRIEF_BF16_BYTES) / BRIEF_BF16_BYTES < 0.02


def test_cli_plans_a_gguf_and_prints_tables(converted):
    path = converted(DENSE_SHARED, "q8_0")
    info = json.loads(run_cli("plan", path, "--json", "--ctx", "8192").stdout)
    assert info["weights_bytes"] == sum(int(t.n_bytes) for t in GGUFReader(path).tensors)
    table = run_cli("plan", "--model", "mistral-small-4", "--recipe", "q8_0", "--profile", "24GB+128GB",
                    "--ctx", "32768")
    assert table.returncode == 0, table.stderr
    for word in ("GPU0 RTX 4090", "CPU RAM 128 GiB", "routed experts (layers 0–", "KV cache (f16)", "cpu_experts",
                 "--cpu-experts", "tokens/s", "fits:"):
        assert word in table.stdout, word


def test_cli_help_lists_every_profile_and_errors_are_one_line():
    help_text = run_cli("plan", "--help").stdout
    for name in PROFILES:
        assert name in help_text.replace("\n", " ").replace("│", ""), name
    assert_one_line_error(run_cli("plan", "--profile", "4xH100"), "exactly one of")
    assert_one_line_error(run_cli("plan", "--model", "mistral-small-4", "--profile", "8xB200"), "unknown hardware")


def test_the_vision_projector_is_counted_where_libmtmd_loads_it():
    model, mmproj = real_model("q8_0"), MMPROJ_ESTIMATE_BYTES
    with_gpu = plan(model, profile("4xH100"), Settings(mmproj_bytes=mmproj))
    assert with_gpu.devices[0].other["mmproj (vision)"] == mmproj + VISION_COMPUTE_BYTES
    assert all("mmproj (vision)" not in d.other for d in with_gpu.devices[1:])
    cpu_only = plan(model, profile("cpu-96GB"), Settings(mmproj_bytes=mmproj), suggest=False)
    assert cpu_only.devices[-1].other["mmproj (vision)"] == mmproj + VISION_COMPUTE_BYTES
