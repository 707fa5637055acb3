"""`smallfour quantize`: an f32/f16/bf16 GGUF → a GGUF quantized with a recipe.

Metadata (architecture, hyper-parameters, vocabulary, chat template) is copied byte for
byte; `general.file_type` and the recipe keys are replaced. Tensors are read through a
memory map in row chunks (one expert slice at a time), so memory stays bounded.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_VERSION, GGMLQuantizationType, GGUFValueType, Keys

from convert.errors import ConversionError
from convert.mistral4 import CHUNK_ELEMENTS
from convert.mmproj import mmproj_path
from convert.output import NoProgress, Progress, atomic_outputs, check_outputs
from quant.gguf_io import MAGIC, GGUFHeader, pack_kv, read_header, read_tensor
from quant.imatrix import load_importance, tensor_importance
from quant.names import layer_of, role_of
from quant.pipeline import (METADATA_DESCRIPTION, METADATA_IMATRIX, METADATA_RECIPE, Encoder, assign_types,
                            check_requirements, fallback_lines, file_type_of, gguf_overhead, prefetched,
                            resolve_recipe_spec, validate_recipe_spec)
from quant.recipes import TensorSlot, stored_nbytes

T = GGMLQuantizationType
SOURCE_TYPES = (T.F32, T.F16, T.BF16)
REPLACED_KEYS = (Keys.General.FILE_TYPE, METADATA_RECIPE, METADATA_DESCRIPTION, METADATA_IMATRIX)


@dataclass
class RequantizeReport:
    output: Path
    recipe: str
    tensors: int
    source_bytes: int
    output_bytes: int
    fallbacks: list[str] = field(default_factory=list)
    mmproj: Path | None = None  # the source's vision projector, copied beside the output


def requantize(source: Path, output: Path, recipe: str, *, force: bool = False, progress: Progress | None = None,
               imatrix: Path | None = None, threads: int | None = None,
               mmproj: Path | None = None) -> RequantizeReport:
    """Write `source` with `recipe`'s types to `output`; a given `mmproj` (the source's vision projector) is
    copied to `OUTPUT-mmproj.gguf` in the same transaction: both files land, or neither does."""
    source, output = Path(source), Path(output)
    if not source.is_file():
        raise ConversionError(f"{source} does not exist")
    outputs = [output] + ([mmproj_path(output)] if mmproj is not None else [])
    check_outputs(outputs, [source, *([Path(imatrix)] if imatrix is not None else []),
                            *([Path(mmproj)] if mmproj is not None else [])], force=force)
    validate_recipe_spec(recipe)
    importance = load_importance(imatrix)
    header = read_header(source)
    header.check_complete()
    n_layers = header.arch_field(Keys.LLM.BLOCK_COUNT)
    if not isinstance(n_layers, int):
        raise ConversionError(f"{source.name}: no {Keys.LLM.BLOCK_COUNT.format(arch=header.architecture)} "
                              "in the metadata")
    requantized = [t for t in header.tensors if t.qtype not in SOURCE_TYPES]
    if requantized:
        raise ConversionError(f"{source.name} is already quantized ({requantized[0].name} is "
                              f"{requantized[0].qtype.name}); quantize from an f32, f16 or bf16 GGUF")
    slots = [TensorSlot(t.name, role_of(t.name), layer_of(t.name), t.shape) for t in header.tensors]
    kept = [k for k in header.kv_spans if k not in REPLACED_KEYS]
    kv_bytes = sum(header.kv_spans[k][1] - header.kv_spans[k][0] for k in kept)
    overhead = gguf_overhead(kv_bytes + 512, slots, header.alignment)
    resolved = resolve_recipe_spec(recipe, slots, n_layers, importance, overhead)
    choices = assign_types(resolved, slots, n_layers)
    check_requirements(choices, slots, importance)
    new_kv = [pack_kv(Keys.General.FILE_TYPE, int(file_type_of(choices, slots)), GGUFValueType.UINT32),
              pack_kv(METADATA_RECIPE, resolved.name, GGUFValueType.STRING)]
    if resolved.description:
        new_kv.append(pack_kv(METADATA_DESCRIPTION, resolved.description, GGUFValueType.STRING))
    if imatrix is not None:
        new_kv.append(pack_kv(METADATA_IMATRIX, Path(imatrix).name, GGUFValueType.STRING))
    progress = progress or NoProgress()
    with atomic_outputs(*outputs, note=progress.note) as temporaries:
        with open(temporaries[0], "wb") as out:
            written = _write(out, header, kept, new_kv, slots, choices, importance, threads, progress)
            out.flush()
            os.fsync(out.fileno())
        if mmproj is not None:
            shutil.copyfile(mmproj, temporaries[1])
    return RequantizeReport(output, resolved.name, len(slots), sum(t.nbytes for t in header.tensors), written,
                            fallback_lines(choices), outputs[1] if mmproj is not None else None)


def _write(out, header: GGUFHeader, kept: list[str], new_kv: list[bytes], slots, choices, importance, threads,
           progress: Progress) -> int:
    alignment = header.alignment or GGUF_DEFAULT_ALIGNMENT
    out.write(MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(slots), len(kept) + len(new_kv)))
    for key in kept:
        out.write(header.raw_kv(key))
    for entry in new_kv:
        out.write(entry)
    offset = 0
    for slot in slots:
        qtype = choices[slot.name].qtype
        name = slot.name.encode()
        out.write(struct.pack("<Q", len(name)) + name + struct.pack("<I", len(slot.shape)))
        out.write(struct.pack(f"<{len(slot.shape)}Q", *reversed(slot.shape)))
        out.write(struct.pack("<IQ", int(qtype), offset))
        offset += stored_nbytes(slot.shape, qtype)
        offset += -offset % alignment
    out.write(b"\0" * (-out.tell() % alignment))
    progress.start(sum(t.nbytes for t in header.tensors), len(slots))
    total = 0
    for entry, slot in zip(header.tensors, slots):
        qtype = choices[slot.name].qtype
        encoder = Encoder(slot, qtype, tensor_importance(importance, slot), threads)
        stored = read_tensor(header, entry.name)
        for piece in prefetched(_pieces(stored, entry.qtype)):
            out.write(encoder.encode(piece).data)
            progress.advance(entry.nbytes * piece.shape[0] // entry.shape[0], slot.name,
                             encoder.offset == entry.shape[0])
        encoder.check_complete()
        total += encoder.nbytes
        out.write(b"\0" * (-encoder.nbytes % alignment))
    return total


def _pieces(stored: np.ndarray, qtype: GGMLQuantizationType):
    """float32 pieces along axis 0: whole expert slices for 3-D tensors, row chunks for 2-D."""
    per_item = int(np.prod(stored.shape[1:], dtype=np.int64)) or 1
    step = max(1, CHUNK_ELEMENTS // per_item) if stored.ndim == 2 else 1
    if stored.ndim == 1:
        step = stored.shape[0]
    for start in range(0, stored.shape[0], step):
        yield _to_f32(np.asarray(stored[start:start + step]), qtype)


def _to_f32(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype == T.BF16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)
