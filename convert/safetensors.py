"""Memory-mapped safetensors reading and streaming-friendly writing.

Our own reader (instead of the `safetensors` package) because conversion needs
three things that package does not give with numpy: FP8 E4M3 and BF16 decoding
without torch, slicing a stacked expert tensor one expert at a time straight from
the mapping, and a clear one-line error for a corrupt header.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert.errors import ConversionError

# A header bigger than this is not a real checkpoint header (the 119B model's
# largest shard header is a few hundred KB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E8M0": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _fp8_e4m3_table() -> np.ndarray:
    """All 256 E4M3FN bit patterns as float32 (bias 7, no infinities, 0x7f/0xff are NaN)."""
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent = (codes >> 3) & 0xF
    mantissa = (codes & 0x7).astype(np.float64)
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent.astype(np.float64) - 7.0)
    subnormal = (mantissa / 8.0) * np.exp2(-6.0)
    values = sign * np.where(exponent == 0, subnormal, normal)
    values[(codes & 0x7F) == 0x7F] = np.nan
    return values.astype(np.float32)


FP8_E4M3_TO_F32 = _fp8_e4m3_table()


def _e8m0_to_f32(raw: np.ndarray) -> np.ndarray:
    return np.exp2(raw.astype(np.float32) - 127.0)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Decode raw little-endian storage of a safetensors dtype into float32."""
    if dtype == "F32":
        return np.array(raw.view(np.float32), dtype=np.float32)
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    if dtype == "F8_E4M3":
        return FP8_E4M3_TO_F32[raw.view(np.uint8)]
    if dtype == "F8_E8M0":
        return _e8m0_to_f32(raw.view(np.uint8))
    if dtype == "F64":
        return raw.view(np.float64).astype(np.float32)
    raise ConversionError(f"unsupported tensor dtype {dtype}")


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """One `.safetensors` file, memory-mapped; tensors are read on demand."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "rb")
        except OSError as exc:
            raise ConversionError(f"cannot open {path}: {exc.strerror}") from None
        size = os.fstat(self._file.fileno()).st_size
        self.entries, self.metadata, data_start = _parse_header(self._file, size, path)
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self._map_address = np.frombuffer(self._map, dtype=np.uint8, count=1).__array_interface__["data"][0] if size else 0
        self._data_start = data_start

    def keys(self) -> list[str]:
        return list(self.entries)

    def raw(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The stored bytes of a tensor (or of `tensor[rows]`), as a uint8 view of the mapping."""
        entry = self.entries[name]
        begin, end = entry.begin, entry.end
        if rows is not None:
            step = (end - begin) // entry.shape[0]
            begin, end = begin + rows.start * step, begin + rows.stop * step
        return np.frombuffer(self._map, dtype=np.uint8, count=end - begin, offset=self._data_start + begin)

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """A tensor (or `tensor[rows]`, a slice along its first axis) decoded to float32.

        The decoded copy is all the caller gets; the pages it was read from are dropped
        from this process right away, so a whole-checkpoint pass keeps only one tensor's
        worth of the file resident (the kernel's page cache still has it for re-reads).
        """
        entry = self.entries[name]
        shape = entry.shape if rows is None else (rows.stop - rows.start, *entry.shape[1:])
        raw = self.raw(name, rows)
        values = to_float32(raw, entry.dtype).reshape(shape)
        if raw.nbytes:
            self._release(raw)
        return values

    def _release(self, raw: np.ndarray) -> None:
        begin = raw.__array_interface__["data"][0] - self._map_address
        first_page = begin - begin % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, first_page, begin + raw.nbytes - first_page)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._file.close()


def _parse_header(file, size: int, path: Path) -> tuple[dict[str, TensorEntry], dict, int]:
    def corrupt(why: str) -> ConversionError:
        return ConversionError(f"corrupt safetensors file {path.name}: {why}")

    if size < 8:
        raise corrupt("file is shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", file.read(8))
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise corrupt(f"header length {header_len} does not fit in a {size}-byte file")
    try:
        header = json.loads(file.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise corrupt("__metadata__ is not a JSON object")
    data_size = size - 8 - header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        # Every field is checked for its JSON type: a wrong one must be a one-line error, not a TypeError.
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if (not isinstance(info, dict) or not isinstance(info.get("dtype"), str)
                or not isinstance(shape, list) or not all(_count(d) for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets)):
            raise corrupt(f"tensor {name!r} has a malformed entry (dtype a string, shape and data_offsets lists of "
                          "non-negative integers)")
        dtype, (begin, end) = info["dtype"], offsets
        if dtype not in DTYPE_SIZES:
            raise corrupt(f"tensor {name!r} has unknown dtype {dtype!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[dtype]
        if not (0 <= begin <= end <= data_size) or end - begin != expected:
            raise corrupt(f"tensor {name!r} data offsets {begin}..{end} do not match its shape or the file size")
        entries[name] = TensorEntry(dtype, tuple(shape), begin, end)
    # Two tensors sharing bytes would make one overwrite the other's meaning: refuse any overlap.
    ordered = sorted(((e.begin, e.end, n) for n, e in entries.items() if e.end > e.begin))
    for (_, previous_end, previous), (begin, _, name) in zip(ordered, ordered[1:]):
        if begin < previous_end:
            raise corrupt(f"tensors {previous!r} and {name!r} overlap in the data")
    return entries, metadata, 8 + header_len


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> None:
    """Write `{name: (dtype, raw array)}`; the raw array already holds the dtype's bytes."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, array) in tensors.items():
        nbytes = array.nbytes
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for _, array in tensors.values():
            out.write(np.ascontiguousarray(array).tobytes())
