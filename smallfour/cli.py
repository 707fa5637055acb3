"""The `smallfour` command line: thin verbs over the Python API."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Table
from rich.text import Text

from smallfour.batch import batch_command
from smallfour.chat import chat_command
from smallfour.doctor import doctor_command
from smallfour.errors import SmallfourError
from smallfour.imatrix import imatrix_command
from smallfour.options import (GENERATION_HELP, SEED, TEMPERATURE, TOP_K, TOP_P, VERBOSE, PlacementFlags, err, out,
                               read_json_file, reports_errors, with_placement_options)
from smallfour.plan_cli import plan as plan_command
from smallfour.pull import pull_command
from smallfour.quantize import RECIPE_HELP, quantize_command
from smallfour.store import models_command, rm_command

app = typer.Typer(
    help="Run Mistral Small 4 locally: convert released weights to GGUF and run them with llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
class ConversionProgress:
    """Rich bars for bytes read and tensors written."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def start(self, total_bytes: int, total_tensors: int) -> None:
        self.bytes_task = self.progress.add_task("reading", total=total_bytes, unit="bytes")
        self.tensor_task = self.progress.add_task("tensors", total=total_tensors, unit="tensors")

    def advance(self, source_bytes: int, tensor: str, tensor_done: bool) -> None:
        self.progress.update(self.bytes_task, advance=source_bytes, description=tensor)
        if tensor_done:
            self.progress.update(self.tensor_task, advance=1)


class _AmountColumn(ProgressColumn):
    """Bytes and bytes/s on the byte bar, done/total on the tensor bar."""

    def __init__(self):
        super().__init__()
        self.size, self.speed, self.count = DownloadColumn(), TransferSpeedColumn(), MofNCompleteColumn()

    def render(self, task):
        if task.fields.get("unit") == "bytes":
            return Text.assemble(self.size.render(task), " ", self.speed.render(task))
        return self.count.render(task)


def _progress_bars() -> Progress:
    return Progress(TextColumn("{task.description:<34}"), BarColumn(), _AmountColumn(), TimeRemainingColumn(),
                    console=err, transient=False)


@app.command()
@reports_errors
def convert(
    source: str = typer.Argument(..., help="Checkpoint directory: Hugging Face layout (config.json) "
                                          "or Mistral layout (params.json), BF16 or FP8; or a pulled repo id "
                                          "OWNER/NAME\\[@REVISION]."),
    output: Path = typer.Option(..., "-o", "--output", help="GGUF file to write."),
    recipe: str = typer.Option("bf16", "--recipe", help="Output types: " + RECIPE_HELP),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama.cpp imatrix GGUF) "
                                                                   "for the quantized types."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Quantization threads (default: all CPUs)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    no_mmproj: bool = typer.Option(False, "--no-mmproj", help="Skip the vision projector GGUF."),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="Where to write the vision projector "
                                                                  "(default: OUTPUT's name + -mmproj.gguf)."),
    mmproj_type: str = typer.Option("f16", "--mmproj-type", help="Vision projector type: f16, f32 or q8_0."),
) -> None:
    """Convert a released checkpoint to a GGUF file llama.cpp can run."""
    from convert.writer import convert_checkpoint
    from smallfour.store import resolve_checkpoint

    if no_mmproj and mmproj is not None:
        raise SmallfourError("give either --no-mmproj or --mmproj PATH, not both")
    with _progress_bars() as bars:
        report = convert_checkpoint(resolve_checkpoint(source), output, recipe, force=force,
                                    progress=ConversionProgress(bars), mmproj=not no_mmproj, mmproj_output=mmproj,
                                    mmproj_type=mmproj_type, imatrix=imatrix, threads=threads)
    for line in report.fallbacks:
        err.print(f"[yellow]fallback[/] {line}", highlight=False)
    err.print(f"wrote {report.output} (recipe {report.recipe}, {report.tensors} tensors, "
              f"{report.output_bytes / 1e6:.1f} MB of weights "
              f"from {report.source_bytes / 1e6:.1f} MB, {report.layout} layout)", highlight=False)
    if report.mmproj is not None:
        err.print(f"wrote {report.mmproj.output} (vision projector, {report.mmproj.tensors} tensors, "
                  f"{report.mmproj.output_bytes / 1e6:.1f} MB)", highlight=False, soft_wrap=True)


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
    _print_recipe(info)


def _print_recipe(info: dict) -> None:
    """The recipe a GGUF was quantized with, and the types it gave each layer."""
    recipe = info.get("recipe") or {}
    if recipe.get("name"):
        extra = f" — {recipe['description']}" if recipe.get("description") else ""
        imatrix = f" (imatrix {recipe['imatrix']})" if recipe.get("imatrix") else ""
        out.print(f"recipe: [bold]{recipe['name']}[/]{extra}{imatrix}", highlight=False)
    layers = info.get("layers") or []
    if not layers:
        return
    def types(row: dict, keys) -> str:
        return "/".join(sorted({t for k, t in row["types"].items() if k in keys}))

    groups = {"attention": ("attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_k_b", "attn_v_b", "attn_output"),
              "experts gate_up": ("ffn_gate_up_exps",), "experts down": ("ffn_down_exps",),
              "shared expert": ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"),
              "dense ffn": ("ffn_gate", "ffn_up", "ffn_down")}
    shown = {label: keys for label, keys in groups.items() if any(types(row, keys) for row in layers)}
    table = Table("layer", *shown, "bits/weight", title="Types per layer", title_justify="left")
    for row in layers:
        table.add_row(str(row["layer"]), *(types(row, keys) for keys in shown.values()),
                      f"{row['bits_per_weight']:.2f}")
    out.print(table)


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
            prompt = sys.stdin.read().strip()
            if not prompt:
                raise SmallfourError("the prompt on stdin is empty")
        messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
    return messages


@app.command()
@reports_errors
@with_placement_options
def run(
    model: str = typer.Argument(..., help="GGUF file, a GGUF in the store (smallfour models) or a pulled GGUF repo "
                                          "OWNER/NAME\\[@REVISION]\\[:QUANT]."),
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="The user message; read from stdin if omitted."),
    messages_file: Optional[Path] = typer.Option(None, "--messages", help="A JSON file with a whole conversation "
                                                                           "(OpenAI-style messages) instead of -p."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    images: Optional[list[str]] = typer.Option(None, "--image", help="Image file (PNG, JPEG, WebP, …) to show the "
                                                                     "model with the prompt; repeat for several."),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="Vision projector GGUF (default: "
                                                                  "MODEL's name + -mmproj.gguf beside it)."),
    tools_file: Optional[Path] = typer.Option(None, "--tools", help="JSON file with OpenAI-style tool definitions; "
                                                                     "tool calls come back in --json as tool_calls."),
    preset: str = typer.Option("instant", "--preset", rich_help_panel=GENERATION_HELP,
                               help="instant (no thinking, temperature 0.15), think (reasoning, temperature 0.7, "
                                    "top-p 0.95) or think-budget (think, at most 2048 thinking tokens)."),
    effort: Optional[str] = typer.Option(None, "--effort", rich_help_panel=GENERATION_HELP,
                                         help="Reasoning effort: none or high (overrides the preset's)."),
    think_budget: Optional[int] = typer.Option(None, "--think-budget", rich_help_panel=GENERATION_HELP,
                                               help="Most thinking tokens; then \\[/THINK] is forced and the model "
                                                    "answers."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", min=1, rich_help_panel=GENERATION_HELP,
                                             help="Most tokens to generate, thinking included."),
    temperature: Optional[float] = TEMPERATURE,
    top_p: Optional[float] = TOP_P,
    top_k: Optional[int] = TOP_K,
    seed: Optional[int] = SEED,
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Do not print the model's thinking."),
    ctx: int = typer.Option(4096, "--ctx", min=64, help="Context length to allocate, in tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: content, reasoning_content, "
                                                        "tool_calls, usage, timings."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Render and tokenize the prompt, generate nothing; "
                                                           "with --json prints {prompt, tokens}."),
    verbose: bool = VERBOSE,
    placement: PlacementFlags = None,
) -> None:
    """Answer one prompt (or continue a conversation), streaming the reply to stdout.

    Thinking goes to stderr (dimmed) so that stdout carries only the answer.
    """
    from smallfour.generate import dry_run as render_only
    from smallfour.generate import one_shot, resolve_request
    from smallfour.store import resolve_gguf
    from smallfour.vision import attach_images, check_images

    model = resolve_gguf(model)
    tools = read_json_file(tools_file, "tools") if tools_file is not None else None
    messages = attach_images(request_messages(prompt, messages_file, system), images or [])
    projector = check_images(model, messages, mmproj)
    request = resolve_request(messages, preset=preset, effort=effort,
                              think_budget=think_budget, tools=tools, max_tokens=max_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if dry_run:
        text, tokens = render_only(model, request, verbose=verbose)
        print(json.dumps({"prompt": text, "tokens": tokens}, ensure_ascii=False) if as_json else text)
        return
    stream = None if as_json else functools.partial(_stream, hide_thinking=hide_thinking)
    result = one_shot(model, request, n_ctx=ctx, verbose=verbose, kv_type=placement.kv_type,
                      placement=placement.resolve(model, ctx, mmproj=projector), on_text=stream, mmproj=projector)
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
app.command(name="chat")(reports_errors(chat_command))
app.command(name="batch")(reports_errors(batch_command))
app.command(name="pull")(reports_errors(pull_command))
app.command(name="models")(reports_errors(models_command))
app.command(name="rm")(reports_errors(rm_command))
app.command(name="doctor")(reports_errors(doctor_command))
app.command(name="plan")(reports_errors(plan_command))
app.command(name="quantize")(reports_errors(quantize_command))
app.command(name="imatrix")(reports_errors(imatrix_command))


def main() -> None:
    app()
