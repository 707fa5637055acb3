"""Every option (or argument) that several commands take, declared once: one name, one help text, one default.

A command writes `ctx: Ctx = DEFAULT_CTX`; the alias carries the flag and its help, the
constant beside it the default. The placement options come as a group: a command
decorated with `with_placement_options` gets them all and receives one
`placement: PlacementFlags`, whose dataclass defaults are the options' defaults.
Help texts stay literal so `--help` imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from smallfour.placing import PlacementFlags

GENERATION_HELP = "Generation"
PLACEMENT_HELP = "Placement"

# --- the model a command loads ------------------------------------------------------------------

ModelRef = Annotated[str, typer.Argument(help="GGUF file, a GGUF in the store (smallfour models) or a pulled GGUF "
                                              "repo OWNER/NAME\\[@REVISION]\\[:QUANT].")]
DEFAULT_CTX = 4096
Ctx = Annotated[int, typer.Option("--ctx", min=64, help="Context length to allocate, in tokens.")]
Mmproj = Annotated[Optional[Path], typer.Option("--mmproj", help="Vision projector GGUF (default: "
                                                                 "MODEL's name + -mmproj.gguf beside it).")]
System = Annotated[Optional[str], typer.Option("--system", help="System prompt.")]
Verbose = Annotated[bool, typer.Option("-v", "--verbose", help="Show llama.cpp's own log on stderr.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="CPU threads for generating "
                                                "(default: the physical cores, as llama.cpp chooses).")]
ThreadsBatch = Annotated[Optional[int], typer.Option("--threads-batch", min=1, help="CPU threads for reading "
                                                     "prompts (default: all cores, or --threads if given).")]
Parallel = Annotated[Optional[int], typer.Option("--parallel", "-np", min=1, help="Requests generated at once, "
                                                 "each with its own --ctx (default: as many as the plan fits, "
                                                 "at most 8).")]

# --- generation: None keeps the preset's value --------------------------------------------------

DEFAULT_PRESET = "instant"
Preset = Annotated[str, typer.Option("--preset", rich_help_panel=GENERATION_HELP,
                                     help="instant (no thinking, temperature 0.15), think (reasoning, temperature "
                                          "0.7, top-p 0.95) or think-budget (think, at most 2048 thinking "
                                          "tokens).")]
Effort = Annotated[Optional[str], typer.Option("--effort", rich_help_panel=GENERATION_HELP,
                                               help="Reasoning effort: none or high (overrides the preset's).")]
ThinkBudget = Annotated[Optional[int], typer.Option("--think-budget", min=1, rich_help_panel=GENERATION_HELP,
                                                    help="Most thinking tokens; then \\[/THINK] is forced and the "
                                                         "model answers.")]
MaxTokens = Annotated[Optional[int], typer.Option("--max-tokens", "-n", min=1, rich_help_panel=GENERATION_HELP,
                                                  help="Most tokens per reply, thinking included.")]
Temperature = Annotated[Optional[float], typer.Option("--temperature", min=0.0, rich_help_panel=GENERATION_HELP,
                                                      help="Sampling temperature; 0 is greedy.")]
TopP = Annotated[Optional[float], typer.Option("--top-p", min=0.0, max=1.0, rich_help_panel=GENERATION_HELP,
                                               help="Nucleus sampling threshold.")]
TopK = Annotated[Optional[int], typer.Option("--top-k", min=0, rich_help_panel=GENERATION_HELP,
                                             help="Sample among the K likeliest tokens; 0 = no limit.")]
Seed = Annotated[Optional[int], typer.Option("--seed", rich_help_panel=GENERATION_HELP,
                                             help="Sampling seed, for repeatable output.")]

# --- writing GGUFs: convert and quantize --------------------------------------------------------

RECIPE_HELP = ("f32, f16, bf16, q8_0, any GGML type (q4_k, iq4_xs…), a preset (sf-q6, sf-q5, sf-q4, sf-iq4, "
               "sf-q3, sf-iq3, sf-q2, sf-iq2; see docs/recipes.md), fit:SIZE (e.g. fit:60GB) or a recipe .toml file.")
Recipe = Annotated[str, typer.Option("--recipe", help="Tensor types: " + RECIPE_HELP)]
GgufOutput = Annotated[Path, typer.Option("-o", "--output", help="GGUF file to write.")]
Imatrix = Annotated[Optional[Path], typer.Option("--imatrix", help="Importance matrix for the quantized types "
                                                                   "(llama.cpp imatrix GGUF, from `smallfour "
                                                                   "imatrix`).")]
QuantThreads = Annotated[Optional[int], typer.Option("--threads", min=1, help="Quantization threads (default: all "
                                                                              "CPUs).")]
Overwrite = Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")]

# --- placement ----------------------------------------------------------------------------------

KvType = Annotated[str, typer.Option("--kv-type", rich_help_panel=PLACEMENT_HELP,
                                     help="KV cache type: f16, bf16, f32, or q8_0 (needs --flash-attn). Mistral "
                                          "Small 4 caches only the MLA latent (23 KB per token in f16).")]
_PLACEMENT_OPTIONS = {
    "cpu_experts": Annotated[str, typer.Option(
        "--cpu-experts", rich_help_panel=PLACEMENT_HELP,
        help="Keep routed experts in CPU RAM: all, none, N = those of the first N layers (llama.cpp's --n-cpu-moe "
             "convention), or auto = as many as the planner says.")],
    "override_tensor": Annotated[Optional[list[str]], typer.Option(
        "--override-tensor", "-ot", rich_help_panel=PLACEMENT_HELP,
        help="REGEX=DEVICE: put matching tensors on DEVICE (CPU, CUDA0, …); repeatable, llama.cpp's syntax.")],
    "gpu_layers": Annotated[int, typer.Option(
        "--gpu-layers", "-ngl", rich_help_panel=PLACEMENT_HELP,
        help="Layers to offload to GPU(s); -1 = all, 0 = CPU only.")],
    "gpus": Annotated[Optional[int], typer.Option(
        "--gpus", rich_help_panel=PLACEMENT_HELP, help="Use the first N GPUs, split evenly; 0 = CPU only.")],
    "tensor_split": Annotated[Optional[str], typer.Option(
        "--tensor-split", rich_help_panel=PLACEMENT_HELP, help="Share of the model per GPU, e.g. 1,1,1,1 or 3,1.")],
    "split_mode": Annotated[str, typer.Option(
        "--split-mode", rich_help_panel=PLACEMENT_HELP, help="How to split across GPUs: layer, row or none.")],
    "main_gpu": Annotated[int, typer.Option(
        "--main-gpu", rich_help_panel=PLACEMENT_HELP,
        help="GPU for the whole model with --split-mode none, and for scratch buffers.")],
    "kv_type": KvType,
    "flash_attn": Annotated[bool, typer.Option(
        "--flash-attn/--no-flash-attn", rich_help_panel=PLACEMENT_HELP,
        help="Use flash attention (as `smallfour plan` assumes; without it long contexts need far larger compute "
             "buffers).")],
    "plan": Annotated[str, typer.Option(
        "--plan", rich_help_panel=PLACEMENT_HELP,
        help="auto: place layers, experts and the GPU split as `smallfour plan` decides (your placement flags are "
             "ignored); check: keep your flags, but refuse to load what the planner says cannot fit here.")],
    "rpc": Annotated[Optional[str], typer.Option(
        "--rpc", rich_help_panel=PLACEMENT_HELP,
        help="HOST:PORT[,HOST:PORT…] of `smallfour worker`s: their devices join the placement (before local GPUs in "
             "--tensor-split).")],
    "force": Annotated[bool, typer.Option(
        "--force", rich_help_panel=PLACEMENT_HELP,
        help="Load even when the planner says the model will not fit in this machine's memory.")],
}
DEFAULT_KV_TYPE = PlacementFlags.kv_type


def with_placement_options(command):
    """Give a Typer command the placement options; it receives them as one `placement: PlacementFlags`.

    The options are appended to the command's signature, which is what Typer reads, so every
    command that loads a model declares them once, here.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(PlacementFlags)}
    signature = inspect.signature(command, eval_str=True)  # Typer takes a given __signature__ as it is
    kept = [p for p in signature.parameters.values() if p.name != "placement"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name], annotation=annotation)
             for name, annotation in _PLACEMENT_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        flags = PlacementFlags(**{name: kwargs.pop(name) for name in _PLACEMENT_OPTIONS})
        flags.connect()
        return command(*args, placement=flags, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=kept + added)
    wrapper.__annotations__ = {k: v for k, v in command.__annotations__.items() if k != "placement"} | \
        dict(_PLACEMENT_OPTIONS)
    return wrapper
