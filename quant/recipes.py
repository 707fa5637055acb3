"""Which GGML type each tensor gets.

A recipe names the type for the big matrices; tensors that must stay precise
(norms, the router) stay F32 whatever the recipe, and a matrix whose rows do not
split into the type's blocks falls back to F16, reported so the user sees it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import quantize

from quant.errors import SmallfourError
from quant.names import (ROLE_ATTENTION, ROLE_DENSE_FFN, ROLE_EMBEDDINGS, ROLE_NORM, ROLE_OUTPUT, ROLE_ROUTED_EXPERTS,
                         ROLE_ROUTER, ROLE_SHARED_EXPERT, base_name)

BUILTIN_RECIPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
}

# Roles kept in F32 in every recipe: tiny, and the router's choice of experts is
# sensitive to rounding.
F32_ROLES = frozenset({ROLE_NORM, ROLE_ROUTER})


@dataclass(frozen=True)
class TensorSlot:
    """What a tensor is (name, role, layer, shape), before any data is read: what a recipe decides on."""

    name: str
    role: str
    layer: int | None
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TypeChoice:
    qtype: GGMLQuantizationType
    fallback_from: GGMLQuantizationType | None = None


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


# --- recipes: which type each tensor gets, by role, tensor and layer -------------------------
#
# A recipe file is TOML:
#
#     [recipe]
#     name = "sf-q4"                      # defaults to the file's stem
#     description = "…"
#     default = "Q4_K"                    # any quantizable matrix nothing below names
#
#     [roles]                             # embeddings, output, attention, shared_expert,
#     attention = "Q8_0"                  # routed_experts, dense_ffn
#
#     [[rules]]                           # first matching rule wins, before [roles]
#     tensor = "ffn_down_exps"            # GGUF base name (blk.N. and .weight stripped)
#     layers = "first:12%, last:12%"      # "3", "0-3", "first:N", "last:N" (N or N%)
#     type = "Q5_K"
#
#     [[rules]]
#     pattern = 'blk\.1[0-9]\.ffn_up'     # regular expression searched in the full name
#     type = "Q6_K"
#
# A rule may combine role, tensor, layers and pattern (all must match). Norms and the
# router stay F32 whatever a recipe says.

import re  # noqa: E402
import tomllib  # noqa: E402
from pathlib import Path  # noqa: E402

PRESET_DIR = Path(__file__).parent / "recipes"

T = GGMLQuantizationType

# llama.cpp's fallbacks (llama-quant.cpp tensor_type_fallback) for a row length that is not
# a multiple of a 256-value super-block: a 32-block type of about the same size.
FALLBACK = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}

# general.file_type for a recipe, named after the type of its routed experts (most of the bytes).
FILE_TYPES = {
    T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.BF16: LlamaFileType.MOSTLY_BF16,
    T.Q8_0: LlamaFileType.MOSTLY_Q8_0, T.Q6_K: LlamaFileType.MOSTLY_Q6_K, T.Q5_K: LlamaFileType.MOSTLY_Q5_K_M,
    T.Q5_0: LlamaFileType.MOSTLY_Q5_0, T.Q5_1: LlamaFileType.MOSTLY_Q5_1, T.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
    T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.Q4_1: LlamaFileType.MOSTLY_Q4_1, T.Q3_K: LlamaFileType.MOSTLY_Q3_K_M,
    T.Q2_K: LlamaFileType.MOSTLY_Q2_K, T.IQ4_XS: LlamaFileType.MOSTLY_IQ4_XS, T.IQ4_NL: LlamaFileType.MOSTLY_IQ4_NL,
    T.IQ3_S: LlamaFileType.MOSTLY_IQ3_S, T.IQ3_XXS: LlamaFileType.MOSTLY_IQ3_XXS,
    T.IQ2_S: LlamaFileType.MOSTLY_IQ2_S, T.IQ2_XS: LlamaFileType.MOSTLY_IQ2_XS,
    T.IQ2_XXS: LlamaFileType.MOSTLY_IQ2_XXS, T.IQ1_M: LlamaFileType.MOSTLY_IQ1_M, T.IQ1_S: LlamaFileType.MOSTLY_IQ1_S,
    T.TQ1_0: LlamaFileType.MOSTLY_TQ1_0, T.TQ2_0: LlamaFileType.MOSTLY_TQ2_0,
}

QUANTIZED_ROLES = (ROLE_EMBEDDINGS, ROLE_OUTPUT, ROLE_ATTENTION, ROLE_SHARED_EXPERT, ROLE_ROUTED_EXPERTS,
                   ROLE_DENSE_FFN)


def parse_type(text: str, where: str = "recipe") -> GGMLQuantizationType:
    from quant.ggml import supported_types

    try:
        qtype = GGMLQuantizationType[str(text).upper()]
    except KeyError:
        qtype = None
    if qtype is None or qtype not in supported_types():
        raise SmallfourError(f"{where}: unknown or unsupported type {text!r}; "
                             f"types: {', '.join(t.name for t in supported_types())}")
    return qtype


@functools.lru_cache(maxsize=256)
def layer_ranges(spec: str) -> tuple[tuple[str, float, float, bool], ...]:
    """"0-3, 7, first:2, last:12%" → ranges kept as ranges: ("span", lo, hi, False) or ("first"/"last", N, 0, is %).

    A range is never expanded into its members, so "0-30000000" costs what "0-3" costs.
    """
    items = []
    for item in str(spec).split(","):
        item = item.strip().replace(" ", "")
        if not item:
            continue
        m = re.fullmatch(r"(first|last):(\d+(?:\.\d+)?)(%?)", item)
        if m:
            items.append((m.group(1), float(m.group(2)), 0.0, bool(m.group(3))))
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise SmallfourError(f"recipe layers {spec!r}: cannot read {item!r} "
                                 "(write e.g. \"0-3, 7, first:2, last:10%\")")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise SmallfourError(f"recipe layers {spec!r}: {item!r} ends before it starts")
        items.append(("span", float(lo), float(hi), False))
    return tuple(items)


def in_layers(spec: str, layer: int, n_layers: int) -> bool:
    """Whether `layer` (of a model with n_layers layers) is one of the layers `spec` names."""
    for kind, a, b, percent in layer_ranges(spec):
        if kind == "span":
            if a <= layer <= b:
                return True
            continue
        count = int(np.ceil(a * n_layers / 100)) if percent else int(a)
        count = min(max(count, 1 if percent else count), n_layers)
        if (kind == "first" and layer < count) or (kind == "last" and layer >= n_layers - count):
            return True
    return False


@dataclass(frozen=True)
class Rule:
    qtype: GGMLQuantizationType
    role: str | None = None
    tensor: str | None = None
    layers: str | None = None
    pattern: str | None = None

    def matches(self, name: str, role: str, layer: int | None, n_layers: int) -> bool:
        if self.role is not None and role != self.role:
            return False
        if self.tensor is not None and base_name(name) != self.tensor:
            return False
        if self.layers is not None and (layer is None or not in_layers(self.layers, layer, n_layers)):
            return False
        return self.pattern is None or re.search(self.pattern, name) is not None


@dataclass(frozen=True)
class Recipe:
    name: str
    default: GGMLQuantizationType
    roles: tuple[tuple[str, GGMLQuantizationType], ...] = ()
    rules: tuple[Rule, ...] = ()
    description: str = ""
    # Per-tensor types fixed in advance (fit:<size> decides these); they win over everything.
    fixed: tuple[tuple[str, GGMLQuantizationType], ...] = ()

    def target(self, name: str, role: str, layer: int | None, n_layers: int) -> GGMLQuantizationType:
        """The type asked for, before the F32 roles and block-size fallbacks apply."""
        fixed = dict(self.fixed)
        if name in fixed:
            return fixed[name]
        for rule in self.rules:
            if rule.matches(name, role, layer, n_layers):
                return rule.qtype
        return dict(self.roles).get(role, self.default)

    def choose(self, name: str, role: str, layer: int | None, shape: tuple[int, ...], n_layers: int) -> TypeChoice:
        if len(shape) == 1 or role in F32_ROLES:
            return TypeChoice(GGMLQuantizationType.F32)
        return compatible(self.target(name, role, layer, n_layers), shape)

    def types_used(self) -> set[GGMLQuantizationType]:
        return {self.default, *(t for _, t in self.roles), *(r.qtype for r in self.rules), *(t for _, t in self.fixed)}


def compatible(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> TypeChoice:
    """`qtype` if the rows split into its blocks, else llama.cpp's fallback, else F16."""
    row = shape[-1]
    if row % GGML_QUANT_SIZES[qtype][0] == 0:
        return TypeChoice(qtype)
    fallback = FALLBACK.get(qtype)
    if fallback is not None and row % GGML_QUANT_SIZES[fallback][0] == 0:
        return TypeChoice(fallback, fallback_from=qtype)
    return TypeChoice(GGMLQuantizationType.F16, fallback_from=qtype)


def single_type_recipe(qtype: GGMLQuantizationType, name: str | None = None) -> Recipe:
    return Recipe(name or qtype.name.lower(), qtype, description=f"every matrix {qtype.name}")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_recipe(spec: str) -> Recipe:
    """A recipe from a built-in name (f32, f16, bf16, q8_0, any GGML type), a preset name or a TOML file."""
    text = str(spec).strip()
    if text.lower() in BUILTIN_RECIPES:
        return single_type_recipe(BUILTIN_RECIPES[text.lower()])
    path = Path(text)
    if text.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise SmallfourError(f"recipe file {path} does not exist")
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SmallfourError(f"recipe file {path} is not UTF-8 text") from None
        except OSError as exc:
            raise SmallfourError(f"cannot read recipe file {path}: {exc.strerror or exc}") from None
        return parse_recipe(source, path.stem, str(path))
    preset = PRESET_DIR / f"{text.lower()}.toml"
    if preset.is_file():
        return parse_recipe(preset.read_text(encoding="utf-8"), preset.stem, f"preset {preset.stem}")
    try:
        qtype = GGMLQuantizationType[text.upper()]
    except KeyError:
        qtype = None
    if qtype is not None:
        return single_type_recipe(parse_type(text))
    raise SmallfourError(f"unknown recipe {text!r}; choose f32, f16, bf16, q8_0, a GGML type (e.g. q4_k), "
                         f"a preset ({', '.join(preset_names())}), fit:SIZE or a .toml file")


# The recipe schema: per table, each key and the types its value may have.
RECIPE_KEYS: dict[str, tuple[type, ...]] = {"name": (str,), "description": (str,), "default": (str,)}
RULE_KEYS: dict[str, tuple[type, ...]] = {"type": (str,), "role": (str,), "tensor": (str,), "layers": (str, int),
                                          "pattern": (str,)}
TYPE_NAMES = {str: "a string", int: "an integer", dict: "a table", list: "an array"}


def _check_table(value, keys: dict[str, tuple[type, ...]], where: str, section: str, noun: str = "key") -> dict:
    """`value` if it is a table holding only `keys`, each of an allowed type; a one-line error naming the key else."""
    if not isinstance(value, dict):
        raise SmallfourError(f"{where}: {section} must be a table, not {_kind(value)}")
    for key, item in value.items():
        if key not in keys:
            raise SmallfourError(f"{where}: unknown {noun} {key!r} in {section}; {noun}s: {', '.join(keys)}")
        if not isinstance(item, keys[key]) or isinstance(item, bool):
            wanted = " or ".join(TYPE_NAMES[t] for t in keys[key])
            raise SmallfourError(f"{where}: {section} {key} must be {wanted}, not {_kind(item)}")
    return value


def _kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return next((name for t, name in TYPE_NAMES.items() if isinstance(value, t)), type(value).__name__)


def parse_recipe(source: str, default_name: str, where: str) -> Recipe:
    try:
        data = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        raise SmallfourError(f"{where}: not valid TOML: {exc}") from None
    unknown = set(data) - {"recipe", "roles", "rules"}
    if unknown:
        raise SmallfourError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}; "
                             "expected [recipe], [roles], [[rules]]")
    head = _check_table(data.get("recipe", {}), RECIPE_KEYS, where, "[recipe]")
    if "default" not in head:
        raise SmallfourError(f"{where}: [recipe] needs a default type (e.g. default = \"Q4_K\")")
    roles = []
    for role, qtype in _check_table(data.get("roles", {}), dict.fromkeys(QUANTIZED_ROLES, (str,)), where,
                                    "[roles]", "role").items():
        roles.append((role, parse_type(qtype, f"{where} [roles] {role}")))
    rules = []
    if not isinstance(data.get("rules", []), list):
        raise SmallfourError(f"{where}: rules must be an array of tables ([[rules]]), not {_kind(data['rules'])}")
    for i, rule in enumerate(data.get("rules", [])):
        rule = _check_table(rule, RULE_KEYS, where, f"rule {i + 1}")
        if "type" not in rule:
            raise SmallfourError(f"{where}: rule {i + 1} needs a type")
        if rule.get("role") is not None and rule["role"] not in QUANTIZED_ROLES:
            raise SmallfourError(f"{where}: rule {i + 1}: unknown role {rule['role']!r}")
        if rule.get("pattern") is not None:
            try:
                re.compile(rule["pattern"])
            except re.error as exc:
                raise SmallfourError(f"{where}: rule {i + 1}: bad pattern {rule['pattern']!r}: {exc}") from None
        if rule.get("layers") is not None:
            layer_ranges(str(rule["layers"]))  # syntax check
        rules.append(Rule(parse_type(rule["type"], f"{where} rule {i + 1}"), rule.get("role"), rule.get("tensor"),
                          None if rule.get("layers") is None else str(rule["layers"]), rule.get("pattern")))
    return Recipe(head.get("name", default_name), parse_type(head["default"], f"{where} default"),
                  tuple(roles), tuple(rules), head.get("description", ""))
