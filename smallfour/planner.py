"""Placement planning: will a model fit this machine, and how should llama.cpp lay it out?

The planner works before anything is loaded, from a GGUF's tensor table or — before
any download — from a checkpoint config plus a recipe. It takes the model's tensor
inventory (`smallfour.inventory`: name, role, layer, bytes), adds the MLA KV cache,
compute buffers, the vision projector and a runtime overhead, and places them on the
devices of a `smallfour.hardware.Hardware` the way llama.cpp will:

* the token embeddings always stay in CPU RAM (llama.cpp never offloads the input layer);
* each repeating layer, and the output layer after them, goes to one GPU; layers are
  split over GPUs in order (`tensor_split` counts), proportionally to free memory;
* a layer's KV cache lives with the layer;
* when the GPUs are too small, the routed experts of the FIRST N layers stay in CPU
  RAM (`cpu_experts` = N, llama.cpp's `--n-cpu-moe` convention): they are ≈97% of the
  weights but only 4 of 128 are read per token, so they cost the least speed there;
* only if even the always-active weights overflow do whole leading layers move to
  the CPU (`n_gpu_layers` below n_layers + 1).

Sizes: model files in decimal GB (the brief's ≈238 GB BF16 is 119e9 × 2 bytes);
hardware in binary GiB (`smallfour.hardware`: the devices a plan fills).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quant.names import ROLE_EMBEDDINGS, ROLE_ROUTED_EXPERTS
from smallfour.errors import SmallfourError
from smallfour.hardware import (A100_BANDWIDTH, CONSUMER_GPU_BANDWIDTH, CPU_EFFICIENCY, DDR5_DUAL_CHANNEL,
                                DDR5_SERVER_8CH, GPU_EFFICIENCY, GPU_HEADROOM, H100_BANDWIDTH, H200_BANDWIDTH,
                                RAM_HEADROOM, Device, GiB, Hardware, detect_hardware)
from smallfour.inventory import (RECIPE_LADDER, ModelInfo, TensorInfo, is_plan_only, mmproj_bytes, model_from_gguf,
                                 retyped)
from smallfour.placement import KV_TYPES, expert_overrides

# --- assumptions, all in one place ---------------------------------------------------------

GB = 10**9

# Fixed cost of a process on a device. GPU: CUDA context, cuBLAS workspace, the CUDA
# pool flash attention draws temporaries from, pipeline-parallel input copies.
# CPU: the interpreter, llama.cpp and its libraries, pinned host buffers, tokenizer.
GPU_RUNTIME_BYTES = 1 * GiB
CPU_RUNTIME_BYTES = 2 * GiB
# libmtmd's Pixtral encoder at 1540 px runs over ~12k patches; assumed (not measured)
# with its flash attention on.
VISION_COMPUTE_BYTES = 1 * GiB
# The real Pixtral projector in BF16, from the brief (used with `--vision` and no file).
MMPROJ_ESTIMATE_BYTES = int(0.8 * GB)

# llama.cpp rounds the context up to whole 256-cell blocks of KV cache (n_ctx 1000 → 1024).
KV_CELL_PADDING = 256
LOGIT_BYTES = 4  # logits and activations are f32
# For batches of ≥ 32 tokens llama.cpp runs the matmuls of CPU-resident experts on the
# first GPU (op_offload): the scheduler copies the weights into that GPU's compute
# buffer, gate_up and down of one layer together (one graph split).
OP_OFFLOAD_MIN_BATCH = 32


# --- memory beyond the weights ------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    n_ctx: int = 4096
    kv_type: str = "f16"
    n_batch: int = 512
    flash_attn: bool = True
    mmproj_bytes: int = 0

    @property
    def kv_cells(self) -> int:
        return math.ceil(self.n_ctx / KV_CELL_PADDING) * KV_CELL_PADDING

    @property
    def n_ubatch(self) -> int:
        return min(self.n_batch, self.n_ctx)


def kv_bytes_per_token_per_layer(model: ModelInfo, kv_type: str) -> int:
    """llama.cpp's MLA cache holds only the latent + rope key (K); V is a view of it and takes 0 bytes."""
    if kv_type not in KV_TYPES:
        raise SmallfourError(f"unknown KV cache type {kv_type!r}; choose one of {', '.join(KV_TYPES)}")
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(KV_TYPES[kv_type])]
    if model.kv_width % block:
        raise SmallfourError(f"KV type {kv_type} needs the cached width ({model.kv_width}) to be a multiple of {block}")
    return model.kv_width // block * size


def kv_bytes_per_token(model: ModelInfo, kv_type: str) -> int:
    return model.n_layers * kv_bytes_per_token_per_layer(model, kv_type)


def kv_layer_bytes(model: ModelInfo, settings: Settings) -> int:
    return settings.kv_cells * kv_bytes_per_token_per_layer(model, settings.kv_type)


def _activation_bytes(model: ModelInfo, settings: Settings) -> int:
    # Per-token intermediates of one layer, all f32: hidden states and residuals,
    # absorbed MLA queries/outputs per head, and the active experts' gate/up/down.
    per_token = (4 * model.hidden_size + 2 * model.n_heads * model.kv_width
                 + 3 * max(model.n_experts_used, 1) * model.expert_ff)
    return settings.n_ubatch * per_token * LOGIT_BYTES


def _attention_bytes(model: ModelInfo, settings: Settings) -> int:
    cells, ub = settings.kv_cells, settings.n_ubatch
    if settings.flash_attn:
        return cells * ub * 2  # only the f16 mask; scores stay in on-chip tiles
    # Without flash attention the scores of every head plus the f32 mask are materialized,
    # and V (the latent) is transposed into a contiguous f16 copy.
    return cells * ub * (model.n_heads + 1) * 4 + cells * model.kv_lora_rank * 2


def compute_bytes(model: ModelInfo, settings: Settings, *, holds_output: bool, holds_layers: bool = True) -> int:
    """llama.cpp's compute buffer on one device for a worst-case ubatch.

    The allocator reuses memory, so the peak is the larger of the output logits
    (vocab × ubatch f32) and the attention buffers, plus the other activations;
    on the CPU fixture this matches llama.cpp's "compute buffer size" within 1%.
    """
    if not holds_layers and not holds_output:
        return _activation_bytes(model, settings)
    logits = model.vocab_size * settings.n_ubatch * LOGIT_BYTES if holds_output else 0
    attention = _attention_bytes(model, settings) if holds_layers else 0
    return max(logits, attention) + _activation_bytes(model, settings)


# --- placement ----------------------------------------------------------------------------

CPU = -1  # device index of CPU RAM in a Layout; GPUs are 0, 1, …


@dataclass(frozen=True)
class Layout:
    """What llama.cpp is told: layers below gpu_start on CPU, experts of layers below cpu_experts on CPU,
    and the remaining layers (output layer last) split over the GPUs by these counts."""

    gpu_start: int
    cpu_experts: int
    layers_per_gpu: tuple[int, ...]

    def device_of_layer(self, layer: int) -> int:
        """GPU index of a repeating layer, or `n_layers` for the output layer; CPU if not offloaded."""
        if layer < self.gpu_start or not self.layers_per_gpu:
            return CPU
        position = layer - self.gpu_start
        for gpu, count in enumerate(self.layers_per_gpu):
            if position < count:
                return gpu
            position -= count
        return CPU

    def device_of(self, tensor: TensorInfo, n_layers: int) -> int:
        if tensor.role == ROLE_EMBEDDINGS:
            return CPU  # llama.cpp keeps the input layer on the CPU
        layer = n_layers if tensor.layer is None else tensor.layer
        if tensor.role == ROLE_ROUTED_EXPERTS and layer < self.cpu_experts:
            return CPU
        return self.device_of_layer(layer)


def _layer_sizes(model: ModelInfo, settings: Settings, gpu_start: int, cpu_experts: int) -> list[int]:
    """GPU bytes of each offloaded layer (weights kept there + its KV), the output layer last."""
    sizes = [0] * (model.n_layers + 1)
    for t in model.tensors:
        if t.role == ROLE_EMBEDDINGS:
            continue
        layer = model.n_layers if t.layer is None else t.layer
        if t.role == ROLE_ROUTED_EXPERTS and layer < cpu_experts:
            continue
        sizes[layer] += t.nbytes
    kv = kv_layer_bytes(model, settings)
    for layer in range(model.n_layers):
        sizes[layer] += kv
    # The logits buffer is needed only where the output layer runs: charge it to that layer.
    sizes[model.n_layers] += (compute_bytes(model, settings, holds_output=True)
                              - compute_bytes(model, settings, holds_output=False))
    return sizes[gpu_start:]


def _largest_cpu_expert_layer(model: ModelInfo, cpu_experts: int) -> int:
    """Bytes of the largest routed-expert layer kept in RAM: what op_offload copies to the GPU at once."""
    per_layer: dict[int, int] = {}
    for t in model.tensors:
        if t.role == ROLE_ROUTED_EXPERTS and t.layer is not None and t.layer < cpu_experts:
            per_layer[t.layer] = per_layer.get(t.layer, 0) + t.nbytes
    return max(per_layer.values(), default=0)


def _gpu_fixed_bytes(model: ModelInfo, settings: Settings, gpu: int, cpu_experts: int) -> dict[str, int]:
    """Everything on a GPU that is not a layer: runtime, compute buffer, projector, op-offload staging."""
    fixed = {"runtime overhead": GPU_RUNTIME_BYTES,
             "compute buffer": compute_bytes(model, settings, holds_output=False)}
    if gpu == 0 and settings.mmproj_bytes:
        fixed["mmproj (vision)"] = settings.mmproj_bytes + VISION_COMPUTE_BYTES
    if gpu == 0 and settings.n_ubatch >= OP_OFFLOAD_MIN_BATCH:
        staging = _largest_cpu_expert_layer(model, cpu_experts)
        if staging:
            fixed["expert staging (prompt batches)"] = staging
    return fixed


def _split_layers(sizes: list[int], budgets: list[int]) -> tuple[int, ...] | None:
    """Contiguous layer counts per GPU within budgets: proportional to budget if that fits, else greedy."""
    budgets = [max(b, 0) for b in budgets]
    total_budget = sum(budgets)
    if total_budget <= 0 or sum(sizes) > total_budget:
        return None
    for counts in (_proportional(sizes, budgets), _greedy(sizes, budgets)):
        if counts is not None and _within(sizes, counts, budgets):
            return counts
    return None


def _proportional(sizes: list[int], budgets: list[int]) -> tuple[int, ...]:
    total, total_budget = sum(sizes), sum(budgets)
    targets, running = [], 0
    for budget in budgets:
        running += budget
        targets.append(total * running / total_budget)
    counts, gpu, before = [0] * len(budgets), 0, 0
    for size in sizes:
        # A layer goes to the first GPU whose cumulative share covers its midpoint.
        while gpu < len(budgets) - 1 and before + size / 2 > targets[gpu]:
            gpu += 1
        counts[gpu] += 1
        before += size
    return tuple(counts)


def _greedy(sizes: list[int], budgets: list[int]) -> tuple[int, ...] | None:
    counts, gpu, used = [0] * len(budgets), 0, 0
    for size in sizes:
        while gpu < len(budgets) and used + size > budgets[gpu]:
            gpu, used = gpu + 1, 0
        if gpu == len(budgets):
            return None
        counts[gpu] += 1
        used += size
    return tuple(counts)


def _within(sizes: list[int], counts: tuple[int, ...], budgets: list[int]) -> bool:
    start = 0
    for count, budget in zip(counts, budgets):
        if sum(sizes[start:start + count]) > budget:
            return False
        start += count
    return True


def choose_layout(model: ModelInfo, settings: Settings, hardware: Hardware) -> Layout:
    """The layout with the most on GPU: fewest whole layers on CPU, then fewest expert layers on CPU."""
    n = model.n_layers
    if not hardware.gpus:
        return Layout(gpu_start=n + 1, cpu_experts=0, layers_per_gpu=())
    for gpu_start in range(n + 1):
        for cpu_experts in range(gpu_start, n + 1):
            budgets = [gpu.usable_bytes - sum(_gpu_fixed_bytes(model, settings, i, cpu_experts).values())
                       for i, gpu in enumerate(hardware.gpus)]
            counts = _split_layers(_layer_sizes(model, settings, gpu_start, cpu_experts), budgets)
            if counts is not None:
                return Layout(gpu_start, cpu_experts, counts)
    return Layout(gpu_start=n + 1, cpu_experts=0, layers_per_gpu=())


# --- the plan -----------------------------------------------------------------------------


@dataclass
class DevicePlan:
    device: Device
    weights: dict[str, int] = field(default_factory=dict)  # role → bytes
    other: dict[str, int] = field(default_factory=dict)  # KV cache, compute buffer, …
    layers: list[int] = field(default_factory=list)  # repeating layers it runs (attention etc.)
    expert_layers: list[int] = field(default_factory=list)  # layers whose routed experts it holds
    holds_output: bool = False
    read_per_token: float = 0.0  # bytes read per decoded token, empty context
    kv_bytes: int = 0

    @property
    def used_bytes(self) -> int:
        return sum(self.weights.values()) + sum(self.other.values())

    @property
    def fits(self) -> bool:
        return self.used_bytes <= self.device.usable_bytes

    def as_json(self) -> dict:
        d = self.device
        return {"name": d.name, "kind": d.kind, "capacity_bytes": d.capacity_bytes, "usable_bytes": d.usable_bytes,
                "used_bytes": self.used_bytes, "fits": self.fits, "weights_bytes": sum(self.weights.values()),
                "weights_by_role": self.weights, "other": self.other, "layers": self.layers,
                "expert_layers": self.expert_layers, "holds_output": self.holds_output,
                "bandwidth_bytes_per_s": d.bandwidth}


@dataclass
class Plan:
    model: ModelInfo
    hardware: Hardware
    settings: Settings
    layout: Layout
    devices: list[DevicePlan]
    fits: bool = False
    verdict: str = ""
    suggestions: list[str] = field(default_factory=list)

    @property
    def weights_bytes(self) -> int:
        return self.model.weights_bytes

    @property
    def kv_bytes(self) -> int:
        return kv_layer_bytes(self.model, self.settings) * self.model.n_layers

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.model, self.settings.kv_type)

    @property
    def n_gpu_layers(self) -> int:
        return 0 if not self.layout.layers_per_gpu else self.model.n_layers + 1 - self.layout.gpu_start

    @property
    def llama_params(self) -> dict:
        """Keyword arguments for the runtime; `cpu_experts` follows llama.cpp's `--n-cpu-moe`."""
        layout, s = self.layout, self.settings
        multi_gpu = len(self.hardware.gpus) > 1 and bool(layout.layers_per_gpu)
        # The very overrides the runtime builds from `--cpu-experts N`.
        overrides = expert_overrides(str(layout.cpu_experts), self.model.n_layers) if layout.layers_per_gpu else []
        return {
            "n_gpu_layers": self.n_gpu_layers,
            "split_mode": "layer",
            "main_gpu": 0,
            "tensor_split": list(layout.layers_per_gpu) if multi_gpu else None,
            "cpu_experts": layout.cpu_experts if layout.layers_per_gpu else 0,
            "override_tensor": [f"{pattern}={device}" for pattern, device in overrides],
            "n_ctx": s.n_ctx,
            "n_batch": s.n_batch,
            "n_ubatch": s.n_ubatch,
            "kv_type": s.kv_type,
            "flash_attn": s.flash_attn,
        }

    def run_flags(self) -> list[str]:
        """The same placement as `smallfour run` flags."""
        p = self.llama_params
        flags = ["--ctx", str(p["n_ctx"]), "--kv-type", p["kv_type"],
                 "--flash-attn" if p["flash_attn"] else "--no-flash-attn", "--gpu-layers", str(p["n_gpu_layers"])]
        if p["tensor_split"]:
            flags += ["--tensor-split", ",".join(map(str, p["tensor_split"]))]
        if p["cpu_experts"]:
            flags += ["--cpu-experts", str(p["cpu_experts"])]
        return flags

    def decode_estimate(self) -> dict:
        """Decode tokens/s from bytes read per token over each device's bandwidth (devices run in turn)."""
        def rate(efficiency_applied: bool, with_kv: bool) -> float:
            seconds = 0.0
            for d in self.devices:
                efficiency = d.device.efficiency if efficiency_applied else 1.0
                seconds += (d.read_per_token + (d.kv_bytes if with_kv else 0)) / (d.device.bandwidth * efficiency)
            return 1.0 / seconds if seconds else 0.0

        return {"bytes_per_token": int(sum(d.read_per_token for d in self.devices)),
                "tokens_per_s": round(rate(True, False), 1),
                "tokens_per_s_full_context": round(rate(True, True), 1),
                "ceiling_tokens_per_s": round(rate(False, False), 1)}

    def as_json(self) -> dict:
        return {
            "fits": self.fits,
            "verdict": self.verdict,
            "suggestions": self.suggestions,
            "model": {"name": self.model.name, "source": self.model.source, "recipe": self.model.recipe,
                      "plan_only_recipe": self.model.source != "gguf" and is_plan_only(self.model.recipe),
                      "n_layers": self.model.n_layers, "tensors": len(self.model.tensors)},
            "hardware": self.hardware.name,
            "weights_bytes": self.weights_bytes,
            "weights_by_role": self.model.bytes_by_role(),
            "kv_bytes": self.kv_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "n_ctx": self.settings.n_ctx,
            "mmproj_bytes": self.settings.mmproj_bytes,
            "devices": [d.as_json() for d in self.devices],
            "llama_params": self.llama_params,
            "run_flags": self.run_flags(),
            "decode": self.decode_estimate(),
            "assumptions": assumptions(),
        }


def network_bytes_per_token(plan: Plan, remote: set[int]) -> int:
    """Bytes that cross the network per decoded token when the GPUs numbered in `remote` are RPC workers.

    Layers run in order, input embeddings on this machine; each hand-over to or from a worker carries the
    hidden state (f32), so does each trip of a worker's layer to routed experts kept in this machine's RAM
    (`--cpu-experts`), and the logits (f32, whole vocabulary) come back when a worker holds the output layer.
    Weights and the KV cache stay where they are.
    """
    model, layout = plan.model, plan.layout
    state = 4 * model.hidden_size
    stages = [CPU] + [layout.device_of_layer(layer) for layer in range(model.n_layers + 1)]
    crossings = sum(1 for a, b in zip(stages, stages[1:]) if a != b and (a in remote or b in remote))
    crossings += 2 * sum(1 for layer in range(min(layout.cpu_experts, model.n_layers))
                         if layout.device_of_layer(layer) in remote)
    logits = 4 * model.vocab_size if stages[-1] in remote else 0
    return crossings * state + logits


def _read_per_token(model: ModelInfo, tensor: TensorInfo) -> float:
    if tensor.role == ROLE_ROUTED_EXPERTS and model.n_experts:
        return tensor.nbytes * model.n_experts_used / model.n_experts
    if tensor.role == ROLE_EMBEDDINGS:
        return tensor.nbytes / max(model.vocab_size, 1)  # one row
    return tensor.nbytes


def _device_plans(model: ModelInfo, settings: Settings, hardware: Hardware, layout: Layout) -> list[DevicePlan]:
    plans = [DevicePlan(d) for d in hardware.devices]
    index = {CPU: len(plans) - 1, **{i: i for i in range(len(hardware.gpus))}}
    n = model.n_layers
    for t in model.tensors:
        dp = plans[index[layout.device_of(t, n)]]
        dp.weights[t.role] = dp.weights.get(t.role, 0) + t.nbytes
        dp.read_per_token += _read_per_token(model, t)
        if t.role == ROLE_ROUTED_EXPERTS and t.layer not in dp.expert_layers:
            dp.expert_layers.append(t.layer)
    kv = kv_layer_bytes(model, settings)
    for layer in range(n):
        dp = plans[index[layout.device_of_layer(layer)]]
        dp.layers.append(layer)
        dp.kv_bytes += kv
    plans[index[layout.device_of_layer(n)]].holds_output = True
    for i, dp in enumerate(plans):
        if dp.kv_bytes:
            dp.other[f"KV cache ({settings.kv_type})"] = dp.kv_bytes
        if dp.device.kind == "gpu":
            if dp.layers or dp.holds_output:
                dp.other.update(_gpu_fixed_bytes(model, settings, i, layout.cpu_experts))
                dp.other["compute buffer"] = compute_bytes(model, settings, holds_output=dp.holds_output)
        else:
            dp.other["compute buffer"] = compute_bytes(model, settings, holds_output=dp.holds_output,
                                                       holds_layers=bool(dp.layers))
            if settings.mmproj_bytes and not hardware.gpus:
                dp.other["mmproj (vision)"] = settings.mmproj_bytes + VISION_COMPUTE_BYTES
            dp.other["runtime overhead"] = CPU_RUNTIME_BYTES
    return plans


def _place(model: ModelInfo, settings: Settings, hardware: Hardware) -> Plan:
    layout = choose_layout(model, settings, hardware)
    devices = _device_plans(model, settings, hardware, layout)
    plan = Plan(model, hardware, settings, layout, devices, fits=all(d.fits for d in devices))
    plan.verdict = _fit_summary(plan)
    return plan


def _where(layout: Layout) -> str:
    if not layout.layers_per_gpu:
        return "CPU only"
    if layout.gpu_start:
        return (f"layers 0–{layout.gpu_start - 1} and the routed experts of layers 0–{layout.cpu_experts - 1} "
                "in CPU RAM, the rest on GPU")
    if layout.cpu_experts:
        return f"routed experts of layers 0–{layout.cpu_experts - 1} in CPU RAM, the rest on GPU"
    return "all on GPU"


def _fit_summary(plan: Plan) -> str:
    if plan.fits:
        return (f"fits: {plan.weights_bytes / GB:.1f} GB of weights + {plan.kv_bytes / GB:.2f} GB KV cache, "
                f"{_where(plan.layout)}")
    over = [f"{d.device.name} needs {d.used_bytes / GiB:.1f} GiB of {d.device.usable_bytes / GiB:.1f} GiB usable"
            for d in plan.devices if not d.fits]
    return "does not fit: " + "; ".join(over)


def _alternatives(plan: Plan) -> list[list[tuple[str, ModelInfo, Settings, Hardware]]]:
    """Changes to try, smallest kind first — a cheaper KV cache, a shorter context, a smaller
    recipe — each kind's options mildest first."""
    model, s, hw = plan.model, plan.settings, plan.hardware
    kv = []
    if s.kv_type != "q8_0" and model.kv_width % GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0] == 0:
        kv.append(("--kv-type q8_0", model, replace(s, kv_type="q8_0"), hw))
    contexts = []
    ctx = s.n_ctx // 2
    while ctx >= 4096:
        contexts.append((f"--ctx {ctx}", model, replace(s, n_ctx=ctx), hw))
        ctx //= 2
    recipes = []
    for recipe in RECIPE_LADDER:
        smaller = retyped(model, recipe)
        if smaller.weights_bytes < model.weights_bytes:
            note = " (not yet produced by convert)" if is_plan_only(recipe) else ""
            recipes.append((f"--recipe {recipe}{note}", smaller, s, hw))
    return [kv, contexts, recipes]


def _more_memory(plan: Plan) -> str | None:
    """The RAM that would hold this plan as it stands, when RAM is the only device short."""
    ram = plan.devices[-1]
    if not ram.fits and all(d.fits for d in plan.devices[:-1]):
        needed = math.ceil(ram.used_bytes / (1 - RAM_HEADROOM) / GiB)
        return f"--ram {needed}GB (≥ {needed} GiB of RAM instead of {ram.device.capacity_bytes / GiB:.0f})"
    return None


def plan(model: ModelInfo, hardware: Hardware, settings: Settings | None = None, *, suggest: bool = True) -> Plan:
    """Place `model` on `hardware`; when it does not fit, say the smallest change that would."""
    settings = settings or Settings()
    kv_bytes_per_token(model, settings.kv_type)  # validates the KV type against the model
    result = _place(model, settings, hardware)
    if result.fits or not suggest:
        return result
    for options in _alternatives(result):
        label = next((label for label, m, s, hw in options if _place(m, s, hw).fits), None)
        if label:
            result.suggestions.append(label)
    more = _more_memory(result)
    if more:
        result.suggestions.append(more)
    change = result.suggestions[0] if result.suggestions else "a machine with more memory"
    result.verdict += f". Smallest change that fits: {change}"
    return result


def plan_for_load(model_path: Path, n_ctx: int, kv_type: str = "f16", hardware: Hardware | None = None, *,
                  n_batch: int = 512, flash_attn: bool = True, mmproj: Path | None = None) -> Plan:
    """The plan for loading a GGUF here (or on `hardware`): apply `.llama_params`, refuse if not `.fits`."""
    settings = Settings(n_ctx=n_ctx, kv_type=kv_type, n_batch=n_batch, flash_attn=flash_attn,
                        mmproj_bytes=mmproj_bytes(mmproj) if mmproj else 0)
    return plan(model_from_gguf(model_path), hardware or detect_hardware(), settings)


def sequences_that_fit(model: ModelInfo, settings: Settings, hardware: Hardware, *, most: int = 16) -> int:
    """How many sequences of `settings.n_ctx` positions each (KV caches side by side) fit, up to `most` (≥ 1).

    They fit when the plan for all of them keeps the one-sequence layout: more sequences must not push
    layers or experts off the GPUs (that would slow every token down).
    """
    alone = _place(model, settings, hardware)
    for count in range(most, 1, -1):
        together = _place(model, replace(settings, n_ctx=settings.n_ctx * count), hardware)
        if together.fits and together.layout.gpu_start <= alone.layout.gpu_start \
                and together.layout.cpu_experts <= alone.layout.cpu_experts:
            return count
    return 1


def assumptions() -> dict:
    return {
        "gpu_headroom_fraction": GPU_HEADROOM,
        "ram_headroom_fraction": RAM_HEADROOM,
        "gpu_runtime_overhead_bytes": GPU_RUNTIME_BYTES,
        "cpu_runtime_overhead_bytes": CPU_RUNTIME_BYTES,
        "vision_compute_bytes": VISION_COMPUTE_BYTES,
        "gpu_bandwidth_efficiency": GPU_EFFICIENCY,
        "cpu_bandwidth_efficiency": CPU_EFFICIENCY,
        "bandwidths_bytes_per_s": {"H100 HBM3": H100_BANDWIDTH, "H200 HBM3e": H200_BANDWIDTH,
                                   "A100 80GB HBM2e": A100_BANDWIDTH, "24 GB consumer GPU": CONSUMER_GPU_BANDWIDTH,
                                   "DDR5 dual-channel": DDR5_DUAL_CHANNEL, "DDR5 8-channel server": DDR5_SERVER_8CH},
        "kv_cell_padding": KV_CELL_PADDING,
    }
