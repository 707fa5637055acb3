"""Loading a GGUF into llama.cpp.

A thin layer over `llama_cpp.Llama`: quiet unless asked (llama.cpp's own log
goes to stderr with `verbose`), laid out as a `Placement` says, and prompts
tokenized with control tokens only where the chat template wrote them.
"""

from __future__ import annotations

import ctypes
import sys
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


def check_gguf(path: Path) -> None:
    if not path.is_file():
        raise SmallfourError(f"model file {path} does not exist")
    with open(path, "rb") as file:
        if file.read(4) != GGUF_MAGIC:
            raise SmallfourError(f"{path} is not a GGUF file")


def block_count(path: Path) -> int:
    """The layer count from the GGUF header (read without loading weights)."""
    from smallfour.plan import read_gguf_header

    fields, _ = read_gguf_header(path)
    return int(fields[f"{fields['general.architecture']}.block_count"])


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
    if kv_type not in ("f16", "bf16", "f32") and not placement.flash_attn:
        raise SmallfourError(f"--kv-type {kv_type} needs --flash-attn: llama.cpp quantizes the V cache only with "
                             "flash attention")
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
