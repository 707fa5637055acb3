"""The model handle: one GGUF loaded into llama.cpp and driven through its C API.

`Model` owns everything that lives as long as the loaded model: the llama.cpp model and
context, the tensor-override array llama.cpp keeps pointing into, the vision projector,
the control-token table, and the bookkeeping of what the KV cache holds (token ids by
position, and which images were evaluated where), so a prompt that shares a prefix with
the previous one evaluates only what is new. Nothing is hung on llama-cpp-python's
objects: its low-level bindings (`llama_cpp.llama_cpp`, `llama_cpp.mtmd_cpp`) are all we use.

A context holds `n_seq` sequences in one unified KV cache (`smallfour.engine` decodes them
together); each has `n_ctx_seq` positions, and `caches[seq]` says what it holds (positions
equal indices into its token list). Single-sequence callers use sequence 0 (`Model.tokens`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from quant.gguf_io import read_header
from smallfour.errors import SmallfourError
from smallfour.placement import KV_TYPES, SPLIT_MODES, Placement, expert_overrides, override_array
from smallfour.prompts import Segment, split_on_control_tokens

SEQ = 0  # the sequence single-sequence callers (run, chat, tests) use
DEFAULT_BATCH = 512  # tokens per llama_decode call while reading a prompt

_show_llama_log = False
_log_callback = None  # kept referenced: llama.cpp holds the C pointer for the process lifetime


def llama_log_callback():
    """The process-wide log callback: llama.cpp's (and libmtmd's) log on stderr only with `-v`."""
    global _log_callback
    if _log_callback is None:
        import llama_cpp

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if _show_llama_log:
                sys.stderr.write(text.decode("utf-8", errors="replace"))
                sys.stderr.flush()

        _log_callback = callback
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    return _log_callback


@functools.cache
def _backend() -> None:
    import llama_cpp

    llama_cpp.llama_backend_init()


class ImageInsert(Protocol):
    """An image placed in a prompt (vision.ImageSpan): where it sits and how to evaluate it."""

    start: int

    @property
    def n_tokens(self) -> int: ...

    @property
    def digest(self) -> bytes: ...

    def decode(self, model: Model, tokens: list[int], seq: int) -> None:
        """Evaluate the image's positions at the end of sequence `seq`."""


class Attachment(Protocol):
    """Something the model owns and frees with itself (the vision projector)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class CachedImage:
    """An image whose embeddings fill positions [start, start + n_tokens) of a sequence."""

    start: int
    n_tokens: int
    digest: bytes


@dataclass
class SequenceCache:
    """What one sequence of the KV cache holds: token ids by position, and the images among them."""

    tokens: list[int]
    images: list[CachedImage]

    def keep(self, n: int) -> None:
        del self.tokens[n:]
        self.images = [image for image in self.images if image.start + image.n_tokens <= n]


def default_threads() -> tuple[int, int]:
    """Threads for decoding and for prompt batches, as llama.cpp chooses them: physical cores, all cores."""
    from smallfour.hardware import physical_cores

    return physical_cores(), os.cpu_count() or 1


class Model:
    """A GGUF loaded into llama.cpp (see the module docstring). Use `Model.load`; `close()` frees it."""

    def __init__(self, path: Path, model, ctx, keep_alive: list) -> None:
        import llama_cpp

        self.path = path
        self._lib = llama_cpp
        self._model = model
        self._ctx = ctx
        self._keep_alive = keep_alive  # C data llama.cpp points into: override array, split, callbacks
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(llama_cpp.llama_model_n_embd(model))
        self.n_ctx = int(llama_cpp.llama_n_ctx(ctx)) if ctx else 0
        self.n_batch = int(llama_cpp.llama_n_batch(ctx)) if ctx else 0
        self.n_threads = int(llama_cpp.llama_n_threads(ctx)) if ctx else 0
        self.n_threads_batch = int(llama_cpp.llama_n_threads_batch(ctx)) if ctx else 0
        self.n_seq = int(llama_cpp.llama_n_seq_max(ctx)) if ctx else 1
        self.n_ctx_seq = self.n_ctx // self.n_seq  # positions each sequence may use
        self.caches = [SequenceCache([], []) for _ in range(self.n_seq)]
        self.projector: Attachment | None = None  # vision.Projector
        self.projector_error: str | None = None
        self._batch = llama_cpp.llama_batch_init(max(self.n_batch, 1), 0, 1) if ctx else None

    # ------------------------------------------------------------------ life cycle

    @classmethod
    def load(cls, path: Path | str, *, n_ctx: int = 4096, n_seq: int = 1, n_batch: int = DEFAULT_BATCH,
             n_threads: int | None = None, n_threads_batch: int | None = None, kv_type: str = "f16",
             placement: Placement | None = None, verbose: bool = False, vocab_only: bool = False,
             eval_callback=None) -> Model:
        """Load the GGUF at `path`, laid out as `placement` says, with `n_seq` sequences of `n_ctx` positions.

        `vocab_only` reads the vocabulary and template only (tokenizing, `--dry-run`): no weights, no
        context. `eval_callback` is a `llama_cpp.ggml_backend_sched_eval_callback`, llama.cpp's `cb_eval`
        (the imatrix collector watches every matmul through it).
        """
        global _show_llama_log
        import llama_cpp

        path = Path(path)
        header = read_header(path, what="model file")
        if kv_type not in KV_TYPES:
            raise SmallfourError(f"unknown KV cache type {kv_type!r}; choose one of {', '.join(KV_TYPES)}")
        placement = placement or Placement()
        if kv_type not in ("f16", "bf16", "f32") and not placement.flash_attn:
            raise SmallfourError(f"--kv-type {kv_type} needs --flash-attn: llama.cpp quantizes the V cache only "
                                 "with flash attention")
        if placement.split_mode not in SPLIT_MODES:
            raise SmallfourError(f"unknown split mode {placement.split_mode!r}; choose one of "
                                 f"{', '.join(SPLIT_MODES)}")
        keep_alive: list = []
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = vocab_only
        if not vocab_only:
            params.n_gpu_layers = placement.n_gpu_layers
            params.split_mode = SPLIT_MODES[placement.split_mode]
            params.main_gpu = placement.main_gpu
            if placement.tensor_split:
                if len(placement.tensor_split) > llama_cpp.LLAMA_MAX_DEVICES:
                    raise SmallfourError(f"--tensor-split has {len(placement.tensor_split)} parts; this build "
                                         f"handles at most {llama_cpp.LLAMA_MAX_DEVICES} devices")
                split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*placement.tensor_split)
                params.tensor_split = split
                keep_alive.append(split)
            overrides = list(placement.overrides)
            if placement.cpu_experts != "none":
                overrides += expert_overrides(placement.cpu_experts, int(header.arch_field("block_count")))
            array = override_array(overrides)
            if array is not None:
                params.tensor_buft_overrides = ctypes.cast(array, ctypes.c_void_p)
                keep_alive.append(array)
        _backend()
        llama_log_callback()
        _show_llama_log = verbose
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise SmallfourError(f"llama.cpp could not load {path.name} (run with -v for llama.cpp's log)")
        if vocab_only:
            return cls(path, model, None, keep_alive)
        decode_threads, batch_threads = default_threads()
        if not 1 <= n_seq <= llama_cpp.llama_max_parallel_sequences():
            raise SmallfourError(f"{n_seq} parallel sequences: llama.cpp handles 1 to "
                                 f"{llama_cpp.llama_max_parallel_sequences()}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_seq
        cparams.n_seq_max = n_seq
        cparams.kv_unified = True  # shared prefixes are shared cells (llama_memory_seq_cp)
        cparams.n_batch = cparams.n_ubatch = min(n_batch, n_ctx * n_seq)
        cparams.n_threads = n_threads or decode_threads
        cparams.n_threads_batch = n_threads_batch or n_threads or batch_threads
        cparams.type_k = cparams.type_v = KV_TYPES[kv_type]
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if placement.flash_attn is None
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if placement.flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cparams.op_offload = placement.op_offload
        cparams.no_perf = True
        if eval_callback is not None:
            cparams.cb_eval = eval_callback
            keep_alive.append(eval_callback)
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise SmallfourError(f"llama.cpp could not create a context of {n_ctx} tokens for {path.name} "
                                 "(run with -v for llama.cpp's log)")
        from smallfour.rpc import bound_connections

        bound_connections()  # with --rpc: a silent worker ends the run instead of blocking it
        return cls(path, model, ctx, keep_alive)

    def close(self) -> None:
        """Free the projector, context and model (idempotent)."""
        lib = self._lib
        if self.projector is not None:
            self.projector.close()
            self.projector = None
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 — interpreter shutdown: the bindings may be gone already
            pass

    # ------------------------------------------------------------------ what the model is

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def context(self):
        """The llama_context pointer, for libmtmd (vision) and the imatrix collector."""
        return self._ctx

    @property
    def model_pointer(self):
        return self._model

    def chat_template(self) -> str:
        template = self._lib.llama_model_chat_template(self._model, None)
        if not template:
            raise SmallfourError("the model has no chat template (tokenizer.chat_template); reconvert it with smallfour")
        return template.decode("utf-8")

    @functools.cached_property
    def control_tokens(self) -> dict[str, int]:
        """Text → id of every control token in the vocabulary (`<s>`, `[INST]`, `[THINK]`, …)."""
        is_control = self._lib.llama_vocab_is_control
        return {self.piece(i, special=True).decode("utf-8", errors="replace"): i
                for i in range(self.n_vocab) if is_control(self.vocab, i)}

    @property
    def bos(self) -> int:
        return int(self._lib.llama_vocab_bos(self.vocab))

    def is_end(self, token: int) -> bool:
        """End of generation (`</s>` for Mistral)."""
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    # ------------------------------------------------------------------ text ↔ tokens

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 2
        buffer = (self._lib.llama_token * capacity)()
        n = self._lib.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_bos, special)
        if n < 0:
            capacity = -n
            buffer = (self._lib.llama_token * capacity)()
            n = self._lib.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_bos, special)
        return list(buffer[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (control tokens are empty unless `special`)."""
        buffer = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self.vocab, token, buffer, 64, 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self.vocab, token, buffer, -n, 0, special)
        return buffer.raw[:n]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> bytes:
        return b"".join(self.piece(t, special=special) for t in tokens)

    def tokenize_prompt(self, segments: list[Segment]) -> list[int]:
        """Token ids of a rendered prompt: control tokens only where the template wrote them."""
        tokens: list[int] = []
        for piece in split_on_control_tokens(segments, self.control_tokens):
            tokens += [piece] if isinstance(piece, int) else self.tokenize(piece)
        return tokens

    # ------------------------------------------------------------------ the KV cache

    def _require_context(self) -> None:
        if not self._ctx:
            raise SmallfourError(f"{self.name} was loaded for its vocabulary only")

    @property
    def tokens(self) -> list[int]:
        """What sequence 0 holds (single-sequence callers)."""
        return self.caches[SEQ].tokens

    def _memory(self):
        return self._lib.llama_get_memory(self._ctx)

    def truncate(self, keep: int, seq: int = SEQ) -> None:
        """Forget every position of `seq` from `keep` on (also whatever an interrupted decode left there)."""
        self._require_context()
        self._lib.llama_memory_seq_rm(self._memory(), seq, keep, -1)
        self.caches[seq].keep(keep)

    def reset(self, seq: int = SEQ) -> None:
        self.truncate(0, seq)

    def share_prefix(self, source: int, target: int, n: int) -> None:
        """Make `target` hold the first `n` positions of `source` (the same cells: no evaluation)."""
        self._require_context()
        self.truncate(0, target)
        self._lib.llama_memory_seq_cp(self._memory(), source, target, 0, n)
        held = self.caches[source]
        self.caches[target] = SequenceCache(held.tokens[:n], [i for i in held.images if i.start + i.n_tokens <= n])

    def decode(self, tokens: Sequence[int], *, seq: int = SEQ, all_logits: bool = False) -> None:
        """Append `tokens` to `seq`; afterwards the logits of the last one (or of all) are ready."""
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last_chunk = start + self.n_batch >= len(tokens)
            self.decode_batch([(seq, chunk, all_logits or last_chunk)], all_logits=all_logits)

    def decode_batch(self, pieces: Sequence[tuple[int, Sequence[int], bool]], *,
                     all_logits: bool = False) -> list[int | None]:
        """One `llama_decode` over several sequences.

        Each piece is (seq, tokens appended to it, whether the logits of its last token are wanted).
        Returns, per piece, the batch position whose logits `logits(i)` (and samplers) read, or None.
        """
        self._require_context()
        total = sum(len(tokens) for _, tokens, _ in pieces)
        if total > self.n_batch:
            raise SmallfourError(f"internal error: {total} tokens in one batch of {self.n_batch}")
        batch, lib = self._batch, self._lib
        n = 0
        outputs: list[int | None] = []
        for seq, tokens, wants_logits in pieces:
            position = len(self.caches[seq].tokens)
            if position + len(tokens) > self.n_ctx_seq:
                raise SmallfourError(f"{position + len(tokens)} tokens do not fit in the context "
                                     f"({self.n_ctx_seq} tokens)")
            for i, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = position + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = all_logits or (wants_logits and i == len(tokens) - 1)
                n += 1
            outputs.append(n - 1 if wants_logits and tokens else None)
        batch.n_tokens = n
        status = lib.llama_decode(self._ctx, batch)
        if status != 0:
            for seq, _, _ in pieces:
                lib.llama_memory_seq_rm(self._memory(), seq, len(self.caches[seq].tokens), -1)
            raise SmallfourError(f"llama.cpp could not evaluate a batch of {n} tokens "
                                 f"(llama_decode returned {status})")
        for seq, tokens, _ in pieces:
            self.caches[seq].tokens += tokens
        return outputs

    def logits(self, index: int = -1) -> np.ndarray:
        """The logits of output `index` of the last decode (a view into llama.cpp's buffer: copy to keep)."""
        pointer = self._lib.llama_get_logits_ith(self._ctx, index)
        if not pointer:
            raise SmallfourError("internal error: no logits at that position")
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def evaluate(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of `tokens` read from an empty cache: `[len(tokens), n_vocab]` (a copy)."""
        self.reset()
        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        for start in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[start:start + self.n_batch])
            self.decode(chunk, all_logits=True)
            for i in range(len(chunk)):
                out[start + i] = self.logits(i)
        return out

    def reusable_prefix(self, tokens: Sequence[int], images: Sequence[CachedImage] = (), seq: int = SEQ) -> int:
        """How much of what the cache holds a new prompt `tokens` can keep.

        Token ids alone cannot tell two images with the same grid apart, so an image's positions
        count as cached only if the same pixels were evaluated at the same place. The last
        prompt token is always evaluated again, so the logits are the prompt's.
        """
        cache = self.caches[seq]
        keep = 0
        for held, wanted in zip(cache.tokens, tokens):
            if held != wanted:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1)
        wanted_images = set(images)
        for image in cache.images:
            if image.start < keep and image not in wanted_images:
                keep = min(keep, image.start)
        for image in images:
            if image.start < keep < image.start + image.n_tokens:
                keep = image.start
        return max(keep, 0)

    def prefill(self, tokens: list[int], spans: Sequence[ImageInsert] = (), seq: int = SEQ) -> int:
        """Make `seq` hold `tokens` (images evaluated through the projector); returns the positions reused.

        Afterwards the logits of the last prompt token are ready for sampling.
        """
        self._require_context()
        self.check_fits(tokens, spans)
        keep = self.reusable_prefix(tokens, image_entries(spans), seq)
        self.truncate(keep, seq)
        for start, end, span in prompt_pieces(tokens, spans, keep):
            if span is None:
                self.decode(tokens[start:end], seq=seq)
            else:
                self.decode_image(span, tokens, seq)
        return keep

    def check_fits(self, tokens: Sequence[int], spans: Sequence[ImageInsert] = ()) -> None:
        if len(tokens) >= self.n_ctx_seq:
            if spans:
                raise SmallfourError(f"prompt is {len(tokens)} tokens with its images, the context holds "
                                     f"{self.n_ctx_seq} (raise --ctx or give fewer or smaller images)")
            raise SmallfourError(f"prompt is {len(tokens)} tokens, the context holds {self.n_ctx_seq}")

    def decode_image(self, span: ImageInsert, tokens: list[int], seq: int) -> None:
        """Evaluate one image at the end of `seq` and record it."""
        start, end = span.start, span.start + span.n_tokens
        span.decode(self, tokens, seq)
        held = self.caches[seq]
        if len(held.tokens) != end or held.tokens[start:end] != tokens[start:end]:
            raise SmallfourError(f"internal error: libmtmd laid an image out over {len(held.tokens) - start} "
                                 f"positions, mistral-common over {span.n_tokens}")
        held.images.append(CachedImage(start, span.n_tokens, span.digest))

    def extend_after_image(self, seq: int, tokens: Sequence[int]) -> None:
        """Record positions libmtmd filled with image embeddings (their ids as mistral-common writes them)."""
        self.caches[seq].tokens += tokens


def image_entries(spans: Sequence[ImageInsert]) -> list[CachedImage]:
    return [CachedImage(span.start, span.n_tokens, span.digest) for span in spans]


def prompt_pieces(tokens: Sequence[int], spans: Sequence[ImageInsert], start: int):
    """What is left to evaluate of a prompt from position `start`: (start, end, None) for text,
    (start, end, span) for an image (always whole: a reused prefix never ends inside one)."""
    position = start
    for span in spans:
        end = span.start + span.n_tokens
        if end <= position:
            continue
        if span.start > position:
            yield position, span.start, None
        yield span.start, end, span
        position = end
    if position < len(tokens):
        yield position, len(tokens), None


__all__ = ["Attachment", "CachedImage", "ImageInsert", "Model", "SequenceCache", "image_entries", "prompt_pieces", "default_threads", "llama_log_callback"]
