"""Loading a GGUF into llama.cpp and generating from it.

A thin layer over `llama_cpp.Llama`: quiet unless asked (llama.cpp's own log
goes to stderr with `verbose`), prompts tokenized with special tokens parsed
(the template writes `<s>`, `[INST]` … as text), and generation that separates
the model's `[THINK]…[/THINK]` reasoning from its answer as it streams.
"""

from __future__ import annotations

import codecs
import ctypes
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from smallfour.errors import SmallfourError
from smallfour.prompts import Segment, split_on_control_tokens
from smallfour.placement import (SPLIT_MODES, Placement, expert_overrides, model_params_with_overrides,
                                 override_array)

GGUF_MAGIC = b"GGUF"

# GGML type ids for the KV cache (`--kv-type`).
KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}

_show_llama_log = False
_log_callback = None  # kept referenced: llama.cpp holds the C pointer for the process lifetime


def _install_log_callback() -> None:
    """Route llama.cpp's log through one switch; llama-cpp-python's own leaks context messages."""
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if _show_llama_log:
            sys.stderr.write(text.decode("utf-8", errors="replace"))
            sys.stderr.flush()

    _log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


@dataclass
class GenerationResult:
    content: str = ""
    reasoning_content: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0
    finish_reason: str = "length"
    tokens: list[int] = field(default_factory=list)

    def as_json(self) -> dict:
        def rate(n: int, ms: float) -> float:
            return round(n / (ms / 1000.0), 2) if ms > 0 else 0.0

        return {
            "content": self.content,
            "reasoning_content": self.reasoning_content,
            "finish_reason": self.finish_reason,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                      "total_tokens": self.prompt_tokens + self.completion_tokens},
            "timings": {"prompt_ms": round(self.prompt_ms, 2), "prompt_per_second": rate(self.prompt_tokens, self.prompt_ms),
                        "predicted_ms": round(self.predicted_ms, 2),
                        "predicted_per_second": rate(self.completion_tokens, self.predicted_ms)},
        }


def check_gguf(path: Path) -> None:
    if not path.is_file():
        raise SmallfourError(f"model file {path} does not exist")
    with open(path, "rb") as file:
        if file.read(4) != GGUF_MAGIC:
            raise SmallfourError(f"{path} is not a GGUF file")


def block_count(path: Path) -> int:
    """The layer count from the GGUF header (read without loading weights)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    return int(fields[f"{arch}.block_count"].contents())


def load_model(path: Path, *, n_ctx: int = 4096, seed: int | None = None, verbose: bool = False,
               logits_all: bool = False, n_threads: int | None = None, kv_type: str = "f16",
               placement: Placement | None = None):
    """A `llama_cpp.Llama` for the GGUF at `path`, laid out as `placement` says."""
    global _show_llama_log
    import llama_cpp

    path = Path(path)
    check_gguf(path)
    if kv_type not in KV_TYPES:
        raise SmallfourError(f"unknown KV cache type {kv_type!r}; choose one of {', '.join(KV_TYPES)}")
    placement = placement or Placement()
    if placement.split_mode not in SPLIT_MODES:
        raise SmallfourError(f"unknown split mode {placement.split_mode!r}; choose one of {', '.join(SPLIT_MODES)}")
    overrides = list(placement.overrides)
    if placement.cpu_experts != "none":
        overrides += expert_overrides(placement.cpu_experts, block_count(path))
    override_c_array = override_array(overrides)
    _install_log_callback()
    _show_llama_log = verbose
    try:
        with model_params_with_overrides(override_c_array):
            llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, seed=seed if seed is not None else llama_cpp.LLAMA_DEFAULT_SEED,
                verbose=verbose, logits_all=logits_all, n_threads=n_threads, n_gpu_layers=placement.n_gpu_layers,
                split_mode=SPLIT_MODES[placement.split_mode], main_gpu=placement.main_gpu,
                tensor_split=list(placement.tensor_split) if placement.tensor_split else None,
                flash_attn=placement.flash_attn, type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type],
            )
    except (ValueError, RuntimeError) as exc:
        raise SmallfourError(f"llama.cpp could not load {path.name}: {exc} (run with -v for llama.cpp's log)") from None
    # llama.cpp holds pointers into the override array for the model's lifetime.
    llm._smallfour_tensor_overrides = override_c_array
    return llm


def chat_template(llm) -> str:
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise SmallfourError("the model has no chat template (tokenizer.chat_template); reconvert it with smallfour")
    return template


def control_tokens(llm) -> dict[str, int]:
    """Text → id of every control token in the vocabulary (`<s>`, `[INST]`, `[THINK]`, …)."""
    cached = getattr(llm, "_smallfour_control_tokens", None)
    if cached is None:
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        cached = {llm.detokenize([i], special=True).decode("utf-8", errors="replace"): i
                  for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_control(vocab, i)}
        llm._smallfour_control_tokens = cached
    return cached


def tokenize_prompt(llm, segments: list[Segment]) -> list[int]:
    """Token ids of a rendered prompt: control tokens only where the template wrote them."""
    tokens: list[int] = []
    for piece in split_on_control_tokens(segments, control_tokens(llm)):
        if isinstance(piece, int):
            tokens.append(piece)
        else:
            tokens += llm.tokenize(piece.encode("utf-8"), add_bos=False, special=False)
    return tokens


def special_id(llm, text: str) -> int | None:
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    return ids[0] if len(ids) == 1 else None


def generate(llm, prompt_tokens: list[int], *, max_tokens: int = 512, temperature: float = 0.7,
             top_p: float = 0.95, top_k: int = 40, seed: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield `(channel, text)` pieces, channel "reasoning" or "content"; returns a GenerationResult."""
    if len(prompt_tokens) >= llm.n_ctx():
        raise SmallfourError(f"prompt is {len(prompt_tokens)} tokens, the context holds {llm.n_ctx()}")
    if seed is not None:
        llm.set_seed(seed)
    think_open, think_close = special_id(llm, "[THINK]"), special_id(llm, "[/THINK]")
    eos = llm.token_eos()
    result = GenerationResult(prompt_tokens=len(prompt_tokens))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    channel = "content"
    budget = min(max_tokens, llm.n_ctx() - len(prompt_tokens))
    started = time.perf_counter()
    first_token_at = None
    for token in llm.generate(prompt_tokens, temp=temperature, top_p=top_p, top_k=top_k, min_p=0.0,
                              repeat_penalty=1.0, reset=True):
        if first_token_at is None:
            first_token_at = time.perf_counter()
        if token == eos:
            result.finish_reason = "stop"
            break
        result.tokens.append(token)
        result.completion_tokens += 1
        if token == think_open:
            channel = "reasoning"
        elif token == think_close:
            channel = "content"
        else:
            text = decoder.decode(llm.detokenize([token], special=False))
            if text:
                if channel == "reasoning":
                    result.reasoning_content += text
                else:
                    result.content += text
                yield channel, text
        if result.completion_tokens >= budget:
            break
    finished = time.perf_counter()
    tail = decoder.decode(b"", final=True)
    if tail:
        result.content += tail
        yield "content", tail
    first_token_at = first_token_at or finished
    result.prompt_ms = (first_token_at - started) * 1000.0
    result.predicted_ms = (finished - first_token_at) * 1000.0
    return result
