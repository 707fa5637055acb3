"""ggml's quantizers, called through ctypes: every type llama.cpp can write.

`quantize(values, qtype, importance, threads)` turns float32 rows into the bytes
ggml stores for `qtype` (one row of output per input row), through
`ggml_quantize_chunk` in the `libggml-base` that llama-cpp-python ships, so the
bytes are exactly those llama.cpp's own quantizer writes. ctypes releases the
GIL for the call, so rows are split into chunks and quantized on a thread pool;
every ggml quantizer treats rows independently, so the result does not depend
on the number of threads.

ggml aborts the whole process on a bad argument (GGML_ASSERT), so everything it
would assert on is checked here first and raised as `QuantizationError`.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quant.errors import SmallfourError

T = GGMLQuantizationType

# Types ggml_quantize_chunk writes (ggml.c's switch), in gguf-py's numbering.
QUANTIZABLE = (
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_0, T.Q4_1, T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K,
    T.IQ4_XS, T.IQ4_NL, T.IQ3_S, T.IQ3_XXS, T.IQ2_S, T.IQ2_XS, T.IQ2_XXS, T.IQ1_M, T.IQ1_S, T.TQ2_0, T.TQ1_0,
    T.MXFP4, T.NVFP4,
)
# (Q1_0, also in ggml, is left out: llama.cpp defines no fallback for it and gguf-py cannot read it.)

# Types llama.cpp refuses to write without an importance matrix (llama-quant.cpp's
# tensor_requires_imatrix): ggml itself asserts on IQ2_XXS, IQ2_XS and IQ1_S, and the
# other three are unusable without one. (llama.cpp exempts token_embd/output from the
# rule; recipes here never pick these types for those tensors.)
IMPORTANCE_REQUIRED = frozenset({T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S})

# Rows per work item: small enough to balance threads, large enough that the
# per-call overhead (ctypes, pointer arithmetic) is negligible.
_TARGET_CHUNK_VALUES = 1 << 20


class QuantizationError(SmallfourError):
    """A quantization request ggml would abort on, explained in one line."""


def _library_path() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise QuantizationError("llama-cpp-python is not installed: it provides libggml-base, the quantizers")
    lib_dir = Path(spec.origin).parent / "lib"
    # The soname libllama links against first, so this process shares llama.cpp's copy of ggml-base
    # (the wheel ships the library under three names as separate files).
    for pattern in ("libggml-base.so.0", "libggml-base.so*", "libggml-base.0.dylib", "libggml-base.dylib",
                    "ggml-base.dll"):
        found = sorted(lib_dir.glob(pattern))
        if found:
            return found[0]
    raise QuantizationError(f"libggml-base not found in {lib_dir} (llama-cpp-python installation incomplete?)")


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_library_path()))
    i64, size_t = ctypes.c_int64, ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, i64, i64, i64,
                                        ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = size_t
    lib.ggml_quantize_init.argtypes, lib.ggml_quantize_init.restype = [ctypes.c_int], None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_row_size.argtypes, lib.ggml_row_size.restype = [ctypes.c_int, i64], size_t
    lib.ggml_type_size.argtypes, lib.ggml_type_size.restype = [ctypes.c_int], size_t
    lib.ggml_blck_size.argtypes, lib.ggml_blck_size.restype = [ctypes.c_int], i64
    return lib


@functools.cache
def supported_types() -> tuple[GGMLQuantizationType, ...]:
    """The quantizable types whose block layout in this libggml agrees with gguf-py's table."""
    lib = _lib()
    return tuple(t for t in QUANTIZABLE
                 if (lib.ggml_blck_size(int(t)), lib.ggml_type_size(int(t))) == GGML_QUANT_SIZES[t])


def requires_importance(qtype: GGMLQuantizationType) -> bool:
    """Whether `qtype` is refused without an importance vector (llama.cpp's rule, a superset of ggml's)."""
    qtype = GGMLQuantizationType(qtype)
    return qtype in IMPORTANCE_REQUIRED or bool(_lib().ggml_quantize_requires_imatrix(int(qtype)))


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][0]


def row_nbytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return n_per_row // block * size


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def quantize(values: np.ndarray, qtype: GGMLQuantizationType, importance: np.ndarray | None = None,
             threads: int | None = None) -> np.ndarray:
    """float32 rows `[rows, n]` → ggml's bytes for `qtype`, shape `[rows, bytes_per_row]` (uint8).

    `importance` is one non-negative weight per column (an importance-matrix row:
    the mean squared activation feeding each input of the matrix); quantizers that
    use one minimise the importance-weighted error. `threads` defaults to the
    CPUs this process may use.
    """
    qtype = _check_type(qtype)
    values = np.asarray(values)
    if values.ndim != 2:
        raise QuantizationError(f"quantize expects 2-D rows, got an array of shape {list(values.shape)}")
    rows, n = values.shape
    block = block_size(qtype)
    if n == 0 or n % block:
        raise QuantizationError(f"{qtype.name} needs rows whose length is a multiple of {block}; "
                                f"these rows have {n} values")
    src = np.ascontiguousarray(values, dtype=np.float32)
    if not np.isfinite(src).all():
        raise QuantizationError(f"cannot quantize to {qtype.name}: the values contain NaN or infinity")
    weights = _check_importance(importance, qtype, n)
    row_bytes = row_nbytes(qtype, n)
    dst = np.empty((rows, row_bytes), dtype=np.uint8)
    if rows == 0:
        return dst
    lib = _lib()
    lib.ggml_quantize_init(int(qtype))  # builds the IQ grids once, before any thread needs them
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise QuantizationError(f"threads must be at least 1, got {threads}")
    per_chunk = max(1, min(-(-rows // threads), _TARGET_CHUNK_VALUES // n))
    starts = range(0, rows, per_chunk)
    src_ptr, dst_ptr = src.ctypes.data, dst.ctypes.data
    imatrix_ptr = weights.ctypes.data if weights is not None else None

    def run(start: int) -> int:
        count = min(per_chunk, rows - start)
        written = lib.ggml_quantize_chunk(int(qtype), src_ptr + start * n * 4, dst_ptr + start * row_bytes, 0,
                                          count, n, imatrix_ptr)
        if written != count * row_bytes:
            raise QuantizationError(f"ggml wrote {written} bytes for {count} rows of {qtype.name}, "
                                    f"expected {count * row_bytes}")
        return written

    if threads == 1 or len(starts) == 1:
        for start in starts:
            run(start)
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(starts))) as pool:
            list(pool.map(run, starts))
    # Keep the inputs alive until every call has returned (the pointers above are raw).
    del src, weights
    return dst


def _check_type(qtype) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise QuantizationError(f"unknown GGML type {qtype!r}") from None
    if qtype not in supported_types():
        names = ", ".join(t.name for t in supported_types())
        raise QuantizationError(f"ggml cannot quantize to {qtype.name}; supported types: {names}")
    return qtype


def _check_importance(importance, qtype: GGMLQuantizationType, n: int) -> np.ndarray | None:
    if importance is None:
        if requires_importance(qtype):
            raise QuantizationError(f"{qtype.name} requires an importance matrix (--imatrix); "
                                    f"without one use a type such as Q2_K, IQ3_S or IQ4_XS")
        return None
    weights = np.ascontiguousarray(importance, dtype=np.float32)
    if weights.shape != (n,):
        raise QuantizationError(f"importance vector has shape {list(weights.shape)}, expected one value per "
                                f"column ({n})")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise QuantizationError("importance vector has negative, NaN or infinite values")
    return weights
