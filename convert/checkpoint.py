"""Checkpoint directories in the two layouts Mistral publishes, read lazily.

`open_checkpoint` finds the layout, checks that every shard the index lists is
there, and gives access to tensors by their source name, dequantizing FP8 to
float32 with the scales stored beside them. Nothing is read until asked for,
and stacked expert tensors can be read one expert at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from convert.config import TextConfig, from_hf_config, from_native_params
from convert.errors import ConversionError
from convert.safetensors import SafetensorsFile

Layout = Literal["hf", "native"]

# Tensors a checkpoint may hold that no GGUF tensor is made of: the FP8 releases' static
# activation scales (HF `…activation_scale`, Mistral `….qscale_act`) serve FP8 matmuls in
# vLLM and the like; weights are dequantized with the weight scales alone, and llama.cpp
# has no use for them.
IGNORED_SUFFIXES = ("activation_scale", ".qscale_act")


@dataclass
class Checkpoint:
    path: Path
    layout: Layout
    config: TextConfig
    raw_config: dict
    files: dict[str, SafetensorsFile]
    tensor_file: dict[str, str] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.tensor_file

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1].entries[name].shape

    def nbytes(self, name: str) -> int:
        entry = self._entry(name)[1].entries[name]
        return entry.end - entry.begin

    def is_fp8(self, name: str) -> bool:
        return self._entry(name)[1].entries[name].dtype == "F8_E4M3"

    def read(self, name: str, index: int | None = None, rows: slice | None = None) -> np.ndarray:
        """Tensor `name`, its expert `[index]` or its `rows`, as float32 with FP8 dequantized.

        Row slices are for unquantized tensors (FP8 scales are laid out per block of rows).
        """
        _, file = self._entry(name)
        if index is not None:
            values = file.read(name, slice(index, index + 1))[0]
        else:
            values = file.read(name, rows)
        scale_name = self.scale_name(name)
        if scale_name is not None:
            if rows is not None:
                raise ConversionError(f"internal error: row slice of FP8 tensor {name!r}")
            values = self._dequantize(name, values, scale_name, index)
        if not np.isfinite(values).all():
            where = name if index is None else f"{name}[{index}]"
            raise ConversionError(f"tensor {where} contains NaN or Inf values: the checkpoint is damaged")
        return values

    def check_consumed(self, consumed: set[str], ignored: Callable[[str], bool] = lambda name: False) -> None:
        """Refuse a checkpoint holding tensors that no planned tensor reads: it contradicts its own config.

        `consumed` are the source tensors the plan reads (FP8 weight scales are added here);
        besides `ignored` (what the caller chose not to convert), only the `IGNORED_SUFFIXES`
        may be left over.
        """
        used = consumed | {scale for name in consumed if (scale := self.scale_name(name)) is not None}
        unused = [name for name in self.tensor_file
                  if name not in used and not name.endswith(IGNORED_SUFFIXES) and not ignored(name)]
        if unused:
            raise ConversionError(
                f"checkpoint holds {len(unused)} tensors its config does not account for "
                f"({', '.join(sorted(unused)[:3])}{', …' if len(unused) > 3 else ''}): "
                "the config and the weights disagree (a mismatched config.json/params.json or a mixed checkpoint)"
            )

    def close(self) -> None:
        for file in self.files.values():
            file.close()

    def _entry(self, name: str) -> tuple[str, SafetensorsFile]:
        try:
            file_name = self.tensor_file[name]
        except KeyError:
            raise ConversionError(f"checkpoint has no tensor {name!r} (partial or mismatched checkpoint)") from None
        return file_name, self.files[file_name]

    def scale_name(self, name: str) -> str | None:
        """The scale tensor an FP8 tensor is dequantized with (None for a tensor that is not FP8)."""
        if not self.is_fp8(name):
            return None
        if self.layout == "native":
            candidates = [name.removesuffix(".weight") + ".qscale_weight"]
        else:
            candidates = [name + "_scale_inv", name + "_scale"]
        for candidate in candidates:
            if candidate in self.tensor_file:
                return candidate
        raise ConversionError(f"FP8 tensor {name!r} has no scale tensor beside it ({candidates[0]})")

    def _dequantize(self, name: str, values: np.ndarray, scale_name: str, index: int | None) -> np.ndarray:
        scale = self.read(scale_name)
        full_shape = self.shape(name)
        stacked = len(full_shape) == 3
        if scale.size == 1:
            return values * scale.reshape(())
        if stacked and scale.size == full_shape[0]:
            per_expert = scale.reshape(-1)
            return values * (per_expert[index] if index is not None else per_expert.reshape(-1, 1, 1))
        block = self.config.fp8_block_size
        if block is None:
            raise ConversionError(
                f"FP8 tensor {name!r} has block scales {scale.shape} but the config gives no weight_block_size"
            )
        if stacked and index is not None:
            scale = scale[index]
        for axis, size in zip(range(scale.ndim - 2, scale.ndim), block):
            scale = np.repeat(scale, size, axis=axis)
        scale = scale[tuple(slice(0, n) for n in values.shape)]
        if scale.shape != values.shape:
            raise ConversionError(f"FP8 block scales of {name!r} {scale.shape} do not cover its shape {values.shape}")
        return values * scale


def open_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path} is not a checkpoint directory")
    if (path / "config.json").is_file():
        raw = _read_json(path / "config.json")
        config, layout = from_hf_config(raw), "hf"
        shard_names = _shards(path, "model.safetensors.index.json", "model*.safetensors")
    elif (path / "params.json").is_file():
        raw = _read_json(path / "params.json")
        config, layout = from_native_params(raw), "native"
        shard_names = _shards(path, "consolidated.safetensors.index.json", "consolidated*.safetensors")
    else:
        raise ConversionError(f"{path} has neither config.json (Hugging Face layout) nor params.json (Mistral layout)")
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        if not shard_names:
            raise ConversionError(f"{path} holds only pickle weights (.bin/.pt): refused, use the safetensors release")
    files = {name: SafetensorsFile(path / name) for name in shard_names}
    tensor_file = {tensor: name for name, file in files.items() for tensor in file.keys()}
    return Checkpoint(path, layout, config, raw, files, tensor_file)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"cannot read {path.name}: {exc}") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path.name} is not a JSON object")
    return value


def _shards(path: Path, index_name: str, pattern: str) -> list[str]:
    """Shard file names; with an index, every listed shard must exist."""
    index_path = path / index_name
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index_name} has no weight_map")
        listed = sorted(set(weight_map.values()))
        missing = [name for name in listed if not (path / name).is_file()]
        if missing:
            raise ConversionError(
                f"checkpoint is missing {len(missing)} of {len(listed)} shards listed in {index_name}: "
                + ", ".join(missing[:3]) + (" …" if len(missing) > 3 else "")
            )
        return listed
    shards = sorted(p.name for p in path.glob(pattern))
    if not shards:
        raise ConversionError(f"{path} has no {pattern} weight files")
    return shards
