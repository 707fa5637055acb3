"""The placement a model loads with: the user's placement flags, checked (or replaced) by the planner.

`run`, `chat`, `batch` and `imatrix` take the same placement flags and go through
`placement_for`, which applies `--plan auto` and refuses a load the planner says
will not fit (unless `--force`) before llama.cpp starts allocating.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smallfour.console import err, note
from smallfour.errors import SmallfourError


@dataclass(frozen=True)
class PlacementFlags:
    """The placement options of a command that loads a model, as the user gave them; the defaults are the CLI's."""

    cpu_experts: str = "none"
    override_tensor: list[str] | None = None
    gpu_layers: int = -1
    gpus: int | None = None
    tensor_split: str | None = None
    split_mode: str = "layer"
    main_gpu: int = 0
    kv_type: str = "f16"
    flash_attn: bool = True  # as `plan` assumes: without it long contexts need far larger compute buffers
    plan: str = "check"
    force: bool = False
    rpc: str | None = None  # HOST:PORT[,…] of `smallfour worker`s

    def connect(self) -> None:
        """Add the `--rpc` workers' devices to llama.cpp's device list, before anything counts or places devices."""
        if self.rpc:
            from smallfour.model import llama_log_callback
            from smallfour.rpc import attach, parse_endpoints

            llama_log_callback()  # ggml logs loading the RPC backend: like llama.cpp's own log, shown only with -v
            attach(parse_endpoints(self.rpc))

    def resolve(self, model: Path, n_ctx: int, hardware=None, mmproj: Path | None = None):
        return placement_for(model, n_ctx=n_ctx, mmproj=mmproj, kv_type=self.kv_type, cpu_experts=self.cpu_experts,
                             override_tensor=self.override_tensor, gpu_layers=self.gpu_layers, gpus=self.gpus,
                             tensor_split=self.tensor_split, split_mode=self.split_mode, main_gpu=self.main_gpu,
                             flash_attn=self.flash_attn, plan=self.plan, force=self.force, hardware=hardware)


def placement_for(model: Path, *, n_ctx: int, kv_type: str, cpu_experts: str, override_tensor: list[str] | None,
                  gpu_layers: int, gpus: int | None, tensor_split: str | None, split_mode: str, main_gpu: int,
                  flash_attn: bool, plan: str, force: bool, hardware=None, mmproj: Path | None = None):
    """The placement to load `model` with, from the command's flags and the planner.

    With `--plan auto` (or `--cpu-experts auto`) the planner's layout replaces the flags.
    Either way a model the planner says cannot fit is refused unless `force`.
    """
    from smallfour.placement import Placement, parse_override, parse_tensor_split, split_for_gpus
    from smallfour.planner import plan_for_load

    if plan not in ("auto", "check"):
        raise SmallfourError(f"--plan {plan!r}: expected auto or check")
    automatic = plan == "auto" or cpu_experts == "auto"
    decided = plan_for_load(model, n_ctx, kv_type, hardware, flash_attn=flash_attn, mmproj=mmproj)
    if not decided.fits:
        if not force:
            raise SmallfourError(f"{model.name}: {decided.verdict} (--force loads it anyway)")
        err(("warning:", "yellow"), f" {decided.verdict}; loading anyway (--force)")
    overrides = tuple(parse_override(o) for o in override_tensor or ())
    if automatic:
        params = decided.llama_params
        note(f"plan: {' '.join(decided.run_flags())}")
        return Placement(n_gpu_layers=params["n_gpu_layers"], tensor_split=_tuple(params["tensor_split"]),
                         cpu_experts=str(params["cpu_experts"]) if params["cpu_experts"] else "none",
                         overrides=overrides, flash_attn=flash_attn)
    layers_override, split = split_for_gpus(gpus, parse_tensor_split(tensor_split))
    return Placement(n_gpu_layers=gpu_layers if layers_override is None else layers_override, split_mode=split_mode,
                     main_gpu=main_gpu, tensor_split=split, cpu_experts=cpu_experts, overrides=overrides,
                     flash_attn=flash_attn)


def _tuple(values):
    return tuple(float(v) for v in values) if values else None
