"""The Python API: what `import smallfour` offers, thin over the modules that do the work.

    import smallfour

    smallfour.convert("Mistral-Small-4-119B-2603/", "small4.gguf", recipe="sf-q4")
    model = smallfour.load("small4.gguf", n_ctx=8192)
    print(smallfour.generate(model, "What is MLA attention?", preset="think").content)
    for event in smallfour.stream_generate(model, "And MoE?"):
        print(event.text, end="")
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from smallfour.generation import ChatRequest, Event, GenerationResult, complete, resolve_request
from smallfour.generation import stream_generate as _stream
from smallfour.messages import check_messages
from smallfour.model import Model
from smallfour.placement import Placement


def load(path: Path | str, *, mmproj: Path | str | None = None, n_ctx: int = 4096, kv_type: str = "f16",
         placement: Placement | None = None, n_threads: int | None = None, verbose: bool = False) -> Model:
    """Load a GGUF (and, with `mmproj`, its vision projector). Close it with `model.close()` or `with`."""
    model = Model.load(path, n_ctx=n_ctx, kv_type=kv_type, placement=placement, n_threads=n_threads,
                       verbose=verbose)
    if mmproj is not None:
        from smallfour.vision import attach_projector, open_projector

        try:
            attach_projector(model, open_projector(model, Path(mmproj),
                                                   use_gpu=(placement or Placement()).n_gpu_layers != 0))
        except BaseException:
            model.close()
            raise
    return model


def _request(messages: str | list[dict[str, Any]] | ChatRequest, options: dict[str, Any]) -> ChatRequest:
    if isinstance(messages, ChatRequest):
        if options:
            raise TypeError("give either a ChatRequest or messages with options, not both")
        return messages
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return resolve_request(check_messages(messages), **options)


def generate(model: Model, messages: str | list[dict[str, Any]] | ChatRequest, **options: Any) -> GenerationResult:
    """One assistant turn for `messages` (a prompt, OpenAI-style messages, or a `ChatRequest`).

    Options: `preset` ("instant", "think", "think-budget"), `effort` ("none"/"high"), `tools`,
    `think_budget`, and the sampling fields `temperature`, `top_p`, `top_k`, `min_p`, `max_tokens`,
    `seed`, `logit_bias`.
    """
    return complete(model, _request(messages, options))


def stream_generate(model: Model, messages: str | list[dict[str, Any]] | ChatRequest,
                    **options: Any) -> Iterator[Event]:
    """Like `generate`, yielding events: "reasoning"/"content" text as it comes, "tool_calls", "finish"."""
    return _stream(model, _request(messages, options))


def convert(source: Path | str, output: Path | str, recipe: str = "bf16", **options: Any):
    """Convert a checkpoint directory (Hugging Face or Mistral layout) to GGUF; see `convert_checkpoint`."""
    from convert.writer import convert_checkpoint

    return convert_checkpoint(Path(source), Path(output), recipe, **options)


def quantize(source: Path | str, output: Path | str, recipe: str, **options: Any):
    """Re-quantize a GGUF with a recipe (`sf-q4`, `q4_k_m`, `fit:60GB`, a TOML file, …)."""
    from convert.requantize import requantize

    return requantize(Path(source), Path(output), recipe, **options)


def plan(model: Path | str, *, hardware: str | None = None, n_ctx: int = 4096, kv_type: str = "f16"):
    """Where a GGUF's tensors would go on this machine (or on a named profile such as "4xH100")."""
    from smallfour.hardware import detect_hardware, profile
    from smallfour.planner import plan_for_load

    machine = profile(hardware) if hardware is not None else detect_hardware()
    return plan_for_load(Path(model), n_ctx, kv_type, machine)


__all__ = ["ChatRequest", "Event", "GenerationResult", "Model", "Placement", "convert", "generate", "load", "plan",
           "quantize", "stream_generate"]
