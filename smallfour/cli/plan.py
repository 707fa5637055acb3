"""`smallfour plan`: where a model would go on this machine (or a named one), as tables or JSON.

The planning itself is `smallfour.planner`; this module reads the options, picks the
model (a GGUF, a checkpoint config, or the built-in real Mistral Small 4 config) and
the hardware (a profile, `--gpu`/`--ram`, or this machine), and prints the result.
Heavy imports (gguf pulls in mistral-common) wait until the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from smallfour.cli.options import DEFAULT_CTX, DEFAULT_KV_TYPE, PLACEMENT_HELP, AsJson, Ctx, KvType, Recipe
from smallfour.console import out
from smallfour.errors import SmallfourError

if TYPE_CHECKING:
    from smallfour.planner import DevicePlan, Plan

# Kept literal so `--help` costs no gguf import; tests check it lists every profile.
PROFILE_NAMES = "4xH100, 2xH200, 1xH100+256GB, 24GB+128GB, cpu-96GB"
EXIT_DOES_NOT_FIT = 3

# Display names, in display order.
ROLE_LABELS = {
    "embeddings": "token embeddings",
    "routed_experts": "routed experts",
    "attention": "attention (MLA)",
    "shared_expert": "shared expert",
    "dense_ffn": "dense FFN",
    "router": "router",
    "norm": "norms",
    "output": "output (lm head)",
}


def plan(
    model: Annotated[Optional[str], typer.Argument(help="GGUF to plan for (a file, a name from smallfour models, "
                                                        "or a pulled GGUF repo); or use --config / --model.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="config.json or params.json (or a checkpoint "
                                                                    "directory): plan before downloading "
                                                                    "anything.")] = None,
    builtin: Annotated[Optional[str], typer.Option("--model", help="Built-in config: mistral-small-4 (the real "
                                                                   "119B hyper-parameters).")] = None,
    recipe: Recipe = "bf16",
    hw_profile: Annotated[Optional[str], typer.Option("--profile", help=f"Hardware profile: "
                                                                        f"{PROFILE_NAMES}.")] = None,
    gpu: Annotated[Optional[list[str]], typer.Option("--gpu", help="A GPU, repeated per GPU: h100, h200, a100, "
                                                                   "rtx4090, or a size like 80GB (GB = GiB), "
                                                                   "optionally @BANDWIDTH (24GB@1TB/s).")] = None,
    ram: Annotated[Optional[str], typer.Option("--ram", help="CPU RAM, e.g. 128GB or 256GB@300GB/s (default "
                                                             "bandwidth: dual-channel DDR5, 80 GB/s).")] = None,
    ctx: Ctx = DEFAULT_CTX,
    kv_type: KvType = DEFAULT_KV_TYPE,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompt batch (llama.cpp n_batch = "
                                                                        "n_ubatch).")] = 512,
    flash_attn: Annotated[bool, typer.Option("--flash-attn/--no-flash-attn", rich_help_panel=PLACEMENT_HELP,
                                             help="Plan with flash attention (without it, long contexts need far "
                                                  "larger compute buffers).")] = True,
    mmproj: Annotated[Optional[Path], typer.Option("--mmproj", help="Vision projector GGUF to count beside the "
                                                                    "model.")] = None,
    vision: Annotated[bool, typer.Option("--vision", help="Count the real projector (≈0.8 GB) without a "
                                                          "file.")] = False,
    engine: Annotated[Optional[str], typer.Option("--engine", help="vllm or sglang: print the serve command for "
                                                                   "the original FP8 release on --profile / --gpu "
                                                                   "instead (no model argument).")] = None,
    rpc: Annotated[Optional[str], typer.Option("--rpc", rich_help_panel=PLACEMENT_HELP,
                                               help="Workers (smallfour worker) whose devices come first in the "
                                                    "plan, comma-separated: HOST:PORT=SIZE (a --gpu spec: 80GB, h100, "
                                                    "24GB@1TB/s) or HOST:PORT to ask the worker.")] = None,
    as_json: AsJson = False,
) -> None:
    """Plan where the model goes — GPUs, CPU RAM, KV cache — before loading it. Exit code 3: it does not fit.

    --recipe applies to --config and --model; a GGUF has its own types.
    """
    if engine is not None:
        if rpc is not None:
            raise SmallfourError("--rpc adds llama.cpp RPC workers; vLLM and SGLang (--engine) join machines their "
                                 "own way")
        _plan_engine(engine, model, config, builtin, _hardware(hw_profile, gpu or [], ram), as_json)
        return
    from smallfour import inventory, planner
    from smallfour.model import default_threads

    the_model = _model(inventory, model, config, builtin, recipe)
    hardware, workers = _with_workers(_hardware(hw_profile, gpu or [], ram), rpc)
    mmproj_bytes = inventory.mmproj_bytes(mmproj) if mmproj else (planner.MMPROJ_ESTIMATE_BYTES if vision else 0)
    settings = planner.Settings(n_ctx=ctx, kv_type=kv_type, n_batch=batch_size, flash_attn=flash_attn,
                                mmproj_bytes=mmproj_bytes)
    result = planner.plan(the_model, hardware, settings)
    parallel = planner.sequences_that_fit(the_model, settings, hardware) if result.fits else 0
    threads = default_threads()
    network = planner.network_bytes_per_token(result, set(range(workers))) if workers else None
    if as_json:
        print(json.dumps(result.as_json() | {"parallel_sequences": parallel, "network_bytes_per_token": network,
                                             "threads": {"generate": threads[0], "prompt": threads[1]}}, indent=2))
    else:
        render(result, model_arg=str(model) if model else "MODEL.gguf")
        if network is not None:
            out(f"network: {network / 1e3:,.1f} kB per generated token to and from the workers (add --rpc to the "
                "flags above; each hand-over also costs a network round trip)")
        if parallel:
            out(f"parallel: {parallel} sequence{'s' if parallel != 1 else ''} of {ctx:,} tokens fit side by side "
                "with this layout (batch/serve --parallel; at most 16 counted)")
        if not (hw_profile or gpu or ram):
            out(f"threads: {threads[0]} generating (physical cores), {threads[1]} reading prompts (all cores)")
    if not result.fits:
        raise typer.Exit(EXIT_DOES_NOT_FIT)


def _plan_engine(engine: str, model: Path | None, config: Path | None, builtin: str | None, hardware,
                 as_json: bool) -> None:
    """`plan --engine`: the vLLM / SGLang command for the FP8 release (`smallfour.scale`)."""
    from smallfour import scale

    if model is not None or config is not None or builtin is not None:
        raise SmallfourError(f"--engine plans the original FP8 release ({scale.FP8_REPO}); give it no model, "
                             "only --profile or --gpu")
    result = scale.plan_scale(engine.lower(), hardware)
    if as_json:
        print(json.dumps(result.as_json(), indent=2))
    elif not result.fits:
        out((scale.does_not_fit(result), "bold red"))
    else:
        replicas = f", {result.data_parallel} replicas (data parallel)" if result.data_parallel > 1 else ""
        out((f"{scale.FP8_REPO} (FP8) with {engine.lower()} on {hardware.name}: tensor parallel "
             f"{result.tensor_parallel}{replicas}, context {result.max_model_len:,} tokens", "bold"))
        out(f"per GPU ({scale.GPU_MEMORY_UTILIZATION:.0%} of {_gib(result.gpu_bytes)} GiB = "
            f"{_gib(result.budget_bytes)} GiB): weights {_gib(result.weights_bytes / result.tensor_parallel)} GiB "
            f"(1/{result.tensor_parallel} of {result.weights_bytes / 1e9:,.1f} GB), overhead "
            f"{_gib(scale.ENGINE_OVERHEAD_BYTES)} GiB, KV cache room {result.kv_tokens:,} tokens "
            f"({result.kv_bytes_per_token:,} bytes/token; the MLA latent is replicated on every rank) = "
            f"{result.kv_tokens / result.max_model_len:,.1f} full-length sequences at once per replica")
        print(" ".join(result.command()))  # plain print: one copy-pasteable line, never wrapped
    if not result.fits:
        raise typer.Exit(EXIT_DOES_NOT_FIT)


def _model(inventory, path: str | None, config: Path | None, builtin: str | None, recipe: str):
    chosen = [x for x in (path, config, builtin) if x is not None]
    if len(chosen) != 1:
        raise SmallfourError("plan needs exactly one of: a GGUF file, --config FILE, or --model mistral-small-4")
    if path is not None:
        from smallfour.store import resolve_gguf

        return inventory.model_from_gguf(resolve_gguf(path))
    if builtin is not None:
        if builtin.lower() != inventory.REAL_MODEL_NAME:
            raise SmallfourError(f"unknown built-in model {builtin!r}; the one built in is {inventory.REAL_MODEL_NAME}")
        return inventory.real_model(recipe)
    return inventory.model_from_config(inventory.load_config(config), recipe, name=str(config))


def _hardware(profile_name: str | None, gpus: list[str], ram: str | None):
    from smallfour.hardware import hardware_from_specs, profile

    base = profile(profile_name) if profile_name else None
    return hardware_from_specs(gpus, ram, base)


def _with_workers(hardware, rpc: str | None):
    """`hardware` with the `--rpc` workers' devices in front, as llama.cpp orders them; and how many there are."""
    if not rpc:
        return hardware, 0
    from smallfour.hardware import Device, Hardware, default_gpu_bandwidth, parse_gpu
    from smallfour.rpc import parse_endpoint, probe

    remote: list[Device] = []
    for item in rpc.split(","):
        address, _, spec = item.partition("=")
        endpoint = parse_endpoint(address)
        if spec:
            device = parse_gpu(spec, 0)
            remote.append(Device(f"RPC{len(remote)} {endpoint} {device.name.split(' ', 1)[1]}", "gpu",
                                 device.capacity_bytes, device.bandwidth))
        else:  # a worker does not say what its devices are: sized by free memory, like an unnamed --gpu
            for free, _total in probe(endpoint).memory:
                remote.append(Device(f"RPC{len(remote)} {endpoint} {_gib(free, 0)} GiB free", "gpu", free,
                                     default_gpu_bandwidth(free)))
    name = f"{len(remote)} RPC device{'s' if len(remote) != 1 else ''} + {hardware.name}"
    return Hardware(name, tuple(remote) + hardware.gpus, hardware.ram), len(remote)


# --- rendering ----------------------------------------------------------------------------

GiB = 1024**3


def _gib(n: float, digits: int = 1) -> str:
    return f"{n / GiB:,.{digits}f}"


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] → "0–2, 5"."""
    if not layers:
        return "—"
    layers = sorted(layers)
    parts, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}–{prev}")
            start = cur
    return ", ".join(parts)


def render(plan: "Plan", model_arg: str = "MODEL.gguf") -> None:
    m, s = plan.model, plan.settings
    source = {"gguf": "GGUF", "config": "checkpoint config", "built-in": "built-in config"}[m.source]
    out((m.name, "bold"), f" ({source}, {m.recipe}) on ", (plan.hardware.name, "bold"),
        f": context {s.n_ctx:,} tokens, KV {s.kv_type}, batch {s.n_batch}, "
        f"flash attention {'on' if s.flash_attn else 'off'}")
    out(f"weights {plan.weights_bytes / 1e9:,.1f} GB ({_gib(plan.weights_bytes)} GiB) · KV cache "
        f"{plan.kv_bytes / 1e9:,.2f} GB ({plan.kv_bytes_per_token:,} bytes/token) · mmproj "
        f"{s.mmproj_bytes / 1e9:,.2f} GB")
    out(_summary_table(plan))
    for d in plan.devices:
        if d.used_bytes and (d.layers or d.weights or d.device.kind == "cpu"):
            out(_device_table(d, s.kv_type))
    out(_params_table(plan))
    out(f"as flags: smallfour run {model_arg} {' '.join(plan.run_flags())}")
    _print_decode(plan)
    out((plan.verdict, "bold green" if plan.fits else "bold red"))
    if len(plan.suggestions) > 1:
        out("other changes that fit: " + "; ".join(plan.suggestions[1:]))


def _summary_table(plan: "Plan") -> Table:
    table = Table("device", "used GiB", "of GiB", "full", "layers", "experts of layers", "bandwidth",
                  title="Placement", title_justify="left")
    for d in plan.devices:
        table.add_row(d.device.name, _gib(d.used_bytes), _gib(d.device.capacity_bytes),
                      f"{100 * d.used_bytes / d.device.capacity_bytes:.0f}%",
                      _ranges(d.layers) + (" + output" if d.holds_output else ""), _ranges(d.expert_layers),
                      f"{d.device.bandwidth / 1e9:,.0f} GB/s", style=None if d.fits else "red")
    return table


def _device_table(d: "DevicePlan", kv_type: str) -> Table:
    cap = d.device.capacity_bytes
    table = Table("holds", "GiB", "% of capacity", title=f"{d.device.name}: {_gib(d.used_bytes)} of "
                  f"{_gib(cap)} GiB ({100 * d.used_bytes / cap:.0f}%)", title_justify="left")
    for role, nbytes in sorted(d.weights.items(), key=lambda item: list(ROLE_LABELS).index(item[0])
                               if item[0] in ROLE_LABELS else len(ROLE_LABELS)):
        label = ROLE_LABELS.get(role, role)
        if role == "routed_experts":
            label += f" (layers {_ranges(d.expert_layers)})"
        table.add_row(label, _gib(nbytes, 2), f"{100 * nbytes / cap:.1f}%")
    for what, nbytes in d.other.items():
        if what.startswith("KV cache"):
            what += f", layers {_ranges(d.layers)}"
        table.add_row(what, _gib(nbytes, 2), f"{100 * nbytes / cap:.1f}%")
    table.add_row("total", _gib(d.used_bytes, 2), f"{100 * d.used_bytes / cap:.1f}%", style="bold")
    table.add_row("limit (capacity less headroom)", _gib(d.device.usable_bytes, 2),
                  f"{100 * d.device.usable_bytes / cap:.1f}%", style="dim")
    return table


def _params_table(plan: "Plan") -> Table:
    table = Table("llama.cpp parameter", "value", title="Parameters", title_justify="left")
    table.columns[1].overflow = "fold"  # the override regex is long and must print whole
    for key, value in plan.llama_params.items():
        table.add_row(key, json.dumps(value))
    return table


def _print_decode(plan: "Plan") -> None:
    est = plan.decode_estimate()
    # Devices that read real weight bytes per token (not just one embedding row).
    readers = [d.device for d in plan.devices if d.read_per_token > 1e6]
    over = ", ".join(f"{d.name} {d.bandwidth / 1e9:,.0f} GB/s at {d.efficiency:.0%}" for d in readers)
    out(f"decode estimate: ~{est['tokens_per_s']:,.0f} tokens/s near an empty context, "
        f"~{est['tokens_per_s_full_context']:,.0f} at {plan.settings.n_ctx:,} tokens "
        f"(ceiling {est['ceiling_tokens_per_s']:,.0f} at peak bandwidth); reads "
        f"{est['bytes_per_token'] / 1e9:.2f} GB of weights per token over {over} of peak")
