"""`smallfour doctor`: the install's report (the probes and the diagnosis are `smallfour.doctor`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from smallfour.cli.options import AsJson
from smallfour.console import err, out

_LEVEL_STYLE = {"ok": "green", "info": "cyan", "warn": "yellow", "fail": "bold red"}


def doctor(
    as_json: AsJson = False,
    scan: Annotated[Optional[list[Path]], typer.Option("--scan", help="Also look in DIR for partial outputs left by "
                                                                      "killed convert/quantize runs (the store and "
                                                                      "the current directory are always "
                                                                      "checked).")] = None,
    check_gpu: Annotated[bool, typer.Option("--check-gpu", help="Instead: run the GPU self-check (GPU against CPU "
                                                                "logits, expert offload, planner bytes, vision, "
                                                                "speed) on the demo model and a 450 MB fixture; "
                                                                "exit 0 only if every check holds.")] = False,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="With --check-gpu: also write the "
                                                                          "results as JSON to FILE.")] = None,
    logs: Annotated[Optional[Path], typer.Option("--logs", help="With --check-gpu: keep llama.cpp's log of every "
                                                               "run (one file per model and step) in DIR.")] = None,
) -> None:
    """Check this install: llama.cpp backend (CPU/CUDA/Metal/Vulkan), GPUs, RAM, disk, versions — and what to fix."""
    from smallfour.doctor import collect
    from smallfour.store import human_bytes

    if check_gpu:
        _check_gpu(as_json, output, logs)
        return
    if output is not None or logs is not None:
        raise typer.BadParameter("goes with --check-gpu", param_hint="--output" if output is not None else "--logs")
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


_OK_STYLE = {True: ("ok", "green"), False: ("FAIL", "bold red"), None: ("info", "cyan")}


def gpu_table(report: dict) -> Table:
    table = Table("model", "check", "", "measured", title=f"GPU self-check on {', '.join(report['gpus']) or 'no GPU'}",
                  title_justify="left")
    for check in report["checks"]:
        word, style = _OK_STYLE[check["ok"]]
        table.add_row(check["model"], check["name"], Text(word, style), check["detail"])
    return table


def _check_gpu(as_json: bool, output: Path | None, logs: Path | None) -> None:
    """`doctor --check-gpu`: the table (or JSON on stdout), the JSON file, exit 1 if any check failed."""
    from smallfour.gpucheck import default_subjects, gpu_names_or_refuse, run_checks

    gpus = gpu_names_or_refuse()

    def say(text: str) -> None:  # one line per step (each a load and a few measurements: seconds)
        err((f"{time.perf_counter() - started:6.1f} s ", "dim"), text)

    started = time.perf_counter()
    report = run_checks(default_subjects(say), gpus, say, logs, output)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        out(gpu_table(report))
        out((("all checks hold" if report["passed"] else "some checks failed")
             + " (what a failure means: docs/troubleshooting.md)", "bold green" if report["passed"] else "bold red"))
    if not report["passed"]:
        raise typer.Exit(1)
