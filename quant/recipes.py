"""Which GGML type each tensor gets.

A recipe names the type for the big matrices; tensors that must stay precise
(norms, the router) stay F32 whatever the recipe, and a matrix whose rows do not
split into the type's blocks falls back to F16, reported so the user sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import quantize

from convert.errors import ConversionError

BUILTIN_RECIPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}

# Roles kept in F32 in every recipe: tiny, and the router's choice of experts is
# sensitive to rounding.
F32_ROLES = frozenset({"norm", "router"})


@dataclass(frozen=True)
class TypeChoice:
    qtype: GGMLQuantizationType
    fallback_from: GGMLQuantizationType | None = None


def resolve_recipe(name: str) -> tuple[GGMLQuantizationType, LlamaFileType]:
    try:
        return BUILTIN_RECIPES[name.lower()]
    except KeyError:
        raise ConversionError(f"unknown recipe {name!r}; choose one of {', '.join(BUILTIN_RECIPES)}") from None


def choose_type(recipe_type: GGMLQuantizationType, role: str, shape: tuple[int, ...]) -> TypeChoice:
    if len(shape) == 1 or role in F32_ROLES:
        return TypeChoice(GGMLQuantizationType.F32)
    block_size = GGML_QUANT_SIZES[recipe_type][0]
    if shape[-1] % block_size:
        return TypeChoice(GGMLQuantizationType.F16, fallback_from=recipe_type)
    return TypeChoice(recipe_type)


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns, rounding to nearest even (finite input)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def encode(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 values in the stored form of `qtype` (rows quantized independently)."""
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return values.astype(np.float16)
    if qtype == GGMLQuantizationType.BF16:
        # gguf-py's BF16 path works row by row; the whole array at once is ~10× faster.
        return bf16_bits(values)
    return quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)


def stored_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block_size * type_size
