"""The hardware a plan is made for, and the one place that probes this machine.

A plan places a model into `Device`s — each GPU and the CPU RAM, with a capacity and
a peak memory bandwidth — grouped as `Hardware`. They come from a built-in profile
(`profile`), from `--gpu`/`--ram` specs (`hardware_from_specs`) or from this machine
(`detect_hardware`: the GPUs llama.cpp's backend registry reports, RAM from MemAvailable).

The probes of this machine live here too — RAM, CPU cores, disk space, the GPUs the
drivers report — so the planner, `doctor` and `pull` read the machine the same way.

Hardware sizes are binary: an "80GB" H100 reports 81559 MiB and DIMMs are binary, so
`parse_size` reads "GB" and "GiB" alike as 2**30.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from smallfour.errors import SmallfourError
from smallfour.placement import gpu_devices

GiB = 1024**3
MiB = 1024**2

# Kept free on every device: allocator fragmentation, other processes, a desktop session.
GPU_HEADROOM = 0.05
RAM_HEADROOM = 0.10

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


# --- what a plan places into --------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """One memory pool a plan fills: a GPU or the CPU RAM (not llama.cpp's `BackendDevice`:
    this one may be hypothetical, from a profile or a spec, and carries a bandwidth)."""

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


def detect_hardware() -> Hardware:
    """This machine: discrete GPUs (free memory) from llama.cpp's backend registry, RAM from MemAvailable.

    Integrated GPUs share system RAM and are not counted. RAM bandwidth cannot be
    measured here and is assumed dual-channel DDR5.
    """
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


# --- probes of this machine ---------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    total: int
    available: int  # what a new process can take without swapping
    swap_total: int
    source: str  # "/proc/meminfo", "sysconf" or "unknown"


def memory() -> Memory:
    """RAM and swap in bytes, from /proc/meminfo (Linux) or sysconf."""
    fields: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                fields[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    if "MemTotal" in fields:
        return Memory(fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0)),
                      fields.get("SwapTotal", 0), "/proc/meminfo")
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return Memory(page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES"), 0, "sysconf")
    except (ValueError, OSError, AttributeError):
        return Memory(0, 0, 0, "unknown")


def mem_available() -> int:
    """Bytes of RAM a model can take here: what the planner places into when it plans for this machine."""
    available = memory().available
    if not available:
        raise SmallfourError("cannot read MemAvailable from /proc/meminfo")
    return available


@dataclass(frozen=True)
class Cpu:
    model: str
    cores: int  # logical CPUs (hardware threads)
    machine: str


def cpu() -> Cpu:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return Cpu(model, os.cpu_count() or 0, platform.machine())


def physical_cores() -> int:
    """Cores this process may run on, a core's second hardware thread not counted.

    Decode is bound by memory bandwidth: a thread per physical core reads as fast as
    one per hardware thread, and the extra threads only wait on each other.
    """
    try:
        allowed: set[int] | None = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        allowed = None
    cores, processor, package = set(), None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor":
                processor = int(value)
            elif key == "physical id":
                package = value
            elif key == "core id" and (allowed is None or processor in allowed):
                cores.add((package, value))
    except (OSError, ValueError):
        cores = set()
    return len(cores) or (len(allowed) if allowed else os.cpu_count() or 1)


class DiskSpace(NamedTuple):
    total: int
    free: int


def disk_space(path: Path) -> DiskSpace:
    """Bytes of the file system `path` is on, or would be created on (that of its nearest existing folder)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return DiskSpace(usage.total, usage.free)


def disk_free(path: Path) -> int:
    """Free bytes where `path` is, or would be created."""
    return disk_space(path).free


@dataclass(frozen=True)
class SystemGpu:
    vendor: str  # "NVIDIA", "AMD" or "Apple"
    name: str
    memory_total: int | None  # bytes; None where the tool does not say
    memory_free: int | None


def _run(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def system_gpus() -> list[SystemGpu]:
    """GPUs the machine has, whatever llama.cpp was built for: NVIDIA via nvidia-smi, AMD via rocm-smi, Apple."""
    gpus = []
    if shutil.which("nvidia-smi"):
        output = _run(["nvidia-smi", "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"])
        for line in (output or "").splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 3 and parts[1].replace(".", "").isdigit():
                free = int(float(parts[2]) * 2**20) if parts[2].replace(".", "").isdigit() else None
                gpus.append(SystemGpu("NVIDIA", parts[0], int(float(parts[1]) * 2**20), free))
    if shutil.which("rocm-smi"):
        output = _run(["rocm-smi", "--showproductname", "--json"])
        try:
            for card, values in (json.loads(output) if output else {}).items():
                name = values.get("Card Series") or values.get("Card series") or card
                gpus.append(SystemGpu("AMD", name, None, None))
        except (ValueError, AttributeError):
            pass
    if sys.platform == "darwin" and platform.machine() == "arm64":
        gpus.append(SystemGpu("Apple", "Apple silicon GPU (unified memory)", None, None))
    return gpus
