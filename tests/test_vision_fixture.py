"""The vision fixture against transformers, llama.cpp's tensor table and a Mistral-style forward.

Reference points, none of them ours:
* transformers 5 ``Mistral3ForConditionalGeneration``: the names ``save_pretrained`` writes,
  ``from_pretrained`` loading our file, and its own native->HF rules (``mistral_large4``).
* gguf-py's ``TensorNameMap`` for ``MODEL_ARCH.MMPROJ`` plus the renames in llama.cpp's
  ``conversion/pixtral.py`` (native) and ``conversion/llava.py`` (HF, with its q/k permute).
* A forward written the way Mistral's own code does it (complex, interleaved 2D RoPE on the
  native weights), compared with transformers' forward on the HF weights.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from mistral_common.tokens.tokenizers.multimodal import DATASET_MEAN, DATASET_STD
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import AutoConfig, AutoImageProcessor, Mistral3ForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import PermuteForRope

from smallfour.fixtures.vision import (
    VisionSpec,
    hf_top_level_config,
    hf_vision_config,
    native_vision_params,
    preprocessor_config,
    vision_tensors,
)

REPO = Path(__file__).resolve().parents[1]
SEED = 20260317
SPEC = VisionSpec(text_hidden_size=128)

# Tiny mistral4 text model; vocab shrunk from 131072 for speed (image token 10 still fits).
TEXT_CONFIG: dict[str, Any] = {
    "model_type": "mistral4",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 64,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 64,
    "intermediate_size": 128,
    "vocab_size": 1024,
    "tie_word_embeddings": False,
}

# Two images of different sizes in one padded batch: exercises per-image RoPE grids, the
# block-diagonal attention and the per-image patch merge. Non-square so h/w mix-ups show.
IMAGE_SIZES = [(56, 84), (28, 56)]


def _config_json(spec: VisionSpec) -> dict[str, Any]:
    return {**hf_top_level_config(spec), "text_config": TEXT_CONFIG, "vision_config": hf_vision_config(spec)}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _is_vision_key(name: str) -> bool:
    return not name.startswith("language_model.")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random transformers model built from our config.json, saved with save_pretrained."""
    src = tmp_path_factory.mktemp("ref_config")
    (src / "config.json").write_text(json.dumps(_config_json(SPEC)))
    config = AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(config)
    saved = tmp_path_factory.mktemp("ref_saved")
    model.save_pretrained(saved)
    return {
        "memory_keys": set(model.state_dict()),
        "disk": _read_safetensors(saved / "model.safetensors"),
        "config_json": json.loads((saved / "config.json").read_text()),
    }


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, reference: dict[str, Any]) -> dict[str, Any]:
    """Our HF vision tensors (plus the reference's text tensors) loaded with from_pretrained."""
    ckpt = tmp_path_factory.mktemp("hf_fixture")
    vision = vision_tensors(SPEC, np.random.default_rng(SEED), "hf")
    text = {k: v for k, v in reference["disk"].items() if not _is_vision_key(k)}
    save_file({**text, **vision}, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    (ckpt / "config.json").write_text(json.dumps(_config_json(SPEC)))
    model, info = Mistral3ForConditionalGeneration.from_pretrained(
        ckpt, output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    return {"model": model, "info": info, "vision": vision}


def test_hf_names_and_shapes_equal_what_transformers_writes(reference: dict[str, Any]) -> None:
    ours = {k: v.shape for k, v in vision_tensors(SPEC, np.random.default_rng(SEED), "hf").items()}
    on_disk = {k: v.shape for k, v in reference["disk"].items() if _is_vision_key(k)}
    assert ours == on_disk
    # On disk transformers 5 keeps the 4.x prefixes; in memory they sit under "model.".
    assert all(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in ours)
    text_on_disk = {k for k in reference["disk"] if not _is_vision_key(k)}
    assert "language_model.lm_head.weight" in text_on_disk
    assert all(k.startswith("language_model.model.") for k in text_on_disk - {"language_model.lm_head.weight"})
    in_memory = {k for k in reference["memory_keys"]
                 if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}
    assert in_memory == {"model." + k for k in ours}


def test_config_dicts_are_what_transformers_writes_back(reference: dict[str, Any]) -> None:
    written = reference["config_json"]
    assert written["vision_config"] == hf_vision_config(SPEC)
    for key, value in hf_top_level_config(SPEC).items():
        assert written[key] == value, key


def test_hf_checkpoint_loads_cleanly_and_weights_land(loaded: dict[str, Any]) -> None:
    info = loaded["info"]
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert not info["error_msgs"]
    state = loaded["model"].state_dict()
    for name, value in loaded["vision"].items():
        np.testing.assert_array_equal(state["model." + name].numpy(), value, err_msg=name)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _native_forward(
    tensors: dict[str, np.ndarray], spec: VisionSpec, pixels: torch.Tensor, sizes: list[tuple[int, int]],
    projector_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixtral + projector on native weights, the way vLLM / mistral-inference compute it."""
    w = {k: torch.from_numpy(v).double() for k, v in tensors.items()}
    ps, hd, nh, m = spec.patch_size, spec.head_dim, spec.num_attention_heads, spec.spatial_merge_size
    freqs = 1.0 / spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    embeds, angles, grids = [], [], []
    for image, (height, width) in zip(pixels, sizes, strict=True):
        h, wd = height // ps, width // ps
        conv = torch.nn.functional.conv2d(image[None, :, :height, :width], w["vision_encoder.patch_conv.weight"],
                                          stride=ps)[0]
        embeds.append(conv.flatten(1).T)
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(wd), indexing="ij")
        angles.append(torch.cat([rows.reshape(-1, 1) * freqs[::2], cols.reshape(-1, 1) * freqs[1::2]], dim=-1))
        grids.append((h, wd))
    lens = [h * wd for h, wd in grids]
    cis = torch.polar(torch.ones_like(torch.cat(angles)), torch.cat(angles))
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    same_image = seg[:, None] == seg[None, :]

    def rope(z: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(z.reshape(*z.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(pairs * cis[:, None, :]).reshape(z.shape)

    x = _rms(torch.cat(embeds), w["vision_encoder.ln_pre.weight"], 1e-5)
    for i in range(spec.num_hidden_layers):
        p = f"vision_encoder.transformer.layers.{i}."
        y = _rms(x, w[p + "attention_norm.weight"], 1e-5)
        q = rope((y @ w[p + "attention.wq.weight"].T).view(-1, nh, hd))
        k = rope((y @ w[p + "attention.wk.weight"].T).view(-1, nh, hd))
        v = (y @ w[p + "attention.wv.weight"].T).view(-1, nh, hd)
        scores = torch.einsum("qhd,khd->hqk", q, k) / hd**0.5
        probs = scores.masked_fill(~same_image, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", probs, v).reshape(-1, spec.hidden_size) @ w[p + "attention.wo.weight"].T
        y = _rms(x, w[p + "ffn_norm.weight"], 1e-5)
        gate, up = y @ w[p + "feed_forward.w1.weight"].T, y @ w[p + "feed_forward.w3.weight"].T
        gated = torch.nn.functional.silu(gate) * up
        x = x + gated @ w[p + "feed_forward.w2.weight"].T
    tower = x

    y = _rms(x, w["pre_mm_projector_norm.weight"], projector_eps)
    merged = []
    for chunk, (h, wd) in zip(y.split(lens), grids, strict=True):
        # feature index = channel * m*m + row_in_block * m + col_in_block (torch unfold order)
        blocks = chunk.view(h // m, m, wd // m, m, -1).permute(0, 2, 4, 1, 3)
        merged.append(blocks.reshape((h // m) * (wd // m), -1))
    z = torch.cat(merged) @ w["patch_merger.merging_layer.weight"].T
    z = torch.nn.functional.gelu(z @ w["vision_language_adapter.w_in.weight"].T)
    return tower, z @ w["vision_language_adapter.w_out.weight"].T


def test_native_weights_compute_what_transformers_computes_on_hf_weights(loaded: dict[str, Any]) -> None:
    model = copy.deepcopy(loaded["model"]).double()
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(len(IMAGE_SIZES), SPEC.num_channels, 56, 84, generator=gen, dtype=torch.float64)
    sizes = torch.tensor(IMAGE_SIZES)
    with torch.no_grad():
        hf_tower = model.model.vision_tower(pixels, image_sizes=sizes).last_hidden_state[0]
        hf_features = torch.cat(model.model.get_image_features(pixels, image_sizes=sizes).pooler_output)
    native = vision_tensors(SPEC, np.random.default_rng(SEED), "native")
    eps = model.config.text_config.rms_norm_eps  # transformers normalizes with the text model's eps
    tower, features = _native_forward(native, SPEC, pixels, IMAGE_SIZES, eps)
    merged_tokens = sum((h // 28) * (w // 28) for h, w in IMAGE_SIZES)
    assert features.shape == hf_features.shape == (merged_tokens, SPEC.text_hidden_size)
    tol = 1e-6  # transformers builds the RoPE angles in float32
    assert (tower - hf_tower).abs().max() < tol * hf_tower.abs().max()
    assert (features - hf_features).abs().max() < tol * hf_features.abs().max()

    # The comparison must see the q/k row order: native files holding HF-ordered rows differ.
    hf = loaded["vision"]
    unpermuted = dict(native)
    for i in range(SPEC.num_hidden_layers):
        for hf_name, nat_name in (("q_proj", "wq"), ("k_proj", "wk")):
            unpermuted[f"vision_encoder.transformer.layers.{i}.attention.{nat_name}.weight"] = \
                hf[f"vision_tower.transformer.layers.{i}.attention.{hf_name}.weight"]
    wrong_tower, _ = _native_forward(unpermuted, SPEC, pixels, IMAGE_SIZES, eps)
    assert (wrong_tower - hf_tower).abs().max() > 20 * tol * hf_tower.abs().max()


def _transformers_native_to_hf(name: str) -> str:
    """transformers' own Mistral-native -> HF renames (the mistral_large4 loader, same towers)."""
    for rule in get_checkpoint_conversion_mapping("mistral_large4"):
        for src, dst in zip(rule.source_patterns, rule.target_patterns, strict=True):
            name = re.sub(src, dst, name)
    return name


def test_layouts_hold_the_same_network_per_transformers_rules(loaded: dict[str, Any]) -> None:
    hf = vision_tensors(SPEC, np.random.default_rng(SEED), "hf")
    native = vision_tensors(SPEC, np.random.default_rng(SEED), "native")
    assert len(hf) == len(native)
    permute = PermuteForRope(subconfig_key="vision_config")
    config = loaded["model"].config
    for nat_name, value in native.items():
        hf_name = _transformers_native_to_hf(nat_name)
        assert hf_name.startswith("model."), nat_name
        expected = hf[hf_name.removeprefix("model.")]
        if re.search(r"attention\.w[qk]\.", nat_name):
            value = permute._permute_for_rope(torch.from_numpy(value), config).numpy()
        np.testing.assert_array_equal(value, expected, err_msg=nat_name)
    other = vision_tensors(SPEC, np.random.default_rng(SEED + 1), "hf")
    assert not any(np.array_equal(hf[k], other[k]) for k in hf)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """conversion/llama.py LlamaModel.permute, applied by conversion/llava.py to HF q/k."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_both_layouts_convert_to_the_same_gguf_mmproj() -> None:
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, SPEC.num_hidden_layers)
    suffixes = (".weight", ".bias")
    # conversion/pixtral.py PixtralModel.map_tensor_name: the adapter is renamed by hand.
    adapter = {"vision_language_adapter.w_in.": "mm.1.", "vision_language_adapter.w_out.": "mm.2."}

    def native_to_gguf(name: str) -> str | None:
        for prefix, target in adapter.items():
            if name.startswith(prefix):
                return target + name.removeprefix(prefix)
        return tmap.get_name(name, try_suffixes=suffixes)

    native = vision_tensors(SPEC, np.random.default_rng(SEED), "native")
    hf = vision_tensors(SPEC, np.random.default_rng(SEED), "hf")
    from_native = {native_to_gguf(k): v for k, v in native.items()}
    from_hf = {}
    for k, v in hf.items():
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            v = _llama_cpp_permute(v, SPEC.num_attention_heads)
        from_hf[tmap.get_name(k, try_suffixes=suffixes)] = v
    assert None not in from_native and len(from_native) == len(native)
    assert None not in from_hf and len(from_hf) == len(hf)
    assert from_native.keys() == from_hf.keys()
    for name in from_native:
        np.testing.assert_array_equal(from_native[name], from_hf[name], err_msg=name)

    # conversion/llava.py only treats these prefixes as vision tensors.
    llava_prefixes = ("multi_modal_projector.", "vision_tower.", "vision_encoder.",
                      "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm")
    assert all(k.startswith(llava_prefixes) for k in [*native, *hf])

    expected_native = {"vision_encoder.patch_conv.weight", "vision_encoder.ln_pre.weight",
                       "pre_mm_projector_norm.weight", "patch_merger.merging_layer.weight",
                       "vision_language_adapter.w_in.weight", "vision_language_adapter.w_out.weight"}
    for i in range(SPEC.num_hidden_layers):
        expected_native |= {f"vision_encoder.transformer.layers.{i}.{leaf}.weight" for leaf in (
            "attention_norm", "ffn_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert set(native) == expected_native


def test_native_params_carry_what_llama_cpp_reads() -> None:
    params = native_vision_params(SPEC)
    # find_vparam keys of conversion/base.py MmprojModel and conversion/pixtral.py
    assert params["hidden_size"] == SPEC.hidden_size
    assert params["intermediate_size"] == SPEC.intermediate_size
    assert params["num_hidden_layers"] == SPEC.num_hidden_layers
    assert params["num_attention_heads"] == SPEC.num_attention_heads
    assert params["image_size"] == SPEC.image_size and params["patch_size"] == SPEC.patch_size
    assert params["rope_theta"] == SPEC.rope_theta
    assert params["mm_projector_id"] == "patch_merge"  # else llama.cpp drops spatial_merge_size
    assert params["spatial_merge_size"] == SPEC.spatial_merge_size
    assert params["image_break_token_id"] > 0  # -1 would send llama.cpp looking for tekken.json
    assert params["adapter_bias"] is False and params["add_pre_mm_projector_layer_norm"] is True
    json.dumps(params)


def test_preprocessor_config_loads_and_normalizes_like_pixtral(tmp_path: Path) -> None:
    # The native layout has no preprocessor file: mistral-common's constants are the truth.
    assert tuple(preprocessor_config(SPEC)["image_mean"]) == tuple(DATASET_MEAN)
    assert tuple(preprocessor_config(SPEC)["image_std"]) == tuple(DATASET_STD)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(SPEC)))
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__.startswith("PixtralImageProcessor")

    wide = np.random.default_rng(0).integers(0, 256, (100, 3000, 3), dtype=np.uint8)
    out = processor(wide, return_tensors="pt")
    height, width = (int(v) for v in out["image_sizes"][0])
    assert max(height, width) <= SPEC.image_size and width == SPEC.image_size
    assert height % SPEC.patch_size == 0 and width % SPEC.patch_size == 0

    flat = np.full((70, 90, 3), 128, dtype=np.uint8)
    pixels = processor(flat, return_tensors="pt")["pixel_values"][0].numpy()
    expected = (128 / 255 - np.array(SPEC.image_mean)) / np.array(SPEC.image_std)
    np.testing.assert_allclose(pixels.reshape(3, -1).mean(axis=1), expected, rtol=1e-5)


def test_weights_are_float32_with_the_promised_scales() -> None:
    tensors = vision_tensors(SPEC, np.random.default_rng(SEED), "hf")
    assert all(v.dtype == np.float32 for v in tensors.values())
    norms = np.concatenate([v for k, v in tensors.items() if k.endswith(("norm.weight", "ln_pre.weight"))])
    mats = np.concatenate([v.ravel() for k, v in tensors.items() if v.ndim >= 2])
    assert abs(norms.mean() - 1.0) < 0.05
    assert abs(mats.std() - SPEC.weight_std) < 0.1 * SPEC.weight_std


def test_builder_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, numpy as np\n"
        "from smallfour.fixtures import vision as v\n"
        "s = v.VisionSpec(text_hidden_size=128)\n"
        "for layout in ('hf', 'native'): v.vision_tensors(s, np.random.default_rng(0), layout)\n"
        "v.hf_vision_config(s); v.hf_top_level_config(s); v.native_vision_params(s); v.preprocessor_config(s)\n"
        "bad = {'torch', 'transformers', 'safetensors'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
