"""One-shot generation: a user prompt through the model's chat template into llama.cpp."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from smallfour.placement import Placement
from smallfour.prompts import render_segments, user_turn
from smallfour.runtime import GenerationResult, chat_template, generate, load_model, tokenize_prompt


def render_prompt(model: Path, prompt: str, *, verbose: bool = False) -> tuple[str, list[int]]:
    """The prompt text the template renders for one user turn, and its token ids."""
    llm = load_model(model, n_ctx=256, verbose=verbose)
    segments = render_segments(chat_template(llm), user_turn(prompt))
    return "".join(s.text for s in segments), tokenize_prompt(llm, segments)


def one_shot(model: Path, prompt: str, *, max_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.95,
             seed: int | None = None, n_ctx: int = 4096, verbose: bool = False,
             on_text: Callable[[str, str], None] | None = None, kv_type: str = "f16",
             placement: Placement | None = None) -> GenerationResult:
    llm = load_model(model, n_ctx=n_ctx, seed=seed, verbose=verbose, kv_type=kv_type, placement=placement)
    tokens = tokenize_prompt(llm, render_segments(chat_template(llm), user_turn(prompt)))
    pieces = generate(llm, tokens, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    while True:
        try:
            channel, text = next(pieces)
        except StopIteration as finished:
            return finished.value
        if on_text is not None:
            on_text(channel, text)
