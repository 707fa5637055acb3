"""llama.cpp's importance-matrix files (the GGUF format of `llama-imatrix`).

An importance matrix holds, for every matrix multiplication `W·x` of the model,
the sum over calibration tokens of `x²` per input column (`<name>.in_sum2`)
and how many activation rows were summed (`<name>.counts`). Routed-expert
tensors keep one row of sums and one count per expert, so every expert slice
is quantized with the statistics of the tokens routed to it.

The layout is exactly what `tools/imatrix/imatrix.cpp` writes and
`common/imatrix-loader.cpp` reads in the llama.cpp that llama-cpp-python
0.3.36 vendors:

- metadata `general.type = "imatrix"`, `imatrix.datasets` (array of strings),
  `imatrix.chunk_count` and `imatrix.chunk_size` (uint32); no architecture;
- per weight tensor, in sorted name order, two F32 tensors:
  `<weight>.in_sum2` with ggml shape `[n / n_mat, n_mat]` and `<weight>.counts`
  with ggml shape `[1, n_mat]`, where `n_mat` is the number of counts (one per
  expert for `MUL_MAT_ID` weights, one for everything else: a 3-D dense weight
  such as MLA's per-head `attn_k_b` keeps one count and all heads' sums in one row).

`load_imatrix` turns a file into importances the way `llama-quantize` does:
`in_sum2 / count` per expert, and 1.0 for an expert no calibration token reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFType, Keys

from quant.errors import SmallfourError
from quant.gguf_io import NotGGUFError, read_header, read_tensor
from quant.recipes import TensorSlot

GENERAL_TYPE = GGUFType.IMATRIX
KEY_DATASETS = Keys.IMatrix.DATASETS
KEY_CHUNK_COUNT = Keys.IMatrix.CHUNK_COUNT
KEY_CHUNK_SIZE = Keys.IMatrix.CHUNK_SIZE
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"


class ImatrixError(SmallfourError):
    """A missing, malformed or mismatched importance matrix, explained in one line."""


@dataclass
class Imatrix:
    """Raw statistics: per weight name, sums `[n_mat, n]` (float32) and counts `[n_mat]` (int64)."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self) -> dict[str, np.ndarray]:
        """Weight name → mean squared activation, as llama-quantize computes it.

        1-D `[n]` for a weight with one count, 2-D `[n_expert, n]` for expert weights;
        experts with a zero count get 1.0 everywhere (no preference).
        """
        out: dict[str, np.ndarray] = {}
        for name, sums in self.sums.items():
            counts = self.counts[name].astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], np.float32(1.0))
            mean = mean.astype(np.float32)
            out[name] = mean[0] if mean.shape[0] == 1 else mean
        return out


def read_imatrix(path: str | Path) -> Imatrix:
    """Every entry of an imatrix GGUF, with its metadata; `ImatrixError` for anything else."""
    path = Path(path)
    try:
        header = read_header(path, what="imatrix file")
    except NotGGUFError:
        raise ImatrixError(f"{path} is not a GGUF imatrix (the legacy .dat format is not supported: "
                           f"convert it with `llama-imatrix --in-file {path.name} -o imatrix.gguf`)") from None
    except SmallfourError as exc:
        raise ImatrixError(str(exc)) from None
    fields = header.fields
    general_type = fields.get(Keys.General.TYPE)
    if general_type not in (None, GENERAL_TYPE) or (
            Keys.General.ARCHITECTURE in fields and not any(t.name.endswith(SUMS_SUFFIX) for t in header.tensors)):
        what = fields.get(Keys.General.ARCHITECTURE) or general_type
        raise ImatrixError(f"{path} is a {what} GGUF, not an importance matrix (make one with `smallfour imatrix`)")
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in fields]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tensor in header.tensors:
        name = tensor.name
        if name.endswith(SUMS_SUFFIX):
            target, key = sums, name[: -len(SUMS_SUFFIX)]
        elif name.endswith(COUNTS_SUFFIX):
            target, key = counts, name[: -len(COUNTS_SUFFIX)]
        else:
            continue
        if tensor.qtype != GGMLQuantizationType.F32:
            raise ImatrixError(f"{path}: {name} must be F32, not {tensor.qtype.name}")
        try:
            target[key] = np.array(read_tensor(header, name), dtype=np.float32).reshape(-1)
        except SmallfourError as exc:
            raise ImatrixError(str(exc)) from None
    if not sums and not counts:
        arch = fields.get(Keys.General.ARCHITECTURE)
        what = f"a {arch} model" if arch else "a GGUF without *.in_sum2 / *.counts tensors"
        raise ImatrixError(f"{path} is {what}, not an importance matrix (make one with `smallfour imatrix`)")
    if missing:
        raise ImatrixError(f"{path}: missing imatrix metadata {', '.join(missing)} (llama-quantize refuses it too)")
    unpaired = sorted(set(sums) ^ set(counts))
    if unpaired:
        raise ImatrixError(f"{path}: mismatched sums and counts for {unpaired[0]}")
    entries_sums, entries_counts = {}, {}
    for name in sorted(sums):
        n_mat = counts[name].size
        if n_mat == 0 or sums[name].size % n_mat:
            raise ImatrixError(f"{path}: {name} has {sums[name].size} sums for {n_mat} counts")
        entries_sums[name] = sums[name].reshape(n_mat, -1)
        entries_counts[name] = np.rint(counts[name]).astype(np.int64)
    datasets = [str(d) for d in (header.array(KEY_DATASETS) or [])]
    return Imatrix(entries_sums, entries_counts, datasets, int(fields[KEY_CHUNK_COUNT]), int(fields[KEY_CHUNK_SIZE]))


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """GGUF weight name (`blk.3.ffn_down_exps.weight`) → importance (float32).

    1-D `[row length]` for ordinary weights, 2-D `[n_expert, row length]` for routed
    experts (one importance vector per expert slice). See `importance_rows` to match
    an entry to a tensor's shape.
    """
    return read_imatrix(path).importance()


def load_importance(path: Path | str | None) -> dict[str, np.ndarray] | None:
    """`load_imatrix` for an optional `--imatrix FILE`."""
    return None if path is None else load_imatrix(path)


def tensor_importance(importance: dict[str, np.ndarray] | None, slot: TensorSlot) -> np.ndarray | None:
    """This tensor's importance: 1-D (one value per column), or 2-D (one row per expert/slice)."""
    if not importance:
        return None
    values = importance.get(slot.name)
    if values is None:
        values = importance.get(slot.name.removesuffix(".weight"))
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float32)
    n = slot.shape[-1]
    if len(slot.shape) == 3 and values.shape == (slot.shape[0] * n,):
        # A per-head 3-D weight (MLA's attn_k_b/attn_v_b): llama-imatrix keeps one count and
        # the heads' sums in one row; llama-quantize slices it head by head (importance_rows).
        values = values.reshape(slot.shape[0], n)
    ok = values.shape == (n,) or (len(slot.shape) == 3 and values.shape == (slot.shape[0], n))
    if not ok:
        raise ImatrixError(f"imatrix entry for {slot.name} has shape {list(values.shape)}; the tensor "
                           f"{list(slot.shape)} needs [{n}]" + (f" or [{slot.shape[0]}, {n}]"
                                                                 if len(slot.shape) == 3 else ""))
    if not np.isfinite(values).all() or (values < 0).any():
        raise ImatrixError(f"imatrix entry for {slot.name} has negative, NaN or infinite values")
    return values


def importance_rows(importance: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The importance of weight `name` (numpy `shape`, rows last) as `[n_mat, row length]`.

    `n_mat` is the product of the leading dimensions (experts, or heads of a per-head
    3-D weight): slice `i` of the weight is quantized with row `i`. The total size must
    be row length × n_mat, llama-quantize's own check.
    """
    n_per_row = int(shape[-1])
    n_mat = int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1
    values = np.asarray(importance, dtype=np.float32)
    if values.size != n_per_row * n_mat:
        raise ImatrixError(f"imatrix entry for {name} has {values.size} values but the tensor needs "
                           f"{n_per_row * n_mat} ({n_mat} × {n_per_row}); was the imatrix made for another model?")
    return np.ascontiguousarray(values.reshape(n_mat, n_per_row))


def save_imatrix(path: str | Path, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray],
                 datasets: list[str] | tuple[str, ...] = (), chunk_count: int | None = None,
                 chunk_size: int = 0) -> Path:
    """Write an imatrix GGUF as llama-imatrix does.

    `sums[name]` is `[n_mat, n]` (or 1-D `[n]` for one matrix), `counts[name]` `[n_mat]`
    (or a scalar). `chunk_count` defaults to llama-imatrix's own: the largest count
    divided by `chunk_size`.
    """
    from gguf import GGUFWriter

    path = Path(path)
    if set(sums) != set(counts):
        raise ImatrixError("sums and counts must name the same tensors")
    if not sums:
        raise ImatrixError("no importance data to save")
    if not datasets:
        # llama-imatrix can write an empty list; gguf-py cannot write an empty array.
        raise ImatrixError("name at least one calibration dataset for imatrix.datasets")
    entries = []
    largest = 0
    for name in sorted(sums):
        count = np.atleast_1d(np.asarray(counts[name], dtype=np.float32)).reshape(-1)
        values = np.asarray(sums[name], dtype=np.float32)
        if values.size == 0 or values.size % count.size:
            raise ImatrixError(f"{name}: {values.size} sums do not split into {count.size} matrices")
        if not np.isfinite(values).all():
            raise ImatrixError(f"{name}: the sums contain NaN or infinity")
        entries.append((name, values.reshape(count.size, -1), count.reshape(count.size, 1)))
        largest = max(largest, int(count.max()))
    if chunk_count is None:
        chunk_count = largest // chunk_size if chunk_size > 0 else 0
    writer = GGUFWriter(path, arch="")
    writer.kv_data[0].pop(Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
    writer.add_type(GENERAL_TYPE)
    writer.add_array(KEY_DATASETS, [str(d) for d in datasets])
    writer.add_uint32(KEY_CHUNK_COUNT, int(chunk_count))
    writer.add_uint32(KEY_CHUNK_SIZE, int(chunk_size))
    for name, values, count in entries:
        writer.add_tensor(name + SUMS_SUFFIX, np.ascontiguousarray(values))
        writer.add_tensor(name + COUNTS_SUFFIX, np.ascontiguousarray(count))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
