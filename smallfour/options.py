"""What every command that loads a model shares: consoles, error reporting, placement options.

`run`, `chat` and `batch` take the same placement flags and go through
`placement_for`, which applies `--plan auto` and refuses a load the planner says
will not fit (unless `--force`) before llama.cpp starts allocating.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from convert.errors import ConversionError
from smallfour.errors import SmallfourError

out = Console()
err = Console(stderr=True)

VERBOSE = typer.Option(False, "-v", "--verbose", help="Show llama.cpp's own log on stderr.")
GENERATION_HELP = "Generation"

# Sampling overrides shared by run and chat; None keeps the preset's value.
TEMPERATURE = typer.Option(None, "--temperature", min=0.0, rich_help_panel=GENERATION_HELP,
                           help="Sampling temperature; 0 is greedy.")
TOP_P = typer.Option(None, "--top-p", min=0.0, max=1.0, rich_help_panel=GENERATION_HELP,
                     help="Nucleus sampling threshold.")
TOP_K = typer.Option(None, "--top-k", min=0, rich_help_panel=GENERATION_HELP,
                     help="Sample among the K likeliest tokens; 0 = no limit.")
SEED = typer.Option(None, "--seed", rich_help_panel=GENERATION_HELP, help="Sampling seed, for repeatable output.")

PLACEMENT_HELP = "Placement"
CPU_EXPERTS = typer.Option("none", "--cpu-experts", rich_help_panel=PLACEMENT_HELP,
                           help="Keep routed experts in CPU RAM: all, none, N = those of the first N layers "
                                "(llama.cpp's --n-cpu-moe convention), or auto = as many as the planner says.")
OVERRIDE_TENSOR = typer.Option(None, "--override-tensor", "-ot", rich_help_panel=PLACEMENT_HELP,
                               help="REGEX=DEVICE: put matching tensors on DEVICE (CPU, CUDA0, …); repeatable, "
                                    "llama.cpp's syntax.")
GPU_LAYERS = typer.Option(-1, "--gpu-layers", "-ngl", rich_help_panel=PLACEMENT_HELP,
                          help="Layers to offload to GPU(s); -1 = all, 0 = CPU only.")
GPUS = typer.Option(None, "--gpus", rich_help_panel=PLACEMENT_HELP,
                    help="Use the first N GPUs, split evenly; 0 = CPU only.")
TENSOR_SPLIT = typer.Option(None, "--tensor-split", rich_help_panel=PLACEMENT_HELP,
                            help="Share of the model per GPU, e.g. 1,1,1,1 or 3,1.")
SPLIT_MODE = typer.Option("layer", "--split-mode", rich_help_panel=PLACEMENT_HELP,
                          help="How to split across GPUs: layer, row or none.")
MAIN_GPU = typer.Option(0, "--main-gpu", rich_help_panel=PLACEMENT_HELP,
                        help="GPU for the whole model with --split-mode none, and for scratch buffers.")
KV_TYPE = typer.Option("f16", "--kv-type", rich_help_panel=PLACEMENT_HELP,
                       help="KV cache type: f16, bf16, f32, or q8_0 (needs --flash-attn). Mistral Small 4 caches "
                            "only the MLA latent (23 KB per token in f16).")
FLASH_ATTN = typer.Option(False, "--flash-attn/--no-flash-attn", rich_help_panel=PLACEMENT_HELP,
                          help="Use flash attention.")
PLAN = typer.Option("check", "--plan", rich_help_panel=PLACEMENT_HELP,
                    help="auto: place layers, experts and the GPU split as `smallfour plan` decides (your "
                         "placement flags are ignored); check: keep your flags, but refuse to load what the "
                         "planner says cannot fit here.")
FORCE_LOAD = typer.Option(False, "--force", rich_help_panel=PLACEMENT_HELP,
                          help="Load even when the planner says the model will not fit in this machine's memory.")


def reports_errors(command):
    """Turn our errors into one red line on stderr and exit code 1; Ctrl-C into exit code 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (SmallfourError, ConversionError) as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def read_json_file(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SmallfourError(f"cannot read {what} file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise SmallfourError(f"{what} file {path} is not valid JSON: {exc}") from None


@dataclass(frozen=True)
class PlacementFlags:
    """The placement options of a command that loads a model, as the user gave them."""

    cpu_experts: str = "none"
    override_tensor: list[str] | None = None
    gpu_layers: int = -1
    gpus: int | None = None
    tensor_split: str | None = None
    split_mode: str = "layer"
    main_gpu: int = 0
    kv_type: str = "f16"
    flash_attn: bool = False
    plan: str = "check"
    force: bool = False

    def resolve(self, model: Path, n_ctx: int, hardware=None, mmproj: Path | None = None):
        return placement_for(model, n_ctx=n_ctx, mmproj=mmproj, kv_type=self.kv_type, cpu_experts=self.cpu_experts,
                             override_tensor=self.override_tensor, gpu_layers=self.gpu_layers, gpus=self.gpus,
                             tensor_split=self.tensor_split, split_mode=self.split_mode, main_gpu=self.main_gpu,
                             flash_attn=self.flash_attn, plan=self.plan, force=self.force, hardware=hardware)


_PLACEMENT_OPTIONS = {
    "cpu_experts": (str, CPU_EXPERTS), "override_tensor": (Optional[list[str]], OVERRIDE_TENSOR),
    "gpu_layers": (int, GPU_LAYERS), "gpus": (Optional[int], GPUS), "tensor_split": (Optional[str], TENSOR_SPLIT),
    "split_mode": (str, SPLIT_MODE), "main_gpu": (int, MAIN_GPU), "kv_type": (str, KV_TYPE),
    "flash_attn": (bool, FLASH_ATTN), "plan": (str, PLAN), "force": (bool, FORCE_LOAD),
}


def with_placement_options(command):
    """Give a Typer command the placement options; it receives them as one `placement: PlacementFlags`.

    The options are appended to the command's signature, which is what Typer reads, so
    `run`, `chat` and `batch` declare them once, here.
    """
    signature = inspect.signature(command)
    kept = [p for p in signature.parameters.values() if p.name != "placement"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
             for name, (annotation, option) in _PLACEMENT_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        flags = PlacementFlags(**{name: kwargs.pop(name) for name in _PLACEMENT_OPTIONS})
        return command(*args, placement=flags, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=kept + added)
    wrapper.__annotations__ = {k: v for k, v in command.__annotations__.items() if k != "placement"} | \
        {name: annotation for name, (annotation, _) in _PLACEMENT_OPTIONS.items()}
    return wrapper


def placement_for(model: Path, *, n_ctx: int, kv_type: str, cpu_experts: str, override_tensor: list[str] | None,
                  gpu_layers: int, gpus: int | None, tensor_split: str | None, split_mode: str, main_gpu: int,
                  flash_attn: bool, plan: str, force: bool, hardware=None, mmproj: Path | None = None):
    """The placement to load `model` with, from the command's flags and the planner.

    With `--plan auto` (or `--cpu-experts auto`) the planner's layout replaces the flags.
    Either way a model the planner says cannot fit is refused unless `force`.
    """
    from smallfour.placement import Placement, parse_override, parse_tensor_split, split_for_gpus
    from smallfour.plan import plan_for_load

    if plan not in ("auto", "check"):
        raise SmallfourError(f"--plan {plan!r}: expected auto or check")
    automatic = plan == "auto" or cpu_experts == "auto"
    decided = plan_for_load(model, n_ctx, kv_type, hardware, flash_attn=flash_attn, mmproj=mmproj)
    if not decided.fits:
        if not force:
            raise SmallfourError(f"{model.name}: {decided.verdict} (--force loads it anyway)")
        err.print(f"[yellow]warning:[/] {decided.verdict}; loading anyway (--force)", highlight=False, soft_wrap=True)
    overrides = tuple(parse_override(o) for o in override_tensor or ())
    if automatic:
        params = decided.llama_params
        err.print(f"plan: {' '.join(decided.run_flags())}", style="dim", highlight=False, soft_wrap=True)
        return Placement(n_gpu_layers=params["n_gpu_layers"], tensor_split=_tuple(params["tensor_split"]),
                         cpu_experts=str(params["cpu_experts"]) if params["cpu_experts"] else "none",
                         overrides=overrides, flash_attn=flash_attn)
    layers_override, split = split_for_gpus(gpus, parse_tensor_split(tensor_split))
    return Placement(n_gpu_layers=gpu_layers if layers_override is None else layers_override, split_mode=split_mode,
                     main_gpu=main_gpu, tensor_split=split, cpu_experts=cpu_experts, overrides=overrides,
                     flash_attn=flash_attn)


def _tuple(values):
    return tuple(float(v) for v in values) if values else None
