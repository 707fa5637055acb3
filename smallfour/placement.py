"""Where llama.cpp puts each tensor: GPUs, CPU RAM, and the routed experts between them.

llama.cpp places tensors by layer (`n_gpu_layers`, `tensor_split`) and lets a
list of `pattern → buffer type` overrides pin matching tensors elsewhere: that
is what `llama-cli -ot` and `--cpu-moe` use to keep routed experts in RAM.
llama-cpp-python declares `tensor_buft_overrides` but never fills it, so we
build the NULL-terminated C array here and hand it to the model parameters.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from smallfour.errors import SmallfourError

SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}

# KV cache types (`--kv-type`) → their GGML type ids, in the order the help lists them.
KV_TYPES = {"f16": 1, "bf16": 30, "q8_0": 8, "f32": 0}

# llama.cpp's own pattern for routed-expert tensors (`--cpu-moe`), merged gate_up included.
EXPERT_TENSORS = r"ffn_(up|down|gate|gate_up)_exps"


@dataclass(frozen=True)
class Placement:
    """How to lay the model out; the defaults put everything on the GPU(s) llama.cpp finds."""

    n_gpu_layers: int = -1
    split_mode: str = "layer"
    main_gpu: int = 0
    tensor_split: tuple[float, ...] | None = None
    # "none", "all", or a number N: the routed experts of the first N layers stay in CPU RAM
    # (llama.cpp's `--n-cpu-moe` convention).
    cpu_experts: str = "none"
    overrides: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    flash_attn: bool | None = False  # None: llama.cpp's auto (on where every device supports it)
    # llama.cpp's op offload: large batches of CPU-resident weights are computed on a GPU (llama-cli's
    # --no-op-offload turns it off); off, nothing placed on the CPU runs anywhere else.
    op_offload: bool = True


def parse_override(text: str) -> tuple[str, str]:
    """`REGEX=BUFFER_TYPE`, llama.cpp's `--override-tensor` syntax."""
    pattern, sep, device = text.rpartition("=")
    if not sep or not pattern or not device:
        raise SmallfourError(f"--override-tensor {text!r}: expected REGEX=DEVICE, e.g. 'ffn_.*_exps=CPU'")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise SmallfourError(f"--override-tensor {text!r}: invalid regex ({exc})") from None
    return pattern, device


def parse_tensor_split(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise SmallfourError(f"--tensor-split {text!r}: expected comma-separated numbers, e.g. 3,1") from None
    if not all(math.isfinite(p) and p >= 0 for p in parts) or not any(parts):
        raise SmallfourError(f"--tensor-split {text!r}: proportions must be finite, ≥ 0 and not all zero")
    return parts


def expert_overrides(cpu_experts: str, n_layers: int) -> list[tuple[str, str]]:
    """The overrides that keep routed experts in CPU RAM for `--cpu-experts` (all, none or N).

    N keeps those of layers 0…N-1 (llama.cpp's `--n-cpu-moe`); the planner counts its
    layouts with this same function, so what it sizes is what the runtime asks for.
    The dot after the layer number anchors it: layer 1 never matches blk.10–19.
    """
    if cpu_experts == "none":
        return []
    if cpu_experts == "all":
        return [(rf"\.{EXPERT_TENSORS}\.", "CPU")]
    try:
        count = int(cpu_experts)
    except ValueError:
        raise SmallfourError(f"--cpu-experts {cpu_experts!r}: expected all, none, auto or a number of layers") from None
    if not 0 <= count <= n_layers:
        raise SmallfourError(f"--cpu-experts {count}: the model has {n_layers} layers")
    if count == 0:
        return []
    layers = "|".join(str(i) for i in range(count))
    return [(rf"^blk\.({layers})\.{EXPERT_TENSORS}\.", "CPU")]


@functools.cache
def _ggml() -> ctypes.CDLL:
    """ggml's backend registry and device accessors, as the libllama llama-cpp-python loaded sees them.

    The symbols are looked up through libllama's own handle, which finds them in the
    libggml and libggml-base it is linked against. Opening those files again by path
    could load a second copy of ggml (the wheel ships each library under several
    names, as separate files), with its own backend registry and buffer types that
    libllama would not know. The CDLL object is ours, over that handle, so the argument
    types set here never touch llama-cpp-python's own function objects.
    """
    from llama_cpp import llama_cpp as bindings

    ggml = ctypes.CDLL(bindings._lib._name, handle=bindings._lib._handle)
    size_t, ptr, text = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char_p
    ggml.ggml_backend_reg_count.restype = size_t
    ggml.ggml_backend_reg_get.argtypes, ggml.ggml_backend_reg_get.restype = [size_t], ptr
    ggml.ggml_backend_dev_count.restype = size_t
    ggml.ggml_backend_dev_get.argtypes, ggml.ggml_backend_dev_get.restype = [size_t], ptr
    for name in ("ggml_backend_dev_buffer_type", "ggml_backend_dev_host_buffer_type", "ggml_backend_dev_backend_reg"):
        getattr(ggml, name).argtypes, getattr(ggml, name).restype = [ptr], ptr
    for name in ("ggml_backend_buft_name", "ggml_backend_dev_name", "ggml_backend_dev_description",
                 "ggml_backend_reg_name"):
        getattr(ggml, name).argtypes, getattr(ggml, name).restype = [ptr], text
    ggml.ggml_backend_dev_type.argtypes, ggml.ggml_backend_dev_type.restype = [ptr], ctypes.c_int
    ggml.ggml_backend_dev_memory.argtypes = [ptr, ctypes.POINTER(size_t), ctypes.POINTER(size_t)]
    ggml.ggml_backend_dev_memory.restype = None
    return ggml


# enum ggml_backend_dev_type
DEVICE_KINDS = {0: "CPU", 1: "GPU", 2: "iGPU", 3: "accelerator", 4: "meta"}


@dataclass(frozen=True)
class BackendDevice:
    """A device as this llama.cpp build's backend registry lists it (CPU, GPU, …), with the
    memory its driver reports. The planner's `hardware.Device` is what a plan fills instead."""

    name: str
    description: str
    kind: str  # a value of DEVICE_KINDS
    backend: str
    free_bytes: int
    total_bytes: int

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("GPU", "iGPU")


def _text(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", errors="replace")


def backend_names() -> list[str]:
    """The backends this llama.cpp build registered (CPU, CUDA, Metal, Vulkan, …)."""
    ggml = _ggml()
    return [_text(ggml.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i))) for i in range(ggml.ggml_backend_reg_count())]


def backend_devices() -> list[BackendDevice]:
    """Every device of this llama.cpp build, with its memory as the driver reports it."""
    ggml = _ggml()
    found = []
    for index in range(ggml.ggml_backend_dev_count()):
        device = ggml.ggml_backend_dev_get(index)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        ggml.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
        found.append(BackendDevice(_text(ggml.ggml_backend_dev_name(device)),
                                   _text(ggml.ggml_backend_dev_description(device)),
                                   DEVICE_KINDS.get(ggml.ggml_backend_dev_type(device), "unknown"),
                                   _text(ggml.ggml_backend_reg_name(ggml.ggml_backend_dev_backend_reg(device))),
                                   free.value, total.value))
    return found


def gpu_devices() -> list[BackendDevice]:
    """The GPUs this llama.cpp build can use, in the order a model takes them (and `--tensor-split` lists them):
    llama.cpp puts RPC workers' devices (`smallfour.rpc`) before the local GPUs."""
    return sorted((d for d in backend_devices() if d.is_gpu), key=lambda d: d.backend != "RPC")


def split_for_gpus(gpus: int | None, tensor_split: tuple[float, ...] | None) -> tuple[int | None, tuple[float, ...] | None]:
    """`--gpus N`: use the first N GPUs evenly (0 = CPU only). Returns (n_gpu_layers override, split)."""
    if gpus is None:
        return None, tensor_split
    available = len(gpu_devices())
    if gpus < 0 or gpus > available:
        raise SmallfourError(f"--gpus {gpus}: this llama.cpp build sees {available} GPU(s)")
    if gpus == 0:
        return 0, None
    if tensor_split is not None:
        raise SmallfourError("give either --gpus or --tensor-split, not both")
    return None, tuple([1.0] * gpus + [0.0] * (available - gpus))


def buffer_types() -> dict[str, int]:
    """Buffer types by name (`CPU`, `CUDA0`, `CUDA_Host`, …) of every device this build has."""
    ggml = _ggml()
    found: dict[str, int] = {}
    for index in range(ggml.ggml_backend_dev_count()):
        device = ggml.ggml_backend_dev_get(index)
        for getter in (ggml.ggml_backend_dev_buffer_type, ggml.ggml_backend_dev_host_buffer_type):
            buft = getter(device)
            if buft:
                found.setdefault(ggml.ggml_backend_buft_name(buft).decode(), buft)
    return found


class _Override(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def override_array(overrides: list[tuple[str, str]]) -> ctypes.Array | None:
    """The NULL-terminated `llama_model_tensor_buft_override` array, or None for no overrides."""
    if not overrides:
        return None
    available = buffer_types()
    entries = []
    for pattern, device in overrides:
        if device not in available:
            raise SmallfourError(f"unknown device {device!r} in a tensor override; this build has "
                                 f"{', '.join(sorted(available))}")
        entries.append(_Override(pattern.encode(), available[device]))
    array = (_Override * (len(entries) + 1))(*entries, _Override(None, None))
    return array


@contextlib.contextmanager
def model_params_with_overrides(array: ctypes.Array | None) -> Iterator[None]:
    """While active, llama-cpp-python's `Llama(...)` builds its model params with our overrides.

    `Llama.__init__` creates the params from `llama_model_default_params()` and loads the
    model in the same call, so the defaults are the one place to put the array in.
    The caller keeps `array` alive for the model's lifetime: llama.cpp keeps the pointer.
    """
    import llama_cpp.llama_cpp as lib

    if array is None:
        yield
        return
    original = lib.llama_model_default_params

    def with_overrides():
        params = original()
        params.tensor_buft_overrides = ctypes.cast(array, ctypes.c_void_p)
        return params

    lib.llama_model_default_params = with_overrides
    try:
        yield
    finally:
        lib.llama_model_default_params = original
