"""Placement planning: will a model fit this machine, and how should llama.cpp lay it out?

The planner works before anything is loaded, from a GGUF's tensor table or — before
any download — from a checkpoint config plus a recipe. It inventories every tensor
(name, role, layer, bytes), adds the MLA KV cache, compute buffers, the vision
projector and a runtime overhead, and places them the way llama.cpp will:

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
hardware in binary GiB (an "80GB" H100 reports 81559 MiB; DIMMs are binary), and
`parse_size` reads both "GB" and "GiB" as 2**30 for hardware.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from convert.config import TextConfig, from_hf_config, from_native_params
from convert.errors import ConversionError
from convert.mistral4 import (ROLE_EMBEDDINGS, ROLE_OUTPUT, ROLE_ROUTED_EXPERTS,
                              ROLE_SHARED_EXPERT, ROLES, expected_shapes, role_of_gguf_name)
from quant.gguf_io import read_table
from quant.recipes import BUILTIN_RECIPES, Recipe, choose_type, load_recipe, single_type_recipe, stored_nbytes
from smallfour.errors import SmallfourError

# --- assumptions, all in one place ---------------------------------------------------------

GiB = 1024**3
MiB = 1024**2
GB = 10**9

# Kept free on every device: allocator fragmentation, other processes, a desktop session.
GPU_HEADROOM = 0.05
RAM_HEADROOM = 0.10
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

# Decode reads every active weight once per token; llama.cpp reaches about this share
# of the peak memory bandwidth with MoE decode (small expert matmuls, kernel launches).
GPU_EFFICIENCY = 0.6
CPU_EFFICIENCY = 0.5

# Peak memory bandwidths, bytes/s.
H100_BANDWIDTH = 3.35e12  # H100 SXM5 80 GB, HBM3
H200_BANDWIDTH = 4.8e12  # H200 141 GB, HBM3e
A100_BANDWIDTH = 2.0e12  # A100 80 GB, HBM2e
CONSUMER_GPU_BANDWIDTH = 1.0e12  # RTX 4090 1008 GB/s, RTX 3090 936 GB/s
DDR5_DUAL_CHANNEL = 80e9  # desktop DDR5-5200 × 2 channels ≈ 83 GB/s
DDR5_SERVER_8CH = 307e9  # one socket, 8 × DDR5-4800

KV_TYPES = ("f16", "bf16", "q8_0", "f32")
# Recipes the planner can size, largest first. The converter produces BUILTIN_RECIPES
# today; the others are sized as one type for every matrix (what llama.cpp's plain
# recipes approximate) so a plan can say what a future recipe would need.
RECIPE_LADDER = ("f32", "bf16", "f16", "q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k")

REAL_MODEL_NAME = "mistral-small-4"

# llama.cpp's own pattern for routed-expert tensors (`--n-cpu-moe`), merged gate_up included.
EXPERT_TENSORS = r"ffn_(up|down|gate|gate_up)_exps"


# --- the model: tensors and the few hyper-parameters placement needs -------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    role: str
    layer: int | None
    shape: tuple[int, ...]  # numpy order: rows first, the row length last
    qtype: GGMLQuantizationType
    nbytes: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str  # "gguf", "config" or "built-in"
    recipe: str
    n_layers: int
    hidden_size: int
    n_heads: int
    vocab_size: int
    kv_lora_rank: int
    rope_dim: int
    n_experts: int
    n_experts_used: int
    expert_ff: int
    tensors: tuple[TensorInfo, ...]

    @property
    def weights_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def kv_width(self) -> int:
        """Values cached per token per layer: MLA's compressed latent plus the shared rope key."""
        return self.kv_lora_rank + self.rope_dim

    def bytes_by_role(self) -> dict[str, int]:
        totals = dict.fromkeys(ROLES, 0)
        for t in self.tensors:
            totals[t.role] = totals.get(t.role, 0) + t.nbytes
        return {role: n for role, n in totals.items() if n}


def real_hf_config() -> dict:
    """Mistral Small 4's `config.json`, text part, from the brief's hyper-parameters.

    Placement needs only the shapes; the rope fields are the release's documented
    YaRN settings (factor 128 over 8192) so the config also converts cleanly.
    """
    return {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "mistral4",
            "vocab_size": 131072,
            "hidden_size": 4096,
            "intermediate_size": 12288,  # dense FFN size; unused, no leading dense layers
            "moe_intermediate_size": 2048,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "n_shared_experts": 1,
            "n_routed_experts": 128,
            "num_experts_per_tok": 4,
            "first_k_dense_replace": 0,
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.0,
            "q_lora_rank": 1024,
            "kv_lora_rank": 256,
            "qk_rope_head_dim": 64,
            "qk_nope_head_dim": 64,
            "v_head_dim": 128,
            "max_position_embeddings": 1048576,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0,
                                "original_max_position_embeddings": 8192, "beta_fast": 32.0, "beta_slow": 1.0,
                                "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
        },
    }


def real_config() -> TextConfig:
    return from_hf_config(real_hf_config())


def recipe_type(recipe: str) -> GGMLQuantizationType:
    name = recipe.lower()
    if name in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[name][0]
    if name in RECIPE_LADDER:
        return GGMLQuantizationType[name.upper()]
    raise SmallfourError(f"unknown recipe {recipe!r}; the planner sizes {', '.join(RECIPE_LADDER)}")


def is_plan_only(recipe: str) -> bool:
    """True for recipes the planner can size but `smallfour convert` does not produce yet."""
    try:
        load_recipe(recipe)
    except ConversionError:
        return True
    return False


def recipe_for(recipe: str, tensors: list[TensorInfo] | tuple[TensorInfo, ...], n_layers: int) -> Recipe:
    """A recipe the converter would apply: a ladder type, a preset, a TOML file or fit:SIZE
    (solved for `tensors`, the same size model `smallfour convert` uses)."""
    if recipe.lower() in RECIPE_LADDER:
        return single_type_recipe(recipe_type(recipe))
    from quant.pipeline import TensorSlot, resolve_recipe_spec

    try:
        return resolve_recipe_spec(recipe, [TensorSlot(t.name, t.role, t.layer, t.shape) for t in tensors], n_layers)
    except ConversionError as exc:
        raise SmallfourError(str(exc)) from None


def _typed(name: str, role: str, layer: int | None, shape: tuple[int, ...],
           recipe: GGMLQuantizationType | Recipe, n_layers: int = 0) -> TensorInfo:
    if isinstance(recipe, Recipe):
        qtype = recipe.choose(name, role, layer, shape, n_layers).qtype
    else:
        qtype = choose_type(recipe, role, shape).qtype
    return TensorInfo(name, role, layer, shape, qtype, stored_nbytes(shape, qtype))


def _config_tensors(cfg: TextConfig, recipe: GGMLQuantizationType | Recipe) -> list[TensorInfo]:
    """Every GGUF tensor the converter writes for `cfg`, in file order (see convert.mistral4.plan_tensors)."""
    from convert.mistral4 import ROLE_OF

    tensors = [_typed("token_embd.weight", ROLE_EMBEDDINGS, None, (cfg.vocab_size, cfg.hidden_size), recipe)]
    for i in range(cfg.n_layers):
        shapes = expected_shapes(cfg, i)
        # kv_b_proj is written as k_b (transposed per head) and v_b.
        shapes["attn_k_b"] = (cfg.n_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim)
        shapes["attn_v_b"] = (cfg.n_heads, cfg.v_head_dim, cfg.kv_lora_rank)
        keys = ["attn_norm", "attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv_a_mqa", "attn_kv_a_norm",
                "attn_k_b", "attn_v_b", "attn_output", "ffn_norm"]
        if cfg.is_moe_layer(i):
            keys += ["ffn_gate_inp", "ffn_gate_up_exps", "ffn_down_exps"]
            keys += [k for k in ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp") if k in shapes]
        else:
            keys += ["ffn_gate", "ffn_up", "ffn_down"]
        tensors += [_typed(f"blk.{i}.{k}.weight", ROLE_OF[k], i, shapes[k], recipe, cfg.n_layers) for k in keys]
    tensors.append(_typed("output_norm.weight", "norm", None, (cfg.hidden_size,), recipe))
    if not cfg.tie_embeddings:
        tensors.append(_typed("output.weight", ROLE_OUTPUT, None, (cfg.vocab_size, cfg.hidden_size), recipe))
    return tensors


def model_from_config(cfg: TextConfig, recipe: str = "bf16", name: str = "config") -> ModelInfo:
    tensors = _config_tensors(cfg, recipe_for(recipe, _config_tensors(cfg, GGMLQuantizationType.F32), cfg.n_layers))
    return ModelInfo(name=name, source="config", recipe=recipe.lower(), n_layers=cfg.n_layers,
                     hidden_size=cfg.hidden_size, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                     kv_lora_rank=cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim, n_experts=cfg.n_experts,
                     n_experts_used=cfg.n_experts_used, expert_ff=cfg.expert_ff, tensors=tuple(tensors))


def real_model(recipe: str = "bf16") -> ModelInfo:
    return replace(model_from_config(real_config(), recipe, REAL_MODEL_NAME), source="built-in")


def load_config(path: Path) -> TextConfig:
    """A TextConfig from `config.json`, `params.json`, or a checkpoint directory holding one."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("config.json", "params.json") if (path / n).is_file()]
        if not found:
            raise SmallfourError(f"{path} has no config.json or params.json")
        path = found[0]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SmallfourError(f"cannot read {path} as JSON: {exc}") from None
    try:
        native = "moe" in data and "kv_lora_rank" in data and "text_config" not in data
        return from_native_params(data) if native else from_hf_config(data)
    except ConversionError as exc:
        raise SmallfourError(str(exc)) from None


def _gguf_role(name: str) -> str:
    # Other converters split gate/up: role_of_gguf_name knows only our merged names.
    base = name.removesuffix(".weight")
    if base.endswith("_exps"):
        return ROLE_ROUTED_EXPERTS
    if base.endswith("_shexp"):
        return ROLE_SHARED_EXPERT
    return role_of_gguf_name(name)


def _layer_of(name: str) -> int | None:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def read_gguf_header(path: Path) -> tuple[dict, list[tuple[str, tuple[int, ...], int]]]:
    """The metadata (arrays as their lengths) and tensor table (name, ggml dims, type id) of a GGUF.

    Only the header is read: planning a model must work before its data is all there. Loading
    a model asks several times (planner, expert overrides, vision checks), and walking the
    131k-token vocabulary costs ≈0.3 s, so the answer is kept while the file is unchanged;
    callers must not modify it.
    """
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise SmallfourError(f"cannot read {path}: {exc.strerror}") from None
    return _read_gguf_header(Path(path).resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_gguf_header(path: Path, mtime_ns: int, size: int) -> tuple[dict, list[tuple[str, tuple[int, ...], int]]]:
    try:
        table = read_table(path, require_data=False)
    except ConversionError as exc:
        raise SmallfourError(str(exc)) from None
    return table.values, [(t.name, tuple(reversed(t.shape)), int(t.qtype)) for t in table.tensors]


def model_from_gguf(path: Path) -> ModelInfo:
    """The tensor inventory and MLA hyper-parameters of a GGUF, read from its header only."""
    from gguf import LlamaFileType

    from smallfour.runtime import check_gguf

    path = Path(path)
    check_gguf(path)
    fields, table = read_gguf_header(path)
    arch = fields.get("general.architecture")

    def hparam(key: str, default=None):
        return fields.get(f"{arch}.{key}", default)

    if hparam("attention.kv_lora_rank") is None:
        raise SmallfourError(f"{path.name} is a {arch} model; the planner knows MLA models (mistral4)")
    tensors = []
    for name, dims, type_id in table:
        shape = tuple(reversed(dims))  # ggml lists the row length first
        qtype = GGMLQuantizationType(type_id)
        tensors.append(TensorInfo(name, _gguf_role(name), _layer_of(name), shape, qtype, stored_nbytes(shape, qtype)))
    file_type = fields.get("general.file_type")
    recipe = LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower() \
        if file_type is not None else "?"
    recipe = fields.get("smallfour.recipe") or recipe  # the recipe smallfour wrote it with
    return ModelInfo(
        name=path.name, source="gguf", recipe=recipe, n_layers=hparam("block_count"),
        hidden_size=hparam("embedding_length"), n_heads=hparam("attention.head_count"),
        vocab_size=hparam("vocab_size") or fields.get("tokenizer.ggml.tokens", 0),
        kv_lora_rank=hparam("attention.kv_lora_rank"), rope_dim=hparam("rope.dimension_count"),
        n_experts=hparam("expert_count", 0), n_experts_used=hparam("expert_used_count", 0),
        expert_ff=hparam("expert_feed_forward_length", 0), tensors=tuple(tensors))


def retyped(model: ModelInfo, recipe: str) -> ModelInfo:
    """The same model converted with another recipe (norms and router stay F32, as in convert)."""
    chosen = recipe_for(recipe, model.tensors, model.n_layers)
    tensors = tuple(_typed(t.name, t.role, t.layer, t.shape, chosen, model.n_layers) for t in model.tensors)
    return replace(model, recipe=recipe.lower(), tensors=tensors)


def mmproj_bytes(path: Path) -> int:
    """Bytes of a projector GGUF's tensors (any architecture)."""
    path = Path(path)
    if not path.is_file():
        raise SmallfourError(f"projector file {path} does not exist")
    _, table = read_gguf_header(path)
    return sum(stored_nbytes(tuple(reversed(dims)), GGMLQuantizationType(t)) for _, dims, t in table)


# --- hardware -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    name: str
    kind: str  # "gpu" or "cpu"
    capacity_bytes: int
    bandwidth: float  # peak, bytes/s

    @property
    def usable_bytes(self) -> int:
        headroom = GPU_HEADROOM if self.kind == "gpu" else RAM_HEADROOM
        return int(self.capacity_bytes * (1 - headroom))

    @property
    def efficiency(self) -> float:
        return GPU_EFFICIENCY if self.kind == "gpu" else CPU_EFFICIENCY


@dataclass(frozen=True)
class Hardware:
    name: str
    gpus: tuple[Device, ...]
    ram: Device

    @property
    def devices(self) -> tuple[Device, ...]:
        return (*self.gpus, self.ram)


@dataclass(frozen=True)
class GpuModel:
    label: str
    capacity_bytes: int
    bandwidth: float


# Capacities as nvidia-smi reports them (the memory a process can see, before its context).
GPU_MODELS = {
    "h100": GpuModel("H100 80GB", 81559 * MiB, H100_BANDWIDTH),
    "h200": GpuModel("H200 141GB", 143771 * MiB, H200_BANDWIDTH),
    "a100": GpuModel("A100 80GB", 81920 * MiB, A100_BANDWIDTH),
    "rtx4090": GpuModel("RTX 4090 24GB", 24564 * MiB, CONSUMER_GPU_BANDWIDTH),
    "rtx3090": GpuModel("RTX 3090 24GB", 24576 * MiB, 936e9),
}


def _gpus(model: str, count: int) -> tuple[Device, ...]:
    spec = GPU_MODELS[model]
    return tuple(Device(f"GPU{i} {spec.label}", "gpu", spec.capacity_bytes, spec.bandwidth) for i in range(count))


def _ram(gib: int, bandwidth: float) -> Device:
    return Device(f"CPU RAM {gib} GiB", "cpu", gib * GiB, bandwidth)


PROFILES: dict[str, Hardware] = {
    # The reference: a DGX-class H100 node (its 2 TB host RAM only holds the embeddings).
    "4xH100": Hardware("4xH100", _gpus("h100", 4), _ram(2048, DDR5_SERVER_8CH)),
    "2xH200": Hardware("2xH200", _gpus("h200", 2), _ram(1024, DDR5_SERVER_8CH)),
    "1xH100+256GB": Hardware("1xH100+256GB", _gpus("h100", 1), _ram(256, DDR5_SERVER_8CH)),
    "24GB+128GB": Hardware("24GB+128GB", _gpus("rtx4090", 1), _ram(128, DDR5_DUAL_CHANNEL)),
    "cpu-96GB": Hardware("cpu-96GB", (), _ram(96, DDR5_DUAL_CHANNEL)),
}


def profile(name: str) -> Hardware:
    for key, hardware in PROFILES.items():
        if key.lower() == name.lower():
            return hardware
    raise SmallfourError(f"unknown hardware profile {name!r}; choose one of {', '.join(PROFILES)}")


_SIZE = re.compile(r"^\s*([\d.]+)\s*(t|tb|tib|g|gb|gib|m|mb|mib)?\s*$", re.IGNORECASE)
_RATE = re.compile(r"^\s*([\d.]+)\s*(tb/s|gb/s)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """"80GB", "80GiB", "81559MiB", "2TB" → bytes; hardware sizes are binary whichever unit."""
    match = _SIZE.match(text)
    if not match:
        raise SmallfourError(f"cannot read {text!r} as a memory size; write e.g. 80GB or 81559MiB")
    unit = (match.group(2) or "gb").lower()[0]
    return int(float(match.group(1)) * {"t": 1024**4, "g": GiB, "m": MiB}[unit])


def parse_rate(text: str) -> float:
    match = _RATE.match(text)
    if not match:
        raise SmallfourError(f"cannot read {text!r} as a bandwidth; write e.g. 1TB/s or 80GB/s")
    return float(match.group(1)) * (1e12 if match.group(2).lower().startswith("t") else 1e9)


def default_gpu_bandwidth(capacity_bytes: int) -> float:
    # An unnamed GPU: an 80 GB-class card is assumed A100-like (the slowest of them),
    # anything smaller a consumer or workstation card.
    return A100_BANDWIDTH if capacity_bytes >= 64 * GiB else CONSUMER_GPU_BANDWIDTH


def parse_gpu(text: str, index: int) -> Device:
    """`h100`, `80GB`, or either with `@BANDWIDTH` (`24GB@1TB/s`)."""
    spec, _, rate = text.partition("@")
    known = GPU_MODELS.get(spec.strip().lower().replace("-", ""))
    if known:
        capacity, bandwidth, label = known.capacity_bytes, known.bandwidth, known.label
    else:
        capacity = parse_size(spec)
        bandwidth, label = default_gpu_bandwidth(capacity), f"{capacity / GiB:.0f} GiB"
    if rate:
        bandwidth = parse_rate(rate)
    return Device(f"GPU{index} {label}", "gpu", capacity, bandwidth)


def parse_ram(text: str) -> Device:
    spec, _, rate = text.partition("@")
    capacity = parse_size(spec)
    return Device(f"CPU RAM {capacity / GiB:.0f} GiB", "cpu", capacity,
                  parse_rate(rate) if rate else DDR5_DUAL_CHANNEL)


def hardware_from_specs(gpus: list[str], ram: str | None, base: Hardware | None = None) -> Hardware:
    """`base` (a profile, or this machine) with its GPUs and/or RAM replaced by `--gpu`/`--ram` specs."""
    base = base or detect_hardware()
    if not gpus and not ram:
        return base
    new_gpus = tuple(parse_gpu(g, i) for i, g in enumerate(gpus)) if gpus else base.gpus
    new_ram = parse_ram(ram) if ram else base.ram
    name = " + ".join([*(d.name.split(" ", 1)[1] for d in new_gpus), new_ram.name.removeprefix("CPU ")])
    return Hardware(name, new_gpus, new_ram)


def _gpu_bandwidth_by_description(description: str, capacity: int) -> float:
    text = description.lower()
    for key, spec in GPU_MODELS.items():
        if key in text.replace(" ", ""):
            return spec.bandwidth
    return default_gpu_bandwidth(capacity)


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise SmallfourError("cannot read MemAvailable from /proc/meminfo")


def detect_hardware() -> Hardware:
    """This machine: discrete GPUs (free memory) from llama.cpp's backend registry, RAM from MemAvailable.

    Integrated GPUs share system RAM and are not counted. RAM bandwidth cannot be
    measured here and is assumed dual-channel DDR5.
    """
    from smallfour.placement import gpu_devices

    try:
        found = [d for d in gpu_devices() if d.kind == "GPU"]
    except (OSError, AttributeError):
        found = []
    gpus = tuple(Device(f"GPU{i} {d.description}", "gpu", d.free_bytes,
                        _gpu_bandwidth_by_description(d.description, d.total_bytes))
                 for i, d in enumerate(found))
    available = mem_available()
    return Hardware("local", gpus, Device(f"CPU RAM {available / GiB:.0f} GiB free", "cpu", available,
                                          DDR5_DUAL_CHANNEL))


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
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kv_type.upper()]]
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
        return {
            "n_gpu_layers": self.n_gpu_layers,
            "split_mode": "layer",
            "main_gpu": 0,
            "tensor_split": list(layout.layers_per_gpu) if multi_gpu else None,
            "cpu_experts": layout.cpu_experts if layout.layers_per_gpu else 0,
            "override_tensor": expert_override(layout.cpu_experts) if layout.layers_per_gpu else [],
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


def expert_override(cpu_experts: int) -> list[str]:
    """llama.cpp `--override-tensor` strings keeping the routed experts of layers 0…N-1 in RAM."""
    if cpu_experts <= 0:
        return []
    layers = "|".join(str(i) for i in range(cpu_experts))
    return [rf"^blk\.({layers})\.{EXPERT_TENSORS}\.=CPU"]


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
