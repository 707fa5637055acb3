"""The vision half of a checkpoint → an mmproj GGUF for llama.cpp's libmtmd (pixtral projector).

Mistral Small 4 carries a Pixtral encoder, a 2×2 patch merger and a two-layer projector
beside the text model. libmtmd loads them from a separate `clip` GGUF whose names, shapes
and keys are those llama.cpp's own converter writes (`conversion/llava.py` for the HF
layout, `conversion/pixtral.py` for the Mistral layout); the tables below give the same
result from either layout, and the tests compare our file with that converter's.

One thing is not a vision weight: libmtmd inserts `[IMG_BREAK]` between rows of image
tokens as an embedding it reads from the mmproj (`v.token_embd.img_break`), so one row of
the *text* embedding table is copied in too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from convert.checkpoint import Checkpoint
from convert.errors import ConversionError
from convert.output import atomic_output, check_output_path

# --mmproj-type → (type for the big matrices, file type).
MMPROJ_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
DEFAULT_MMPROJ_TYPE = "f16"

# mistral-common hard-codes these; llama.cpp falls back to them for the Mistral layout.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Pixtral's RMSNorms use 1e-5 hard-coded in transformers and mistral-inference alike.
PIXTRAL_NORM_EPS = 1e-5

# Per-layer names: GGUF leaf → (HF leaf, Mistral leaf).
LAYER_NAMES = {
    "ln1": ("attention_norm", "attention_norm"),
    "attn_q": ("attention.q_proj", "attention.wq"),
    "attn_k": ("attention.k_proj", "attention.wk"),
    "attn_v": ("attention.v_proj", "attention.wv"),
    "attn_out": ("attention.o_proj", "attention.wo"),
    "ln2": ("ffn_norm", "ffn_norm"),
    "ffn_gate": ("feed_forward.gate_proj", "feed_forward.w1"),
    "ffn_up": ("feed_forward.up_proj", "feed_forward.w3"),
    "ffn_down": ("feed_forward.down_proj", "feed_forward.w2"),
}
# Whole-model names: GGUF base → (HF name after the prefix, Mistral name).
GLOBAL_NAMES = {
    "v.patch_embd": ("vision_tower.patch_conv", "vision_encoder.patch_conv"),
    "v.pre_ln": ("vision_tower.ln_pre", "vision_encoder.ln_pre"),
    "mm.input_norm": ("multi_modal_projector.norm", "pre_mm_projector_norm"),
    "mm.patch_merger": ("multi_modal_projector.patch_merger.merging_layer", "patch_merger.merging_layer"),
    "mm.1": ("multi_modal_projector.linear_1", "vision_language_adapter.w_in"),
    "mm.2": ("multi_modal_projector.linear_2", "vision_language_adapter.w_out"),
}
# transformers 4 writes `vision_tower.*` on disk, transformers 5 in memory `model.vision_tower.*`.
HF_VISION_PREFIXES = ("", "model.")
HF_EMBEDDINGS = ("language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                 "model.embed_tokens.weight")
NATIVE_EMBEDDINGS = ("tok_embeddings.weight",)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    image_size: int
    patch_size: int
    rope_theta: float
    spatial_merge_size: int
    hidden_act: str
    projection_dim: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    img_break_id: int


@dataclass(frozen=True)
class MmprojTensor:
    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    read: Callable[[], np.ndarray]
    source: str  # the checkpoint tensor it is read from


@dataclass
class MmprojReport:
    output: Path
    tensors: int
    output_bytes: int


def mmproj_path(output: Path) -> Path:
    """Where the projector of model `output` goes by default: `OUT-mmproj.gguf` beside it."""
    output = Path(output)
    return output.with_name(output.stem + "-mmproj.gguf")


def is_vision_tensor(name: str) -> bool:
    """Whether a checkpoint tensor belongs to the vision tower or projector (either layout)."""
    roots = {source.split(".")[0] + "." for sources in GLOBAL_NAMES.values() for source in sources}
    return any(name.startswith(prefix + root) for prefix in HF_VISION_PREFIXES for root in roots)


def has_vision(ckpt: Checkpoint) -> bool:
    if ckpt.layout == "hf":
        return isinstance(ckpt.raw_config.get("vision_config"), dict)
    return isinstance(ckpt.raw_config.get("vision_encoder"), dict)


def vision_config(ckpt: Checkpoint) -> VisionConfig:
    raw = ckpt.raw_config
    if ckpt.layout == "hf":
        vision = raw.get("vision_config")
        if not isinstance(vision, dict):
            raise ConversionError("config.json has no vision_config: this checkpoint has no vision tower "
                                  "(use --no-mmproj)")
        text = raw.get("text_config") or raw
        rope = vision.get("rope_parameters") or {}
        mean, std = _preprocessor_stats(ckpt.path)
        merge = raw.get("spatial_merge_size", 1)
        img_break = _hf_token_id(ckpt.path, "[IMG_BREAK]")
    else:
        vision = raw.get("vision_encoder")
        if not isinstance(vision, dict):
            raise ConversionError("params.json has no vision_encoder: this checkpoint has no vision tower "
                                  "(use --no-mmproj)")
        text, rope = raw, {}
        mean, std = CLIP_MEAN, CLIP_STD
        # Without "patch_merge" llama.cpp's reference converter drops the merge too.
        merge = vision.get("spatial_merge_size", 1) if vision.get("mm_projector_id") == "patch_merge" else 1
        img_break = int(vision.get("image_break_token_id", -1))
        if img_break < 0:
            img_break = _tekken_token_id(ckpt.path, "[IMG_BREAK]")
    try:
        return VisionConfig(
            hidden_size=int(vision["hidden_size"]), intermediate_size=int(vision["intermediate_size"]),
            n_layers=int(vision["num_hidden_layers"]), n_heads=int(vision["num_attention_heads"]),
            image_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]),
            rope_theta=float(vision.get("rope_theta", rope.get("rope_theta", 10000.0))),
            spatial_merge_size=int(merge), hidden_act=str(vision.get("hidden_act", "silu")),
            projection_dim=int(text.get("hidden_size", text.get("dim", ckpt.config.hidden_size))),
            image_mean=tuple(float(x) for x in mean), image_std=tuple(float(x) for x in std),
            img_break_id=img_break,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(f"vision config is incomplete or malformed: {exc}") from None


def plan_mmproj(ckpt: Checkpoint, cfg: VisionConfig, matrix_type: GGMLQuantizationType) -> list[MmprojTensor]:
    """Every mmproj tensor with its shape and type; nothing read yet."""
    column = 0 if ckpt.layout == "hf" else 1
    prefix = ""
    if ckpt.layout == "hf":
        found = [p for p in HF_VISION_PREFIXES if p + "vision_tower.ln_pre.weight" in ckpt]
        if not found:
            raise ConversionError("checkpoint has no vision tower tensors (vision_tower.*): use --no-mmproj")
        prefix = found[0]
    sources: list[tuple[str, str]] = []
    for base, names in GLOBAL_NAMES.items():
        sources.append((base, (prefix if ckpt.layout == "hf" else "") + names[column]))
    layer_root = prefix + "vision_tower.transformer.layers." if ckpt.layout == "hf" \
        else "vision_encoder.transformer.layers."
    for i in range(cfg.n_layers):
        for leaf, names in LAYER_NAMES.items():
            sources.append((f"v.blk.{i}.{leaf}", f"{layer_root}{i}.{names[column]}"))
    planned: list[MmprojTensor] = []
    for base, source in sources:
        for suffix in (".weight", ".bias"):
            name = source + suffix
            if name not in ckpt:
                if suffix == ".weight":
                    raise ConversionError(f"checkpoint has no vision tensor {name!r} (partial checkpoint?)")
                continue
            shape = tuple(ckpt.shape(name))
            permute = ckpt.layout == "hf" and base.endswith((".attn_q", ".attn_k"))
            planned.append(MmprojTensor(base + suffix, shape, _tensor_type(base + suffix, shape, matrix_type),
                                        _reader(ckpt, name, cfg.n_heads if permute else None), name))
    planned.append(_img_break(ckpt, cfg))
    return planned


@dataclass(frozen=True)
class MmprojPlan:
    """What a projector GGUF will hold, decided (and checked) before anything is written."""

    name: str
    cfg: VisionConfig
    file_type: LlamaFileType
    tensors: list[MmprojTensor]


def plan_projector(ckpt: Checkpoint, mmproj_type: str = DEFAULT_MMPROJ_TYPE) -> MmprojPlan:
    """Check the type, the vision config and the tensors a projector needs; nothing is written."""
    try:
        matrix_type, file_type = MMPROJ_TYPES[mmproj_type.lower()]
    except KeyError:
        raise ConversionError(f"unknown mmproj type {mmproj_type!r}; choose one of {', '.join(MMPROJ_TYPES)}") \
            from None
    cfg = vision_config(ckpt)
    return MmprojPlan(ckpt.path.name, cfg, file_type, plan_mmproj(ckpt, cfg, matrix_type))


def write_projector(plan: MmprojPlan, path: Path) -> int:
    """Write a planned projector to `path` (the caller's temporary name); the bytes of tensor data written."""
    return _write(path, plan.name, plan.cfg, plan.file_type, plan.tensors)


def convert_mmproj(ckpt: Checkpoint, output: Path, mmproj_type: str = DEFAULT_MMPROJ_TYPE, *,
                   force: bool = False) -> MmprojReport:
    """Write the mmproj GGUF of an open checkpoint to `output` alone (temporary name, then renamed)."""
    output = Path(output)
    check_output_path(output, force)
    plan = plan_projector(ckpt, mmproj_type)
    with atomic_output(output) as temporary:
        written = write_projector(plan, temporary)
    return MmprojReport(output, len(plan.tensors), written)


def _tensor_type(name: str, shape: tuple[int, ...], matrix_type: GGMLQuantizationType) -> GGMLQuantizationType:
    """The reference converter's choices: 1-D in F32; patch embedding and merger never quantized."""
    if len(shape) == 1:
        return GGMLQuantizationType.F32
    if ".patch_embd." in name or ".patch_merger." in name:
        return GGMLQuantizationType.F16 if matrix_type == GGMLQuantizationType.F16 else GGMLQuantizationType.F32
    if matrix_type == GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[matrix_type][0]:
        return GGMLQuantizationType.F16
    return matrix_type


def _rope_rows_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half q/k rows → the interleaved pairs libmtmd's 2D RoPE expects (as llama.cpp permutes)."""
    return np.ascontiguousarray(w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
                                .swapaxes(1, 2).reshape(w.shape))


def _reader(ckpt: Checkpoint, name: str, permute_heads: int | None) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        value = ckpt.read(name)
        return _rope_rows_interleaved(value, permute_heads) if permute_heads else value
    return read


def _img_break(ckpt: Checkpoint, cfg: VisionConfig) -> MmprojTensor:
    names = HF_EMBEDDINGS if ckpt.layout == "hf" else NATIVE_EMBEDDINGS
    found = [n for n in names if n in ckpt]
    if not found:
        raise ConversionError("checkpoint has no text embedding table: the [IMG_BREAK] embedding cannot be copied")
    name = found[0]
    rows, width = ckpt.shape(name)
    if not 0 <= cfg.img_break_id < rows:
        raise ConversionError(f"[IMG_BREAK] token id {cfg.img_break_id} is outside the vocabulary ({rows})")

    def read() -> np.ndarray:
        if ckpt.is_fp8(name):  # FP8 scales are per block of rows: dequantize all, keep one
            return ckpt.read(name)[cfg.img_break_id]
        return ckpt.read(name, rows=slice(cfg.img_break_id, cfg.img_break_id + 1))[0]

    return MmprojTensor("v.token_embd.img_break", (width,), GGMLQuantizationType.F32, read, name)


def _encode(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == GGMLQuantizationType.F32:
        return values
    if qtype == GGMLQuantizationType.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, qtype)


def _stored_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def _write(path: Path, name: str, cfg: VisionConfig, file_type: LlamaFileType, planned: list[MmprojTensor]) -> int:
    writer = gguf.GGUFWriter(path, "clip")
    _add_metadata(writer, name, cfg, file_type)
    for tensor in planned:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32),
                               _stored_nbytes(tensor.shape, tensor.qtype), raw_dtype=tensor.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    out = writer.fout[0]
    total = 0
    for tensor in planned:
        out.write(b"\0" * (-out.tell() % writer.data_alignment))
        value = tensor.read()
        if tuple(value.shape) != tensor.shape:
            raise ConversionError(f"internal error: {tensor.name} read as {value.shape}, planned {tensor.shape}")
        data = _encode(value, tensor.qtype)
        out.write(data.data)
        total += data.nbytes
    out.write(b"\0" * (-out.tell() % writer.data_alignment))
    out.flush()
    os.fsync(out.fileno())
    writer.close()
    return total


def _add_metadata(writer: gguf.GGUFWriter, name: str, cfg: VisionConfig, file_type: LlamaFileType) -> None:
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(cfg.projection_dim)
    writer.add_vision_image_size(cfg.image_size)
    writer.add_vision_patch_size(cfg.patch_size)
    writer.add_vision_embedding_length(cfg.hidden_size)
    writer.add_vision_feed_forward_length(cfg.intermediate_size)
    writer.add_vision_block_count(cfg.n_layers)
    writer.add_vision_head_count(cfg.n_heads)
    writer.add_vision_image_mean(list(cfg.image_mean))
    writer.add_vision_image_std(list(cfg.image_std))
    writer.add_clip_projector_type(gguf.VisionProjectorType.PIXTRAL)
    writer.add_vision_attention_layernorm_eps(PIXTRAL_NORM_EPS)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.hidden_act == "silu":
        writer.add_vision_use_silu(True)
    elif cfg.hidden_act == "gelu":
        writer.add_vision_use_gelu(True)
    else:
        raise ConversionError(f"vision hidden_act {cfg.hidden_act!r} is not supported by llama.cpp's pixtral")
    if cfg.spatial_merge_size > 1:
        writer.add_vision_spatial_merge_size(cfg.spatial_merge_size)


def _preprocessor_stats(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return CLIP_MEAN, CLIP_STD
    try:
        data = json.loads(file.read_text())
        return tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read preprocessor_config.json: {exc}") from None


def _hf_token_id(path: Path, token: str) -> int:
    for file, key in (("tokenizer_config.json", "added_tokens_decoder"), ("tokenizer.json", "added_tokens")):
        try:
            data = json.loads((path / file).read_text())
        except (OSError, ValueError):
            continue
        entries = data.get(key) or {}
        if isinstance(entries, dict):
            for id_, entry in entries.items():
                if isinstance(entry, dict) and entry.get("content") == token:
                    return int(id_)
        else:
            for entry in entries:
                if isinstance(entry, dict) and entry.get("content") == token:
                    return int(entry["id"])
    return _tekken_token_id(path, token)


def _tekken_token_id(path: Path, token: str) -> int:
    try:
        data = json.loads((path / "tekken.json").read_text())
    except (OSError, ValueError):
        raise ConversionError(f"cannot find the {token} token id (no tokenizer file names it)") from None
    for entry in data.get("special_tokens", []):
        if entry.get("token_str") == token:
            return int(entry["rank"])
    raise ConversionError(f"the tokenizer has no {token} token")
