"""A fast GGUF table reader and a raw key/value copier.

gguf.GGUFReader builds a numpy view of every token and merge of the vocabulary (≈10 s
for the 131k-token Tekken vocabulary); re-quantizing needs only the byte spans of the
key/value entries (copied verbatim) and the tensor table (read through a memory map).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from convert.errors import ConversionError

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # numpy order: row length last
    qtype: GGMLQuantizationType
    offset: int  # absolute, in the file

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape, dtype=np.int64)) // block * size


@dataclass
class GGUFTable:
    path: Path
    version: int
    kv_spans: dict[str, tuple[int, int]]  # key → (start, end) of the whole entry
    values: dict  # scalar and string values (arrays as their length)
    tensors: list[TensorEntry]
    alignment: int

    def raw_kv(self, key: str) -> bytes:
        start, end = self.kv_spans[key]
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def array(self, entry: TensorEntry) -> np.ndarray:
        """The tensor's stored data, memory-mapped: float32/float16/uint16 (BF16) values, or uint8 rows."""
        dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                 GGMLQuantizationType.BF16: np.uint16}.get(entry.qtype)
        if dtype is not None:
            return np.memmap(self.path, dtype=dtype, mode="r", offset=entry.offset, shape=entry.shape)
        rows = int(np.prod(entry.shape[:-1], dtype=np.int64))
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=entry.offset, shape=(rows, entry.nbytes // rows))


class _Walker:
    def __init__(self, buffer):
        self.buffer, self.offset = buffer, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        self.offset += length
        return bytes(self.buffer[self.offset - length:self.offset]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            return self.scalar(_SCALARS[kind])
        item, count = self.scalar("I"), self.scalar("Q")
        if item in _SCALARS:
            self.offset += count * struct.calcsize(_SCALARS[item])
        else:
            for _ in range(count):
                self.value(item)
        return count


def read_table(path: Path | str, *, require_data: bool = True) -> GGUFTable:
    """The key/values and tensor table of a GGUF; `require_data=False` accepts a file cut after its header."""
    path = Path(path)
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            w = _Walker(buffer)
            if w.scalar("4s") != b"GGUF":
                raise ConversionError(f"{path.name} is not a GGUF file")
            version = w.scalar("I")
            if version not in (2, 3):
                raise ConversionError(f"{path.name}: GGUF version {version} is not supported")
            n_tensors, n_kv = w.scalar("Q"), w.scalar("Q")
            spans, values = {}, {}
            for _ in range(n_kv):
                start = w.offset
                key = w.string()
                values[key] = w.value(w.scalar("I"))
                spans[key] = (start, w.offset)
            raw = []
            for _ in range(n_tensors):
                name = w.string()
                dims = tuple(w.scalar("Q") for _ in range(w.scalar("I")))
                raw.append((name, tuple(reversed(dims)), w.scalar("I"), w.scalar("Q")))
            alignment = int(values.get("general.alignment", 32))
            data_start = w.offset + (-w.offset % alignment)
            size = len(buffer)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from None
    except (struct.error, KeyError, IndexError) as exc:
        raise ConversionError(f"cannot read {path.name} as GGUF: truncated or corrupt header ({exc})") from None
    tensors = []
    for name, shape, type_id, offset in raw:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ConversionError(f"{path.name}: tensor {name} has unknown type {type_id}") from None
        entry = TensorEntry(name, shape, qtype, data_start + offset)
        if require_data and entry.offset + entry.nbytes > size:
            raise ConversionError(f"{path.name} is truncated: tensor {name} ends past the end of the file")
        tensors.append(entry)
    return GGUFTable(path, version, spans, values, tensors, alignment)


def pack_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def pack_kv(key: str, value, kind: GGUFValueType) -> bytes:
    """One key/value entry (scalars and strings)."""
    head = pack_string(key) + struct.pack("<I", int(kind))
    if kind == GGUFValueType.STRING:
        return head + pack_string(value)
    return head + struct.pack("<" + _SCALARS[int(kind)], value)
