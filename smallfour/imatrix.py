"""`smallfour imatrix`: collect an importance matrix through llama.cpp, as `llama-imatrix` does.

The model runs over calibration text in chunks of `--ctx` tokens (KV cache
cleared, `<s>` first, logits for every position so the last layer computes
every row). llama.cpp's graph scheduler calls an eval callback
(`cb_eval` in `llama_context_params`) for every node; for matrix
multiplications by model weights we read the activation input `src1` and add
its squares per column:

- `MUL_MAT` by a `blk.*` weight, batches of at least 16 rows of F32: one sum
  per column (per head slice for a 3-D weight), one count per activation row;
- `MUL_MAT_ID` (routed experts): the `ids` operand says which expert each
  token's row went to, so sums and counts are kept per expert.

That is `IMatrixCollector::collect_imatrix` of llama.cpp's
`tools/imatrix/imatrix.cpp` (same filters, same counting), except that sums
accumulate in float64 here. The file is written by `quant.imatrix.save_imatrix`
in llama.cpp's imatrix GGUF format.

The callback goes into the context parameters when `Model.load` creates the context.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smallfour.errors import SmallfourError

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26
GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object)
MIN_DENSE_ROWS = 16  # llama-imatrix ignores dense products of fewer rows


class GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` of ggml/include/ggml.h (checked against `ggml_tensor_overhead()` at load)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


@functools.cache
def _ggml_base() -> ctypes.CDLL:
    from smallfour.placement import _ggml

    base = _ggml()
    base.ggml_op_name.argtypes, base.ggml_op_name.restype = [ctypes.c_int], ctypes.c_char_p
    base.ggml_backend_buffer_is_host.argtypes, base.ggml_backend_buffer_is_host.restype = [ctypes.c_void_p], \
        ctypes.c_bool
    base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    base.ggml_backend_tensor_get.restype = None
    base.ggml_nbytes.argtypes, base.ggml_nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
    base.ggml_tensor_overhead.argtypes, base.ggml_tensor_overhead.restype = [], ctypes.c_size_t
    if base.ggml_tensor_overhead() != GGML_OBJECT_SIZE + ctypes.sizeof(GgmlTensor):
        raise SmallfourError("this llama.cpp build lays out ggml_tensor differently than smallfour expects "
                             f"({base.ggml_tensor_overhead()} bytes of overhead); imatrix collection needs the "
                             "llama-cpp-python version smallfour pins")
    return base


def weight_name(name: str) -> str:
    """llama-imatrix's filter: `CUDA0#blk.0.attn_k.weight#0` → `blk.0.attn_k.weight`."""
    if "#" in name:
        return name.split("#")[1]
    return name


class ImatrixCollector:
    """Sums of squared activations per weight (per expert), filled from llama.cpp's eval callback."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}  # name → float64 [n_mat, n]
        self.counts: dict[str, np.ndarray] = {}  # name → int64 [n_mat]
        self.active = False
        self.error: BaseException | None = None
        self._ops: dict[int, str] = {}
        self._base = _ggml_base()
        import llama_cpp

        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._callback)

    # --- reading ggml tensors ----------------------------------------------------------------

    def _op(self, op: int) -> str:
        if op not in self._ops:
            self._ops[op] = (self._base.ggml_op_name(op) or b"").decode()
        return self._ops[op]

    def _array(self, address: int, dtype) -> np.ndarray:
        """A copy of a ggml tensor's elements as a numpy array `[ne3, ne2, ne1, ne0]` (from any device)."""
        t = GgmlTensor.from_address(address)
        itemsize = np.dtype(dtype).itemsize
        if t.nb[0] != itemsize:
            raise SmallfourError(f"unexpected element stride {t.nb[0]} in {t.name.decode(errors='replace')}")
        nbytes = self._base.ggml_nbytes(address)
        if t.buffer and not self._base.ggml_backend_buffer_is_host(t.buffer):
            buffer = ctypes.create_string_buffer(nbytes)
            self._base.ggml_backend_tensor_get(address, buffer, 0, nbytes)
        else:
            buffer = (ctypes.c_uint8 * nbytes).from_address(t.data)
        raw = np.frombuffer(buffer, dtype=np.uint8, count=nbytes - nbytes % itemsize).view(dtype)
        view = np.lib.stride_tricks.as_strided(raw, shape=tuple(reversed(t.ne[:])), strides=tuple(reversed(t.nb[:])),
                                               writeable=False)
        return np.array(view)

    # --- the callback ------------------------------------------------------------------------

    def _callback(self, tensor: int, ask: bool, user_data) -> bool:
        try:
            return self._collect(tensor, ask)
        except BaseException as exc:  # never let an exception cross into C
            if self.error is None:
                self.error = exc
            return not ask  # finish this graph; the error is raised after it

    def _collect(self, address: int, ask: bool) -> bool:
        if not self.active or self.error is not None:
            return not ask  # asked: not interested; observing: let the graph run on (False cancels it)
        t = GgmlTensor.from_address(address)
        op = self._op(t.op)
        if op not in ("MUL_MAT", "MUL_MAT_ID") or not t.src[0] or not t.src[1]:
            return not ask
        src0 = GgmlTensor.from_address(t.src[0])
        src1 = GgmlTensor.from_address(t.src[1])
        name = weight_name(src0.name.decode(errors="replace"))
        if ask:
            if op == "MUL_MAT_ID":
                return True
            return src1.ne[1] >= MIN_DENSE_ROWS and src1.type == GGML_TYPE_F32 and name.startswith("blk.")
        if src1.type != GGML_TYPE_F32:
            raise SmallfourError(f"{name}: activations of type {src1.type}, expected F32")
        x = self._array(t.src[1], np.float32)  # [ne3, ne2, ne1, ne0]
        if op == "MUL_MAT_ID":
            self._collect_experts(name, src0, x, self._array(t.src[2], np.int32))
        else:
            self._collect_dense(name, src0, src1, x)
        if not np.isfinite(self.sums[name]).all():
            raise SmallfourError(f"non-finite activations in {name}")
        return True

    def _entry(self, name: str, n_mat: int, ne0: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, ne0), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        sums, counts = self.sums[name], self.counts[name]
        if sums.shape != (n_mat, ne0):
            raise SmallfourError(f"inconsistent activation size for {name}: {sums.shape} vs {(n_mat, ne0)}")
        return sums, counts

    def _collect_experts(self, name: str, src0: GgmlTensor, x: np.ndarray, ids: np.ndarray) -> None:
        # ids: [1, 1, n_tokens, n_ids] (expert of each token's k-th slot); x: [1, n_tokens, ne1, ne0]
        n_as, ne0 = src0.ne[2], x.shape[-1]
        n_tokens, n_ids = ids.shape[-2], ids.shape[-1]
        if x.shape[0] != 1 or x.shape[1] != n_tokens:
            raise SmallfourError(f"{name}: unexpected expert activation shape {x.shape} for {n_tokens} tokens")
        experts = ids.reshape(n_tokens, n_ids).astype(np.int64)
        if experts.min(initial=0) < 0 or experts.max(initial=0) >= n_as:
            raise SmallfourError(f"{name}: expert id out of range")
        rows = x[0][:, np.arange(n_ids) % x.shape[2], :].astype(np.float64)  # [n_tokens, n_ids, ne0]
        sums, counts = self._entry(name, n_as, ne0)
        flat = experts.reshape(-1)
        order = np.argsort(flat, kind="stable")
        used, starts = np.unique(flat[order], return_index=True)
        sums[used] += np.add.reduceat(np.square(rows.reshape(-1, ne0)[order]), starts, axis=0)
        counts += np.bincount(flat, minlength=n_as)

    def _collect_dense(self, name: str, src0: GgmlTensor, src1: GgmlTensor, x: np.ndarray) -> None:
        n2, n3 = src0.ne[2], src0.ne[3]
        n_mat, ne0 = n2 * n3, x.shape[-1]
        # llama-imatrix keeps one count per dense weight (and all heads' sums in one row).
        sums, counts = self._entry(name, 1, ne0 * n_mat)
        squares = np.square(x.astype(np.float64)).sum(axis=2)  # [ne3, ne2, ne0]
        per_mat = sums.reshape(n_mat, ne0)
        for i3 in range(squares.shape[0]):
            for i2 in range(squares.shape[1]):
                per_mat[(i3 % n3) * n2 + (i2 % n2)] += squares[i3, i2]
        rows = src1.ne[1] * src1.ne[2] * src1.ne[3]
        counts += rows // n_mat


@dataclass(frozen=True)
class ImatrixReport:
    output: Path
    entries: int
    chunks: int
    chunk_size: int
    tokens: int
    # weight name → how many of its experts no calibration token reached
    unused_experts: dict[str, tuple[int, int]]


def read_calibration_text(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SmallfourError(f"calibration text {path} does not exist") from None
    except UnicodeDecodeError:
        raise SmallfourError(f"calibration text {path} is not UTF-8 text") from None
    except OSError as exc:
        raise SmallfourError(f"cannot read calibration text {path}: {exc.strerror}") from None
    if not text.strip():
        raise SmallfourError(f"calibration text {path} is empty")
    return text


def collect_imatrix(model: Path, text_file: Path, output: Path, *, n_ctx: int = 512, chunks: int | None = None,
                    placement=None, kv_type: str = "f16", n_threads: int | None = None, verbose: bool = False,
                    on_chunk: Callable[[int, int], None] | None = None) -> ImatrixReport:
    """Run `model` over `text_file` in chunks of `n_ctx` tokens and write the importance matrix to `output`."""
    from smallfour.model import Model

    text = read_calibration_text(text_file)
    if n_ctx < MIN_DENSE_ROWS:
        raise SmallfourError(f"--ctx {n_ctx}: chunks need at least {MIN_DENSE_ROWS} tokens")
    collector = ImatrixCollector()
    with Model.load(Path(model), n_ctx=n_ctx, kv_type=kv_type, placement=placement, n_threads=n_threads,
                    verbose=verbose, eval_callback=collector.callback) as llm:
        return _collect(llm, collector, text, text_file, output, n_ctx=n_ctx, chunks=chunks, on_chunk=on_chunk)


def _collect(llm, collector: ImatrixCollector, text: str, text_file: Path, output: Path, *, n_ctx: int,
             chunks: int | None, on_chunk: Callable[[int, int], None] | None) -> ImatrixReport:
    from convert.output import atomic_output
    from quant.imatrix import save_imatrix

    tokens = llm.tokenize(text, add_bos=True)
    available = len(tokens) // n_ctx
    if available == 0:
        raise SmallfourError(f"{text_file} tokenizes to {len(tokens)} tokens, fewer than one chunk of --ctx {n_ctx}; "
                             "give more text or a smaller --ctx")
    n_chunks = available if chunks is None else min(chunks, available)
    bos = llm.bos
    collector.active = True
    try:
        for i in range(n_chunks):
            chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
            if bos >= 0:
                chunk[0] = bos  # llama-imatrix starts every chunk with <s>
            llm.reset()
            try:
                llm.decode(chunk, all_logits=True)  # as llama-imatrix: the output layer sees every row
            except SmallfourError as exc:
                if collector.error is None:
                    raise SmallfourError(f"llama.cpp failed on chunk {i + 1}: {exc}") from None
            if collector.error is not None:
                raise collector.error
            if on_chunk is not None:
                on_chunk(i + 1, n_chunks)
    finally:
        collector.active = False
    if not collector.sums:
        raise SmallfourError(f"{llm.name}: no matrix multiplications by model weights were seen")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(Path(output)) as temporary:
        save_imatrix(temporary, {k: v.astype(np.float32) for k, v in collector.sums.items()}, collector.counts,
                     datasets=[str(text_file)], chunk_count=n_chunks, chunk_size=n_ctx)
    unused = {name: (int((c == 0).sum()), c.size) for name, c in sorted(collector.counts.items())
              if c.size > 1 and (c == 0).any()}
    return ImatrixReport(Path(output), len(collector.sums), n_chunks, n_ctx, n_chunks * n_ctx, unused)

