"""The `smallfour` command line: thin verbs over the Python API."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Table

from convert.errors import ConversionError
from smallfour.errors import SmallfourError

app = typer.Typer(
    help="Run Mistral Small 4 locally: convert released weights to GGUF and run them with llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

VERBOSE = typer.Option(False, "-v", "--verbose", help="Show llama.cpp's own log on stderr.")

# Placement options shared by every command that loads a model.
PLACEMENT_HELP = "Placement"
CPU_EXPERTS = typer.Option("none", "--cpu-experts", rich_help_panel=PLACEMENT_HELP,
                           help="Keep routed experts in CPU RAM: all, none, or N = those of the first N layers "
                                "(llama.cpp's --n-cpu-moe convention).")
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
                       help="KV cache type: f16, bf16, q8_0 or f32. Mistral Small 4 caches only the MLA latent "
                            "(23 KB per token in f16).")
FLASH_ATTN = typer.Option(False, "--flash-attn/--no-flash-attn", rich_help_panel=PLACEMENT_HELP,
                          help="Use flash attention.")


def placement_from_options(cpu_experts: str, override_tensor: list[str] | None, gpu_layers: int, gpus: int | None,
                           tensor_split: str | None, split_mode: str, main_gpu: int, flash_attn: bool):
    from smallfour.placement import Placement, parse_override, parse_tensor_split, split_for_gpus

    layers_override, split = split_for_gpus(gpus, parse_tensor_split(tensor_split))
    return Placement(n_gpu_layers=gpu_layers if layers_override is None else layers_override, split_mode=split_mode,
                     main_gpu=main_gpu, tensor_split=split, cpu_experts=cpu_experts,
                     overrides=tuple(parse_override(o) for o in override_tensor or ()), flash_attn=flash_attn)


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


class ConversionProgress:
    """Rich bars for bytes read and tensors written."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def start(self, total_bytes: int, total_tensors: int) -> None:
        self.bytes_task = self.progress.add_task("reading", total=total_bytes)
        self.tensor_task = self.progress.add_task("tensors", total=total_tensors)

    def advance(self, source_bytes: int, tensor: str, tensor_done: bool) -> None:
        self.progress.update(self.bytes_task, advance=source_bytes, description=tensor)
        if tensor_done:
            self.progress.update(self.tensor_task, advance=1)


def _progress_bars() -> Progress:
    return Progress(TextColumn("{task.description:<34}"), BarColumn(), DownloadColumn(), MofNCompleteColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=False)


@app.command()
@reports_errors
def convert(
    source: Path = typer.Argument(..., help="Checkpoint directory: Hugging Face layout (config.json) "
                                           "or Mistral layout (params.json), BF16 or FP8."),
    output: Path = typer.Option(..., "-o", "--output", help="GGUF file to write."),
    recipe: str = typer.Option("bf16", "--recipe", help="Output type: f32, f16, bf16 or q8_0."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
) -> None:
    """Convert a released checkpoint to a GGUF file llama.cpp can run."""
    from convert.writer import convert_checkpoint

    with _progress_bars() as bars:
        report = convert_checkpoint(source, output, recipe, force=force, progress=ConversionProgress(bars))
    for line in report.fallbacks:
        err.print(f"[yellow]fallback[/] {line}", highlight=False)
    err.print(f"wrote {report.output} ({report.tensors} tensors, {report.output_bytes / 1e6:.1f} MB of weights "
              f"from {report.source_bytes / 1e6:.1f} MB, {report.layout} layout)", highlight=False)


@app.command()
@reports_errors
def inspect(
    model: Path = typer.Argument(..., help="GGUF file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Show a GGUF's architecture, hyper-parameters, tokenizer and tensors grouped by role."""
    from smallfour.inspect import describe

    info = describe(model)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    out.print(f"[bold]{info['file']}[/]  {info['architecture']}  {info['file_bytes'] / 1e6:.1f} MB")
    hyper = Table("hyper-parameter", "value", title="Hyper-parameters", title_justify="left")
    for key, value in info["hyperparameters"].items():
        hyper.add_row(key, str(value))
    out.print(hyper)
    tok = info["tokenizer"]
    out.print(f"tokenizer: {tok.get('model')} / {tok.get('pre')}, {tok.get('tokens')} tokens, "
              f"bos {tok.get('bos_token_id')}, eos {tok.get('eos_token_id')}; chat template: "
              f"{'yes' if info['chat_template'] else 'no'}")
    roles = Table("role", "type", "tensors", "parameters", "bytes", "bits/weight", title="Tensors by role",
                  title_justify="left")
    for row in info["roles"]:
        roles.add_row(row["role"], row["type"], str(row["count"]), f"{row['parameters']:,}", f"{row['bytes']:,}",
                      f"{row['bits_per_weight']:.2f}")
    total = info["tensors"]
    roles.add_row("total", "", str(total["count"]), f"{total['parameters']:,}", f"{total['bytes']:,}",
                  f"{total['bits_per_weight']:.2f}", style="bold")
    out.print(roles)


def read_json_file(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SmallfourError(f"cannot read {what} file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise SmallfourError(f"{what} file {path} is not valid JSON: {exc}") from None


def request_messages(prompt: str | None, messages_file: Path | None, system: str | None) -> list[dict]:
    """The conversation from --messages, or one user turn from -p / stdin."""
    if messages_file is not None:
        if prompt is not None:
            raise SmallfourError("give either -p/--prompt or --messages, not both")
        messages = read_json_file(messages_file, "messages")
        if isinstance(messages, dict):
            messages = messages.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise SmallfourError(f"{messages_file}: expected a JSON list of {{\"role\", \"content\"}} messages")
    else:
        if prompt is None:
            if sys.stdin.isatty():
                raise SmallfourError("no prompt: pass -p TEXT, --messages FILE, or pipe the prompt on stdin")
            prompt = sys.stdin.read()
        messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
    return messages


GENERATION_HELP = "Generation"


@app.command()
@reports_errors
def run(
    model: Path = typer.Argument(..., help="GGUF file."),
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="The user message; read from stdin if omitted."),
    messages_file: Optional[Path] = typer.Option(None, "--messages", help="A JSON file with a whole conversation "
                                                                           "(OpenAI-style messages) instead of -p."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    tools_file: Optional[Path] = typer.Option(None, "--tools", help="JSON file with OpenAI-style tool definitions; "
                                                                     "tool calls come back in --json as tool_calls."),
    preset: str = typer.Option("instant", "--preset", rich_help_panel=GENERATION_HELP,
                               help="instant (no thinking, temperature 0.15), think (reasoning, temperature 0.7, "
                                    "top-p 0.95) or think-budget (think, at most 2048 thinking tokens)."),
    effort: Optional[str] = typer.Option(None, "--effort", rich_help_panel=GENERATION_HELP,
                                         help="Reasoning effort: none or high (overrides the preset's)."),
    think_budget: Optional[int] = typer.Option(None, "--think-budget", rich_help_panel=GENERATION_HELP,
                                               help="Most thinking tokens; then [/THINK] is forced and the model "
                                                    "answers."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", min=1, rich_help_panel=GENERATION_HELP,
                                             help="Most tokens to generate, thinking included."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, rich_help_panel=GENERATION_HELP,
                                                help="Sampling temperature; 0 is greedy."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, rich_help_panel=GENERATION_HELP,
                                          help="Nucleus sampling threshold."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0, rich_help_panel=GENERATION_HELP,
                                        help="Sample among the K likeliest tokens; 0 = no limit."),
    seed: Optional[int] = typer.Option(None, "--seed", rich_help_panel=GENERATION_HELP,
                                       help="Sampling seed, for repeatable output."),
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Do not print the model's thinking."),
    ctx: int = typer.Option(4096, "--ctx", min=64, help="Context length to allocate, in tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: content, reasoning_content, "
                                                        "tool_calls, usage, timings."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Render and tokenize the prompt, generate nothing; "
                                                           "with --json prints {prompt, tokens}."),
    cpu_experts: str = CPU_EXPERTS,
    override_tensor: Optional[list[str]] = OVERRIDE_TENSOR,
    gpu_layers: int = GPU_LAYERS,
    gpus: Optional[int] = GPUS,
    tensor_split: Optional[str] = TENSOR_SPLIT,
    split_mode: str = SPLIT_MODE,
    main_gpu: int = MAIN_GPU,
    kv_type: str = KV_TYPE,
    flash_attn: bool = FLASH_ATTN,
    verbose: bool = VERBOSE,
) -> None:
    """Answer one prompt (or continue a conversation), streaming the reply to stdout.

    Thinking goes to stderr (dimmed) so that stdout carries only the answer.
    """
    from smallfour.generate import dry_run as render_only
    from smallfour.generate import one_shot, resolve_request

    tools = read_json_file(tools_file, "tools") if tools_file is not None else None
    request = resolve_request(request_messages(prompt, messages_file, system), preset=preset, effort=effort,
                              think_budget=think_budget, tools=tools, max_tokens=max_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if dry_run:
        text, tokens = render_only(model, request, verbose=verbose)
        print(json.dumps({"prompt": text, "tokens": tokens}, ensure_ascii=False) if as_json else text)
        return
    placement = placement_from_options(cpu_experts, override_tensor, gpu_layers, gpus, tensor_split, split_mode,
                                       main_gpu, flash_attn)
    stream = None if as_json else functools.partial(_stream, hide_thinking=hide_thinking)
    result = one_shot(model, request, n_ctx=ctx, verbose=verbose, kv_type=kv_type, placement=placement,
                      on_text=stream)
    if as_json:
        print(json.dumps(result.as_json(), ensure_ascii=False))
        return
    sys.stdout.write("\n")
    for call in result.tool_calls:
        print(f"[tool call] {call['function']['name']}({call['function']['arguments']})")
    if result.tool_call_error:
        err.print(f"[yellow]malformed tool call:[/] {result.tool_call_error}", highlight=False)


def _stream(channel: str, text: str, hide_thinking: bool = False) -> None:
    # Thinking goes to stderr, dimmed, so stdout carries only the answer.
    if channel == "reasoning":
        if hide_thinking:
            return
        err.print(text, style="dim", end="", highlight=False, markup=False)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


@app.command()
@reports_errors
def demo(
    prompt: str = typer.Option("Write one sentence about the Alps.", "-p", "--prompt", help="Prompt to run."),
    verbose: bool = VERBOSE,
) -> None:
    """Build the tiny built-in Mistral Small 4 model, convert it, and run one prompt on it."""
    from smallfour.demo import run_demo

    run_demo(prompt, verbose=verbose, console=err, progress=ConversionProgress)


# Commands defined in their own modules register here, one line each.
app.command(name="plan")(reports_errors(__import__("smallfour.plan_cli", fromlist=["plan"]).plan))


def main() -> None:
    app()
