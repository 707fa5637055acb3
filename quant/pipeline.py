"""From a recipe and the list of tensors to typed, encoded bytes: shared by convert and quantize.

- `TensorSlot` (quant.recipes): what a tensor is (name, role, layer, shape), before any data is read.
- `resolve_recipe_spec`: a recipe name / preset / TOML file / `fit:SIZE` → `Recipe`.
- `assign_types`: the type of every tensor, with fallbacks reported.
- `Encoder`: float32 pieces → the bytes of the chosen type, through ggml's quantizers
  (threaded), with each expert's own importance vector when an imatrix is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quant import ggml
from quant.errors import SmallfourError
from quant.fit import fit_recipe, parse_budget
from quant.imatrix import tensor_importance
from quant.names import ROLE_ROUTED_EXPERTS
from quant.recipes import FILE_TYPES, Recipe, TensorSlot, TypeChoice, encode, load_recipe, stored_nbytes

T = GGMLQuantizationType
PLAIN_TYPES = (T.F32, T.F16, T.BF16)
METADATA_RECIPE = "smallfour.recipe"
METADATA_DESCRIPTION = "smallfour.recipe_description"
METADATA_IMATRIX = "smallfour.imatrix"


def resolve_recipe_spec(spec: str, slots: list[TensorSlot], n_layers: int,
                        importance: dict[str, np.ndarray] | None = None, overhead_bytes: int | None = 0) -> Recipe:
    """`spec` as a Recipe; `fit:SIZE` is solved here for these tensors (see quant.fit; `overhead_bytes` None:
    the header is not measured yet)."""
    if str(spec).lower().startswith("fit:"):
        return fit_recipe(parse_budget(spec[4:]), slots, n_layers, importance, overhead_bytes=overhead_bytes,
                          name=f"fit:{spec[4:].strip()}", written=spec[4:].strip())
    return load_recipe(spec)


def validate_recipe_spec(spec: str) -> None:
    """Fail fast on an unknown recipe or an unreadable fit:SIZE, before any long work."""
    if str(spec).lower().startswith("fit:"):
        parse_budget(spec[4:])
    else:
        load_recipe(spec)


def assign_types(recipe: Recipe, slots: list[TensorSlot], n_layers: int) -> dict[str, TypeChoice]:
    return {s.name: recipe.choose(s.name, s.role, s.layer, s.shape, n_layers) for s in slots}


def fallback_lines(choices: dict[str, TypeChoice], shown: int = 3) -> list[str]:
    """One line per (recipe type → written type): how many tensors fell back, the first `shown` named."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, c in choices.items():
        if c.fallback_from is not None:
            groups.setdefault((c.fallback_from.name, c.qtype.name), []).append(name)
    lines = []
    for (wanted, written), names in groups.items():
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        count = f"{len(names)} tensors" if len(names) > 1 else "1 tensor"
        lines.append(f"{wanted} → {written} for {count} whose rows are not a multiple of the block: "
                     f"{', '.join(names[:shown])}{more}")
    return lines


def check_requirements(choices: dict[str, TypeChoice], slots: list[TensorSlot],
                       importance: dict[str, np.ndarray] | None) -> None:
    """Refuse before writing anything if a type needs an importance matrix that is missing."""
    missing = [f"{s.name} ({choices[s.name].qtype.name})" for s in slots
               if choices[s.name].qtype not in PLAIN_TYPES and ggml.requires_importance(choices[s.name].qtype)
               and tensor_importance(importance, s) is None]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        what = "an imatrix (--imatrix FILE)" if not importance else "imatrix entries"
        raise SmallfourError(f"these types need {what}: {', '.join(missing[:3])}{more}")


class Encoder:
    """Encodes the pieces of one tensor in order (pieces are consecutive along axis 0)."""

    def __init__(self, slot: TensorSlot, qtype: GGMLQuantizationType, importance: np.ndarray | None = None,
                 threads: int | None = None):
        self.slot, self.qtype, self.importance, self.threads = slot, qtype, importance, threads
        self.offset = 0  # index along axis 0 of the next piece
        self.nbytes = 0

    def encode(self, piece: np.ndarray) -> np.ndarray:
        start, self.offset = self.offset, self.offset + piece.shape[0]
        if self.qtype in PLAIN_TYPES:
            data = encode(piece, self.qtype)
        else:
            row = self.slot.shape[-1]
            imp = self.importance
            if imp is not None and imp.ndim == 2:
                data = np.concatenate([ggml.quantize(piece[j].reshape(-1, row), self.qtype, imp[start + j],
                                                     self.threads).reshape(-1) for j in range(piece.shape[0])])
            else:
                data = ggml.quantize(piece.reshape(-1, row), self.qtype, imp, self.threads)
        self.nbytes += data.nbytes
        return data

    def check_complete(self) -> None:
        expected = stored_nbytes(self.slot.shape, self.qtype)
        if self.offset != self.slot.shape[0] or self.nbytes != expected:
            raise SmallfourError(f"internal error: {self.slot.name} produced {self.nbytes} bytes for "
                                 f"{list(self.slot.shape)} ({expected} expected)")


def gguf_overhead(kv_bytes: int, slots: list[TensorSlot], alignment: int = 32) -> int:
    """Bytes of a GGUF that are not tensor data: header, key/values, tensor infos, padding."""
    info = sum(8 + len(s.name.encode()) + 4 + 8 * len(s.shape) + 4 + 8 for s in slots)
    header = 4 + 4 + 8 + 8 + kv_bytes + info
    return header + (-header % alignment) + alignment * len(slots)  # at most one pad per tensor


def tensor_bytes(slots: list[TensorSlot], choices: dict[str, TypeChoice]) -> int:
    return sum(stored_nbytes(s.shape, choices[s.name].qtype) for s in slots)


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    block, size = GGML_QUANT_SIZES[qtype]
    return 8 * size / block


def kv_nbytes(writer) -> int:
    """Bytes the key/value section of a gguf.GGUFWriter will take (before it is written)."""
    from gguf import GGUFValueType

    return sum(len(writer._pack_val(key, GGUFValueType.STRING, add_vtype=False))
               + len(writer._pack_val(v.value, v.type, add_vtype=True, sub_type=v.sub_type))
               for kv in writer.kv_data for key, v in kv.items())


def file_type_of(choices: dict[str, TypeChoice], slots: list[TensorSlot]):
    """general.file_type: named after the type holding most routed-expert bytes (most bytes overall
    in a model without experts)."""
    from gguf import LlamaFileType

    by_type: dict[GGMLQuantizationType, int] = {}
    experts = [s for s in slots if s.role == ROLE_ROUTED_EXPERTS] or slots
    for s in experts:
        qtype = choices[s.name].qtype
        by_type[qtype] = by_type.get(qtype, 0) + stored_nbytes(s.shape, qtype)
    top = max(by_type, key=by_type.get) if by_type else T.F32
    return FILE_TYPES.get(top, LlamaFileType.GUESSED)


def add_recipe_metadata(writer, recipe: Recipe, imatrix: Path | str | None) -> None:
    writer.add_string(METADATA_RECIPE, recipe.name)
    if recipe.description:
        writer.add_string(METADATA_DESCRIPTION, recipe.description)
    if imatrix is not None:
        writer.add_string(METADATA_IMATRIX, Path(imatrix).name)


def prefetched(items, depth: int = 1):
    """Iterate `items` with the next `depth` items produced on a background thread.

    Reading and decoding a piece (memory-mapped I/O, FP8 decode, scaling: numpy releases the
    GIL) then overlaps with quantizing and writing the previous one. Memory grows by `depth`
    pieces. Exceptions in the producer are re-raised here; closing the generator stops it.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as exc:  # handed to the consumer
            q.put((done, exc))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except Exception:
                pass
            thread.join(timeout=0.05)
