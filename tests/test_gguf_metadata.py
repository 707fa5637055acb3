"""Rope metadata in the written GGUF, value by value, against the checkpoint's own config file.

The pinned llama.cpp ignores some of these keys for mistral4 (the YaRN betas), so the logits
tests cannot notice them being wrong; a newer llama.cpp reads them. The expected values are
read from config.json / params.json here, not through convert/config.py.
"""

from __future__ import annotations

import json

import pytest
from gguf import GGUFReader

from conftest import HF, NATIVE


def gguf_fields(path) -> dict:
    reader = GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("mistral4.")}


def expected_from_hf(checkpoint_dir) -> dict:
    text = json.loads((checkpoint_dir / "config.json").read_text())["text_config"]
    rope = text["rope_parameters"]
    assert rope["rope_type"] == "yarn"
    return {
        "mistral4.rope.dimension_count": text["qk_rope_head_dim"],
        "mistral4.rope.freq_base": rope["rope_theta"],
        "mistral4.rope.scaling.type": "yarn",
        "mistral4.rope.scaling.factor": rope["factor"],
        "mistral4.rope.scaling.original_context_length": rope["original_max_position_embeddings"],
        "mistral4.rope.scaling.yarn_beta_fast": rope["beta_fast"],
        "mistral4.rope.scaling.yarn_beta_slow": rope["beta_slow"],
        # llama.cpp's deepseek2-family loader reads mscale_all_dim as this key / 0.1.
        "mistral4.rope.scaling.yarn_log_multiplier": 0.1 * rope["mscale_all_dim"],
        "mistral4.attention.temperature_scale": rope["llama_4_scaling_beta"],
        "mistral4.attention.temperature_length": rope["original_max_position_embeddings"],
    }


def expected_from_native(checkpoint_dir) -> dict:
    params = json.loads((checkpoint_dir / "params.json").read_text())
    yarn, llama4 = params["yarn"], params["llama_4_scaling"]
    return {
        "mistral4.rope.dimension_count": params["qk_rope_head_dim"],
        "mistral4.rope.freq_base": params["rope_theta"],
        "mistral4.rope.scaling.type": "yarn",
        "mistral4.rope.scaling.factor": yarn["factor"],
        "mistral4.rope.scaling.original_context_length": yarn["original_max_position_embeddings"],
        # Mistral's names: beta is the fast boundary, alpha the slow one.
        "mistral4.rope.scaling.yarn_beta_fast": yarn["beta"],
        "mistral4.rope.scaling.yarn_beta_slow": yarn["alpha"],
        "mistral4.rope.scaling.yarn_log_multiplier": 0.1 if yarn["apply_scale"] else 0.0,
        "mistral4.attention.temperature_scale": llama4["beta"],
        "mistral4.attention.temperature_length": llama4["original_max_position_embeddings"],
    }


@pytest.mark.parametrize("spec", [HF, NATIVE], ids=["hf", "native"])
def test_rope_metadata_equals_the_config(checkpoint, converted, spec):
    expected = (expected_from_native if spec.layout == "native" else expected_from_hf)(checkpoint(spec))
    # The fixture's values are all distinct where a swap could hide (beta_fast 32 vs beta_slow 1).
    assert expected["mistral4.rope.scaling.yarn_beta_fast"] != expected["mistral4.rope.scaling.yarn_beta_slow"]
    fields = gguf_fields(converted(spec, "f32"))
    assert fields.get("mistral4.rope.scaling.type") == expected.pop("mistral4.rope.scaling.type")
    got = {key: fields.get(key) for key in expected}
    assert got == pytest.approx(expected, rel=1e-6)  # f32 storage of 0.1 and friends
