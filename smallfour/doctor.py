"""`smallfour doctor`: what this machine and this install can run, and what to do about what is missing.

The llama.cpp backend and devices come from llama.cpp itself — its system info
string and the ggml backend registry of the library llama-cpp-python loaded —
so they say what *this build* can use, not what the hardware has. GPUs the
build cannot see are looked up with `nvidia-smi` / `rocm-smi` so the doctor can
say "you have a GPU, rebuild llama-cpp-python for it".
"""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from smallfour import hardware, store
from smallfour.placement import backend_devices, backend_names

LLAMA_CPP_PIN = "0.3.36"
PACKAGES = ("smallfour", "llama-cpp-python", "gguf", "mistral-common", "huggingface-hub", "hf-xet", "numpy", "typer",
            "rich", "transformers", "torch")
GB = 1e9
# Sizes of the real model (docs/benchmarks.md, the brief): the smallest usual GGUF, the Q8_0 one and the release.
Q4_GGUF_BYTES = 67 * GB
Q8_GGUF_BYTES = 126 * GB
RELEASE_BYTES = 120 * GB  # FP8 text weights + BF16 vision tower, embeddings and output head

REINSTALL = ('CMAKE_ARGS="{flag}" pip install --force-reinstall --no-cache-dir --no-deps '
             f"llama-cpp-python=={LLAMA_CPP_PIN}")
BUILD_FLAGS = {"CUDA": "-DGGML_CUDA=on", "Metal": "-DGGML_METAL=on", "Vulkan": "-DGGML_VULKAN=on",
               "ROCm": "-DGGML_HIP=on"}


@dataclass
class Finding:
    level: str  # "ok", "info", "warn" or "fail"
    topic: str
    message: str
    fix: str | None = None


def reinstall_command(backend: str) -> str:
    return REINSTALL.format(flag=BUILD_FLAGS[backend])


# --- llama.cpp ---------------------------------------------------------------------------------------------


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """`llama_print_system_info()` → {backend: {feature: value}}: "CPU : AVX2 = 1 | … | CUDA : ARCHS = 890 | …"."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for part in (p.strip() for p in text.split("|")):
        if not part:
            continue
        head, sep, rest = part.partition(" : ")
        if sep:
            current = sections.setdefault(head.strip(), {})
            part = rest
        if current is None:
            continue
        key, _, value = part.partition("=")
        current[key.strip()] = value.strip()
    return sections


def llama_cpp_report() -> dict:
    """What the installed llama.cpp build has: version, system info, backends, devices with their memory."""
    try:
        import llama_cpp
    except Exception as exc:  # noqa: BLE001 - an import failure is the finding
        return {"importable": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    report: dict = {"importable": True, "version": getattr(llama_cpp, "__version__", None)}
    try:
        info = llama_cpp.llama_print_system_info()
        info = info.decode("utf-8", errors="replace") if isinstance(info, bytes) else str(info)
    except Exception as exc:  # noqa: BLE001
        info = f"unavailable: {exc}"
    report["system_info"] = info.strip()
    report["system_info_sections"] = parse_system_info(info)
    try:
        report["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # noqa: BLE001
        report["gpu_offload"] = None
    try:
        report["backends"] = backend_names()
        report["devices"] = [{"name": d.name, "description": d.description, "type": d.kind, "backend": d.backend,
                              "memory_free": d.free_bytes, "memory_total": d.total_bytes}
                             for d in backend_devices()]
    except (OSError, AttributeError) as exc:
        report["backends"], report["devices"] = list(report["system_info_sections"]), []
        report["registry_error"] = str(exc)
    return report


# --- the machine -----------------------------------------------------------------------------------------------


def disks() -> list[dict]:
    places = [("hub cache (pulled checkpoints)", store.hub_cache()), ("smallfour store (GGUFs)", store.gguf_dir())]
    found = []
    for role, path in places:
        usage = hardware.disk_space(path)
        found.append({"role": role, "path": str(path), "exists": path.exists(), "free": usage.free,
                      "total": usage.total})
    return found


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


# --- the diagnosis ---------------------------------------------------------------------------------------------


def diagnose(report: dict) -> list[Finding]:
    findings: list[Finding] = []
    llama = report["llama_cpp"]
    if not llama.get("importable"):
        findings.append(Finding("fail", "llama.cpp", f"llama-cpp-python cannot be imported ({llama.get('error')})",
                                f"pip install llama-cpp-python=={LLAMA_CPP_PIN} (builds llama.cpp from source: "
                                "a C/C++ compiler and CMake are needed; see docs/install.md)"))
        return findings + _resource_findings(report, gpu_bytes=0)
    version = llama.get("version")
    if version != LLAMA_CPP_PIN:
        findings.append(Finding("warn", "llama.cpp", f"llama-cpp-python {version} is installed; smallfour is built "
                                f"and tested against {LLAMA_CPP_PIN} (its llama.cpp has the mistral4 architecture)",
                                f"pip install --no-deps llama-cpp-python=={LLAMA_CPP_PIN}"))
    gpu_backends = [b for b in llama.get("backends", []) if b not in ("CPU", "BLAS", "RPC")]
    gpu_devices = [d for d in llama.get("devices", []) if d["type"] in ("GPU", "iGPU")]
    system = report["system_gpus"]
    if gpu_devices:
        names = ", ".join(f"{d['name']} ({d['description']}, {store.human_bytes(d['memory_free'])} free)"
                          for d in gpu_devices)
        findings.append(Finding("ok", "backend", f"llama.cpp uses {'+'.join(gpu_backends)}: {names}"))
    elif gpu_backends:
        findings.append(Finding("warn", "backend", f"llama.cpp was built with {'+'.join(gpu_backends)} but sees no GPU "
                                "(driver not loaded, or CUDA_VISIBLE_DEVICES hides them)",
                                "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"))
    else:
        vendors = {g["vendor"] for g in system}
        backend = next((b for vendor, b in (("NVIDIA", "CUDA"), ("AMD", "ROCm"), ("Apple", "Metal"))
                        if vendor in vendors), None)
        if backend:
            findings.append(Finding("warn", "backend", f"this llama.cpp build is CPU-only, but the machine has "
                                    f"{', '.join(g['name'] for g in system)}: llama.cpp cannot use it",
                                    f"rebuild llama-cpp-python for it: {reinstall_command(backend)}"
                                    + (" (needs the CUDA toolkit, nvcc)" if backend == "CUDA" else "")))
        else:
            findings.append(Finding("info", "backend", "this llama.cpp build is CPU-only and no GPU was found: "
                                    "models run on the CPU, from RAM",
                                    "on a machine with an NVIDIA GPU, rebuild llama-cpp-python with CUDA: "
                                    f"{reinstall_command('CUDA')} (Apple silicon: {BUILD_FLAGS['Metal']}, "
                                    f"AMD: {BUILD_FLAGS['ROCm']}, other GPUs: {BUILD_FLAGS['Vulkan']})"))
    gpu_bytes = sum(d["memory_free"] for d in gpu_devices if d["type"] == "GPU")
    return findings + _resource_findings(report, gpu_bytes)


def _resource_findings(report: dict, gpu_bytes: int) -> list[Finding]:
    findings = []
    ram = report["memory"]
    room = ram["total"] + gpu_bytes
    where = f"{store.human_bytes(ram['total'])} RAM" + (f" + {store.human_bytes(gpu_bytes)} free GPU memory"
                                                         if gpu_bytes else "")
    if room < Q4_GGUF_BYTES:
        findings.append(Finding("warn", "memory", f"{where}: Mistral Small 4 needs about {Q4_GGUF_BYTES / GB:.0f} GB "
                                "at Q4_K_M, more than this machine holds; only the tiny demo model will run "
                                "(smallfour demo)", "use a machine with ≥96 GB of RAM, or RAM plus a 24 GB+ GPU"))
    elif room < Q8_GGUF_BYTES:
        findings.append(Finding("ok", "memory", f"{where}: room for a ~4-bit GGUF (≈{Q4_GGUF_BYTES / GB:.0f} GB), "
                                f"not for Q8_0 (≈{Q8_GGUF_BYTES / GB:.0f} GB)"))
    else:
        findings.append(Finding("ok", "memory", f"{where}: room for Q8_0 (≈{Q8_GGUF_BYTES / GB:.0f} GB)"))
    hub = report["disks"][0]
    if hub["free"] < RELEASE_BYTES:
        findings.append(Finding("warn", "disk", f"{store.human_bytes(hub['free'])} free for the hub cache "
                                f"({hub['path']}); pulling the release needs ≈{RELEASE_BYTES / GB:.0f} GB",
                                "free space, or point HF_HUB_CACHE (or HF_HOME) at a bigger disk"))
    else:
        findings.append(Finding("ok", "disk",
                                f"{store.human_bytes(hub['free'])} free for the hub cache ({hub['path']})"))
    missing = [name for name in ("llama-cpp-python", "gguf", "mistral-common", "huggingface-hub")
               if report["versions"].get(name) is None]
    if missing:
        findings.append(Finding("fail", "packages", f"not installed: {', '.join(missing)}", "pip install -e ."))
    return findings


def leftover_findings(directories: list[Path]) -> list[Finding]:
    """Partial outputs of convert/quantize runs that were killed (kill -9, OOM) before they could remove them."""
    from convert.output import stale_partials

    findings = []
    for directory in dict.fromkeys(directories):
        for path in stale_partials(directory):
            findings.append(Finding("warn", "leftovers", f"{path} ({store.human_bytes(path.stat().st_size)}) was "
                                    "left by an interrupted convert or quantize",
                                    f"rm {path}  (the next run writing into {directory} also removes it)"))
    return findings


def collect(scan: list[Path] | None = None) -> dict:
    """The report; `scan` adds directories to look in for leftover partial outputs (the store and cwd always)."""
    report = {"llama_cpp": llama_cpp_report(), "system_gpus": [asdict(g) for g in hardware.system_gpus()],
              "memory": asdict(hardware.memory()), "cpu": asdict(hardware.cpu()),
              "disks": disks(), "versions": versions(), "platform": platform.platform(),
              "store": {"hub_cache": str(store.hub_cache()), "smallfour_home": str(store.smallfour_home()),
                        "hf_endpoint": _hf_endpoint(), "hf_hub_offline": _hf_offline()}}
    findings = diagnose(report) + leftover_findings([store.gguf_dir(), Path.cwd(), *(scan or [])])
    report["findings"] = [asdict(f) for f in findings]
    return report


def _hf_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)

