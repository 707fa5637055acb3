"""The `transformers` reference network for a fixture checkpoint.

FP8 weights are dequantized here with torch's own float8 type and the stored
scales, independently of the converter's numpy decoding, and the result is
loaded through `from_pretrained` so that on-disk names are checked as well.
"""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Mistral3ForConditionalGeneration


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, block: list[int] | None) -> torch.Tensor:
    values = weight.to(torch.float32)
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        return values * scale.reshape(())
    if values.dim() == 3 and scale.numel() == values.shape[0]:
        return values * scale.reshape(-1, 1, 1)
    assert block is not None, "block scales without weight_block_size"
    expanded = scale.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return values * expanded[..., : values.shape[-2], : values.shape[-1]]


def dequantized_copy(checkpoint: Path, target: Path) -> Path:
    """An unquantized float32 copy of an HF-layout FP8 checkpoint."""
    config = json.loads((checkpoint / "config.json").read_text())
    block = (config.pop("quantization_config") or {}).get("weight_block_size")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(checkpoint.glob("model-*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    plain = {}
    for name, value in tensors.items():
        if name.endswith(("_scale_inv", "activation_scale")):
            continue
        if value.dtype == torch.float8_e4m3fn:
            value = _dequantize(value, tensors[name + "_scale_inv"], block)
        plain[name] = value.to(torch.float32).contiguous()
    target.mkdir(parents=True, exist_ok=True)
    save_file(plain, target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config))
    return target


@lru_cache(maxsize=4)
def reference_model(checkpoint: Path, scratch: Path) -> Mistral3ForConditionalGeneration:
    config = json.loads((checkpoint / "config.json").read_text())
    source = checkpoint
    if config.get("quantization_config"):
        source = dequantized_copy(checkpoint, scratch / f"{checkpoint.name}-dequantized")
    model, info = Mistral3ForConditionalGeneration.from_pretrained(source, dtype=torch.float32,
                                                                   output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    assert not problems, f"transformers did not load the fixture cleanly: {problems}"
    if source is not checkpoint:
        shutil.rmtree(source)
    return model.eval()


def reference_logits(model: Mistral3ForConditionalGeneration, tokens: list[int]):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].numpy()


def routing_margins(model: Mistral3ForConditionalGeneration, tokens: list[int]):
    """Per position, the smallest gap over the MoE layers between the k-th and the (k+1)-th router score
    (softmax probabilities, what the router ranks): where it is tiny, rounding alone can pick another expert."""
    from transformers.models.mistral4.modeling_mistral4 import Mistral4TopkRouter

    gaps = []

    def record(router, _inputs, outputs):
        top = outputs[0].softmax(-1).topk(router.top_k + 1, dim=-1).values
        gaps.append((top[:, -2] - top[:, -1]).numpy())

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, Mistral4TopkRouter)]
    try:
        reference_logits(model, tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return np.min(gaps, axis=0)
