"""The vLLM / SGLang serve command for the original FP8 release on a given set of GPUs.

When a workload outgrows one workstation the path is a datacenter engine on Mistral's own
FP8 checkpoint, not a GGUF. Those engines keep everything on the GPUs and split the model
by tensor parallelism, so the questions are few: how many GPUs must one replica span, how
long a context the KV cache left over allows, and which flags make the engine speak
Mistral's tokenizer, thinking and tool calls. The byte counts come from the same built-in
inventory the GGUF planner uses (`smallfour.inventory.real_model`), retyped as the FP8
release stores it, so nothing here is a hard-coded model size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from smallfour.errors import SmallfourError
from smallfour.hardware import Hardware
from smallfour.inventory import ModelInfo, real_model
from smallfour.planner import MMPROJ_ESTIMATE_BYTES, kv_bytes_per_token

FP8_REPO = "mistralai/Mistral-Small-4-119B-2603"
ENGINES = ("vllm", "sglang")

# The FP8 release quantizes the text model's matmul weights to 1 byte per parameter; the
# token embeddings, the output head, norms and routers stay BF16 (2 bytes), and so does
# the vision encoder (planner.MMPROJ_ESTIMATE_BYTES is its BF16 size). Per-tensor FP8
# scales are a few bytes each and not counted.
FP8_ROLES = frozenset({"attention", "shared_expert", "routed_experts", "dense_ffn"})
FP8_BYTES, BF16_BYTES = 1, 2
# The KV cache in the checkpoint's dtype (vLLM's and SGLang's `--kv-cache-dtype auto`):
# MLA's latent plus rope key, BF16 — the same 2 bytes a value as llama.cpp's f16 cache.
KV_DTYPE = "f16"

# vLLM's default `--gpu-memory-utilization`: the share of each GPU the engine may take for
# weights, KV cache and activations together. Printed in the command (SGLang's
# `--mem-fraction-static`) so both engines plan with the same share.
GPU_MEMORY_UTILIZATION = 0.90
# Beyond weights and KV on each GPU: the CUDA context, NCCL buffers, CUDA graphs, the
# activation peak of an 8,192-token prefill chunk through 128 experts, the sampler's
# vocab-wide buffers. An assumption (vLLM profiles the real figure at start-up).
ENGINE_OVERHEAD_BYTES = 4 * 1024**3

MAX_CONTEXT = 262_144  # what Mistral serves
# A replica must hold at least one sequence this long, or it takes more GPUs: below it
# agentic conversations (tool results, long documents) do not fit.
MIN_CONTEXT = 32_768
CONTEXT_STEP = 1_024  # --max-model-len is rounded down to whole thousands of tokens


@dataclass(frozen=True)
class ScalePlan:
    engine: str
    hardware: Hardware
    weights_bytes: int  # the FP8 release, text and vision
    kv_bytes_per_token: int
    gpu_bytes: int  # the smallest GPU's capacity
    tensor_parallel: int  # 0: no tensor-parallel size fits
    data_parallel: int
    max_model_len: int
    kv_tokens: int  # tokens of KV cache room per replica (every rank holds them all)

    @property
    def fits(self) -> bool:
        return self.tensor_parallel > 0

    @property
    def budget_bytes(self) -> int:
        return int(self.gpu_bytes * GPU_MEMORY_UTILIZATION)

    def command(self) -> list[str]:
        if self.engine == "vllm":
            args = ["vllm", "serve", FP8_REPO, "--tensor-parallel-size", str(self.tensor_parallel)]
            if self.data_parallel > 1:
                args += ["--data-parallel-size", str(self.data_parallel)]
            return args + ["--max-model-len", str(self.max_model_len),
                           "--gpu-memory-utilization", f"{GPU_MEMORY_UTILIZATION:g}",
                           "--tokenizer-mode", "mistral", "--config-format", "mistral", "--load-format", "mistral",
                           "--reasoning-parser", "mistral", "--enable-auto-tool-choice",
                           "--tool-call-parser", "mistral"]
        args = ["python", "-m", "sglang.launch_server", "--model-path", FP8_REPO, "--tp", str(self.tensor_parallel)]
        if self.data_parallel > 1:
            args += ["--dp", str(self.data_parallel)]
        return args + ["--context-length", str(self.max_model_len),
                       "--mem-fraction-static", f"{GPU_MEMORY_UTILIZATION:g}",
                       "--reasoning-parser", "mistral", "--tool-call-parser", "mistral"]

    def as_json(self) -> dict:
        return {"engine": self.engine, "model": FP8_REPO, "hardware": self.hardware.name, "fits": self.fits,
                "weights_bytes": self.weights_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
                "gpu_bytes": self.gpu_bytes, "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
                "engine_overhead_bytes": ENGINE_OVERHEAD_BYTES, "tensor_parallel": self.tensor_parallel,
                "data_parallel": self.data_parallel, "max_model_len": self.max_model_len,
                "kv_tokens": self.kv_tokens, "command": self.command() if self.fits else None}


def fp8_weights_bytes(model: ModelInfo) -> int:
    """The FP8 release's size: text matmuls at 1 byte a parameter, the rest and the vision encoder at 2."""
    text = sum(math.prod(t.shape) * (FP8_BYTES if t.role in FP8_ROLES else BF16_BYTES) for t in model.tensors)
    return text + MMPROJ_ESTIMATE_BYTES


def kv_room_tokens(gpu_bytes: int, weights_bytes: int, kv_per_token: int, tensor_parallel: int) -> int:
    """KV tokens one GPU of a replica has room for. Weights split across the ranks; the MLA
    latent cache does not (vLLM replicates it on every rank), so each rank holds every token."""
    free = int(gpu_bytes * GPU_MEMORY_UTILIZATION) - math.ceil(weights_bytes / tensor_parallel) - ENGINE_OVERHEAD_BYTES
    return max(free, 0) // kv_per_token


def tensor_parallel_sizes(n_gpus: int, n_heads: int) -> list[int]:
    """Sizes the engines accept, smallest first: powers of two that divide the attention heads."""
    return [tp for tp in (2**i for i in range(n_gpus.bit_length())) if tp <= n_gpus and n_heads % tp == 0]


def plan_scale(engine: str, hardware: Hardware) -> ScalePlan:
    """The fewest GPUs of `hardware` one replica needs, the context that leaves, the rest as replicas."""
    if engine not in ENGINES:
        raise SmallfourError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    model = real_model()
    weights, kv_per_token = fp8_weights_bytes(model), kv_bytes_per_token(model, KV_DTYPE)
    gpu_bytes = min((g.capacity_bytes for g in hardware.gpus), default=0)
    for tp in tensor_parallel_sizes(len(hardware.gpus), model.n_heads):
        room = kv_room_tokens(gpu_bytes, weights, kv_per_token, tp)
        if room >= MIN_CONTEXT:
            length = min(MAX_CONTEXT, room // CONTEXT_STEP * CONTEXT_STEP)
            return ScalePlan(engine, hardware, weights, kv_per_token, gpu_bytes, tp, len(hardware.gpus) // tp,
                             length, room)
    return ScalePlan(engine, hardware, weights, kv_per_token, gpu_bytes, 0, 0, 0, 0)


def does_not_fit(plan: ScalePlan) -> str:
    """One line saying why no tensor-parallel size works."""
    gpus = plan.hardware.gpus
    if not gpus:
        return (f"does not fit: {plan.engine} keeps the model on GPUs and {plan.hardware.name} has none "
                f"({FP8_REPO} is {plan.weights_bytes / 1e9:,.1f} GB in FP8)")
    return (f"does not fit: {FP8_REPO} needs {plan.weights_bytes / 1e9:,.1f} GB of FP8 weights plus "
            f"{ENGINE_OVERHEAD_BYTES / 1024**3:.0f} GiB overhead per GPU and {MIN_CONTEXT:,} tokens of KV cache "
            f"({plan.kv_bytes_per_token:,} bytes/token, on every GPU) within {GPU_MEMORY_UTILIZATION:.0%} of "
            f"each GPU; {plan.hardware.name} has {len(gpus)} GPU{'s' if len(gpus) > 1 else ''} of "
            f"{plan.gpu_bytes / 1024**3:,.1f} GiB")
