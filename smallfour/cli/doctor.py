"""`smallfour doctor`: the install's report (the probes and the diagnosis are `smallfour.doctor`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from smallfour.cli.options import AsJson
from smallfour.console import out

_LEVEL_STYLE = {"ok": "green", "info": "cyan", "warn": "yellow", "fail": "bold red"}


def doctor(
    as_json: AsJson = False,
    scan: Annotated[Optional[list[Path]], typer.Option("--scan", help="Also look in DIR for partial outputs left by "
                                                                      "killed convert/quantize runs (the store and "
                                                                      "the current directory are always "
                                                                      "checked).")] = None,
) -> None:
    """Check this install: llama.cpp backend (CPU/CUDA/Metal/Vulkan), GPUs, RAM, disk, versions — and what to fix."""
    from smallfour.doctor import collect
    from smallfour.store import human_bytes

    report = collect(scan)
    failed = any(f["level"] == "fail" for f in report["findings"])
    if as_json:
        print(json.dumps(report, indent=2))
        raise typer.Exit(1 if failed else 0)
    llama = report["llama_cpp"]
    out(("llama.cpp", "bold"))
    if llama.get("importable"):
        backends = ", ".join(llama.get("backends", [])) or "?"
        out(f"  llama-cpp-python {llama.get('version')}; backends: {backends}; "
            f"GPU offload: {'yes' if llama.get('gpu_offload') else 'no'}")
        out(f"  system info: {llama.get('system_info')}")
        devices = Table("device", "type", "backend", "description", "free", "total", title_justify="left")
        for d in llama.get("devices", []):
            devices.add_row(d["name"], d["type"], d["backend"], d["description"], human_bytes(d["memory_free"]),
                            human_bytes(d["memory_total"]))
        out(devices)
    else:
        out(f"  not importable: {llama.get('error')}")
    gpus = report["system_gpus"]
    out(("GPUs", "bold"), " " + ("; ".join(
        f"{g['name']} ({human_bytes(g['memory_free'])} free of {human_bytes(g['memory_total'])})"
        if g.get("memory_total") else g["name"] for g in gpus) if gpus else "none found (nvidia-smi, rocm-smi)"))
    ram, machine = report["memory"], report["cpu"]
    out(("CPU", "bold"), f" {machine['model']}, {machine['cores']} threads")
    out(("RAM", "bold"), f" {human_bytes(ram['total'])} total, {human_bytes(ram['available'])} available, "
        f"swap {human_bytes(ram['swap_total'])}")
    for disk in report["disks"]:
        out(("disk", "bold"), f" {disk['role']}: {disk['path']} — {human_bytes(disk['free'])} free of "
            f"{human_bytes(disk['total'])}")
    hub = report["store"]
    out(("hub", "bold"), f" {hub['hf_endpoint']}" + (" (HF_HUB_OFFLINE set)" if hub["hf_hub_offline"] else ""))
    out(("versions", "bold"), " " + ", ".join(f"{name} {version or 'not installed'}"
                                              for name, version in report["versions"].items()))
    out()
    for finding in report["findings"]:
        out((f"{finding['level']:>4}", _LEVEL_STYLE[finding["level"]]), f" {finding['topic']}: {finding['message']}")
        if finding["fix"]:
            out(f"      fix: {finding['fix']}")
    if failed:
        raise typer.Exit(1)
