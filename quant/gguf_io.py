"""The one GGUF header reader, and the packing helpers for writing raw key/values.

Every module that needs to know what a GGUF holds (planner, inspect, store, requantize,
vision, imatrix) reads it here, so the magic check, the version check and the error
messages exist once. Only the header is parsed: gguf.GGUFReader builds a numpy view of
every token and merge of the vocabulary (≈10 s for the 131k-token Tekken vocabulary),
while this walk summarizes arrays by their length (≈0.3 s), and planning must work on a
file whose tensor data has not all arrived yet. Loading a model asks several times
(planner, expert overrides, vision checks), so the answer is cached while the file is
unchanged. Tensor data is read on demand through a memory map (`read_tensor`).
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, Keys

from quant.errors import SmallfourError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

_SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
            GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f",
            GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
            GGUFValueType.FLOAT64: "d"}
_FLOAT_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                 GGMLQuantizationType.BF16: np.uint16}


class NotGGUFError(SmallfourError):
    """The file exists but does not start with the GGUF magic (callers may explain what it is instead)."""


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


@dataclass(frozen=True, eq=False)
class GGUFHeader:
    """A GGUF's key/values and tensor table. Shared by every caller through the cache: read-only."""

    path: Path
    version: int
    fields: Mapping[str, Any]  # scalars and strings as values, arrays as their length
    kv_spans: Mapping[str, tuple[int, int]]  # key → (start, end) of the whole entry, for copying it verbatim
    tensors: tuple[TensorEntry, ...]
    alignment: int
    data_offset: int  # where the tensor data starts
    file_size: int
    _by_name: dict[str, TensorEntry] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {t.name: t for t in self.tensors})

    @property
    def architecture(self) -> str:
        return str(self.fields.get(Keys.General.ARCHITECTURE, ""))

    def arch_field(self, name: str, default: Any = None) -> Any:
        """The value of `{architecture}.{name}`; `name` may also be a gguf.Keys template ("{arch}.block_count")."""
        key = name.format(arch=self.architecture) if "{arch}" in name else f"{self.architecture}.{name}"
        return self.fields.get(key, default)

    def tensor(self, name: str) -> TensorEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise SmallfourError(f"{self.path.name} has no tensor {name}") from None

    def missing_data(self) -> TensorEntry | None:
        """The first tensor whose data ends past the end of the file (a partial download), if any."""
        return next((t for t in self.tensors if t.offset + t.nbytes > self.file_size), None)

    @property
    def complete(self) -> bool:
        return self.missing_data() is None

    def check_complete(self) -> None:
        cut = self.missing_data()
        if cut is not None:
            raise _truncated(self.path, cut.name)

    def raw_kv(self, key: str) -> bytes:
        """One key/value entry exactly as stored (key, type and value), to copy into another GGUF."""
        start, end = self.kv_spans[key]
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def array(self, key: str) -> list | None:
        """The items of an array value (`fields` holds only its length), read on demand; None if absent."""
        if key not in self.kv_spans:
            return None
        w = _Walker(self.raw_kv(key))
        w.string()
        return w.value(w.scalar("I"), items=True)


def read_header(path: Path | str, *, what: str = "") -> GGUFHeader:
    """The header of the GGUF at `path`, cached per (file, mtime, size); one-line errors otherwise.

    `what` names the file in the messages for a missing file or a non-GGUF ("model file", "mmproj").
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise SmallfourError(f"{label} does not exist")
    try:
        with open(path, "rb") as file:
            magic = file.read(len(MAGIC))
        stat = path.stat()
    except OSError as exc:
        raise SmallfourError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != MAGIC:
        raise NotGGUFError(f"{label} is not a GGUF file")
    return _read_header(path.absolute(), path.resolve(), stat.st_mtime_ns, stat.st_size)


def read_tensor(header: GGUFHeader, name: str) -> np.ndarray:
    """One tensor's stored data, memory-mapped and read-only.

    F32 and F16 as themselves, BF16 as its raw uint16 bits, quantized types as uint8 rows
    (one row of blocks per matrix row).
    """
    entry = header.tensor(name)
    if entry.offset + entry.nbytes > header.file_size:
        raise _truncated(header.path, name)
    dtype = _FLOAT_DTYPES.get(entry.qtype)
    if dtype is not None:
        return np.memmap(header.path, dtype=dtype, mode="r", offset=entry.offset, shape=entry.shape)
    rows = int(np.prod(entry.shape[:-1], dtype=np.int64))
    return np.memmap(header.path, dtype=np.uint8, mode="r", offset=entry.offset, shape=(rows, entry.nbytes // rows))


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
        if self.offset > len(self.buffer):
            raise IndexError("string past the end of the file")
        return bytes(self.buffer[self.offset - length:self.offset]).decode("utf-8", errors="replace")

    def value(self, kind: int, items: bool = False):
        """A value; an array as its length, or as a list of its items with `items`."""
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind != GGUFValueType.ARRAY:
            return self.scalar(_SCALARS[kind])
        item, count = self.scalar("I"), self.scalar("Q")
        if items:
            return [self.value(item, items=True) for _ in range(count)]
        if item in _SCALARS:
            self.offset += count * struct.calcsize(_SCALARS[item])
        else:
            for _ in range(count):
                self.value(item)
        return count


def _truncated(path: Path, tensor: str) -> SmallfourError:
    return SmallfourError(f"{path.name} is truncated: tensor {tensor} ends past the end of the file")


@functools.lru_cache(maxsize=8)
def _read_header(path: Path, resolved: Path, mtime_ns: int, size: int) -> GGUFHeader:
    """Keyed by the resolved file too, so a symlink pointed elsewhere is read again; `path` names it."""
    try:
        with open(resolved, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            w = _Walker(buffer)
            w.scalar("4s")  # the magic, checked by read_header
            version = w.scalar("I")
            if version not in SUPPORTED_VERSIONS:
                raise SmallfourError(f"{path.name}: GGUF version {version} is not supported")
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
            alignment = int(values.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT))
            data_offset = w.offset + (-w.offset % alignment)
    except (OSError, ValueError) as exc:
        raise SmallfourError(f"cannot read {path}: {exc}") from None
    except (struct.error, KeyError, IndexError) as exc:
        raise SmallfourError(f"cannot read {path.name} as GGUF: truncated or corrupt header ({exc})") from None
    tensors = []
    for name, shape, type_id, offset in raw:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise SmallfourError(f"{path.name}: tensor {name} has unknown type {type_id}") from None
        tensors.append(TensorEntry(name, shape, qtype, data_offset + offset))
    return GGUFHeader(path, version, MappingProxyType(values), MappingProxyType(spans), tuple(tensors), alignment,
                      data_offset, size)


def pack_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def pack_kv(key: str, value, kind: GGUFValueType) -> bytes:
    """One key/value entry (scalars and strings)."""
    head = pack_string(key) + struct.pack("<I", int(kind))
    if kind == GGUFValueType.STRING:
        return head + pack_string(value)
    return head + struct.pack("<" + _SCALARS[kind], value)
