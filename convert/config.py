"""Mistral Small 4 text hyper-parameters, read from either checkpoint layout.

The HF layout (`config.json`, `Mistral3ForConditionalGeneration` with a `mistral4`
text config) and the Mistral-native layout (`params.json`) name the same numbers
differently; both are normalized into one `TextConfig` here so the rest of the
converter never looks at the raw files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from convert.errors import ConversionError

SUPPORTED_HF_ARCHITECTURES = ("Mistral3ForConditionalGeneration", "Mistral4ForCausalLM")


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    dense_ff: int
    expert_ff: int
    n_experts: int
    n_experts_used: int
    n_shared_experts: int
    first_dense_layers: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    rope_theta: float
    yarn_factor: float | None
    yarn_original_context: int | None
    yarn_beta_fast: float | None
    yarn_beta_slow: float | None
    yarn_mscale_all_dim: float | None
    attn_temperature_beta: float | None
    attn_temperature_length: int | None
    context_length: int
    tie_embeddings: bool
    fp8_block_size: tuple[int, int] | None
    fp8: bool

    @property
    def shared_ff(self) -> int:
        return self.expert_ff * self.n_shared_experts

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense_layers


def _require(source: dict[str, Any], key: str, where: str) -> Any:
    if key not in source:
        raise ConversionError(f"{where} has no {key!r}: not a Mistral Small 4 configuration")
    return source[key]


def from_hf_config(config: dict[str, Any]) -> TextConfig:
    """Normalize a `config.json` (multimodal wrapper or text-only) into a TextConfig."""
    architectures = config.get("architectures") or []
    text = config.get("text_config", config)
    model_type = text.get("model_type")
    if model_type != "mistral4" or not any(a in SUPPORTED_HF_ARCHITECTURES for a in architectures):
        arch = architectures[0] if architectures else "unknown"
        raise ConversionError(
            f"unsupported architecture {arch} (text model_type {model_type!r}): "
            "smallfour converts Mistral Small 4 checkpoints (mistral4 text model)"
        )
    where = "config.json text_config" if "text_config" in config else "config.json"
    get = lambda key: _require(text, key, where)  # noqa: E731
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    is_yarn = rope.get("rope_type", rope.get("type")) == "yarn"
    quant = config.get("quantization_config") or text.get("quantization_config") or {}
    if quant and quant.get("quant_method") != "fp8":
        raise ConversionError(f"unsupported quantization {quant.get('quant_method')!r}: only FP8 checkpoints are supported")
    block = quant.get("weight_block_size")
    return TextConfig(
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        n_layers=get("num_hidden_layers"),
        n_heads=get("num_attention_heads"),
        q_lora_rank=get("q_lora_rank"),
        kv_lora_rank=get("kv_lora_rank"),
        qk_rope_head_dim=get("qk_rope_head_dim"),
        qk_nope_head_dim=get("qk_nope_head_dim"),
        v_head_dim=get("v_head_dim"),
        dense_ff=get("intermediate_size"),
        expert_ff=get("moe_intermediate_size"),
        n_experts=get("n_routed_experts"),
        n_experts_used=get("num_experts_per_tok"),
        n_shared_experts=text.get("n_shared_experts", 1),
        first_dense_layers=text.get("first_k_dense_replace") or 0,
        norm_topk_prob=bool(text.get("norm_topk_prob", True)),
        routed_scaling_factor=float(text.get("routed_scaling_factor", 1.0)),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
        yarn_factor=rope.get("factor") if is_yarn else None,
        yarn_original_context=rope.get("original_max_position_embeddings") if is_yarn else None,
        yarn_beta_fast=rope.get("beta_fast") if is_yarn else None,
        yarn_beta_slow=rope.get("beta_slow") if is_yarn else None,
        yarn_mscale_all_dim=rope.get("mscale_all_dim") if is_yarn else None,
        attn_temperature_beta=rope.get("llama_4_scaling_beta"),
        attn_temperature_length=rope.get("original_max_position_embeddings"),
        context_length=get("max_position_embeddings"),
        tie_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        fp8_block_size=tuple(block) if block else None,
        fp8=bool(quant),
    )


def from_native_params(params: dict[str, Any]) -> TextConfig:
    """Normalize a Mistral-native `params.json` into a TextConfig."""
    if "kv_lora_rank" not in params or "moe" not in params:
        raise ConversionError(
            "unsupported architecture in params.json (no MLA kv_lora_rank or moe section): "
            "smallfour converts Mistral Small 4 checkpoints"
        )
    get = lambda key: _require(params, key, "params.json")  # noqa: E731
    moe = params["moe"]
    get_moe = lambda key: _require(moe, key, "params.json moe")  # noqa: E731
    yarn = params.get("yarn")
    llama4 = params.get("llama_4_scaling") or {}
    quant = params.get("quantization") or {}
    if quant and quant.get("qformat_weight") != "fp8_e4m3":
        raise ConversionError(f"unsupported quantization {quant.get('qformat_weight')!r}: only fp8_e4m3 is supported")
    block = quant.get("weight_block_size")
    return TextConfig(
        vocab_size=get("vocab_size"),
        hidden_size=get("dim"),
        n_layers=get("n_layers"),
        n_heads=get("n_heads"),
        q_lora_rank=get("q_lora_rank"),
        kv_lora_rank=get("kv_lora_rank"),
        qk_rope_head_dim=get("qk_rope_head_dim"),
        qk_nope_head_dim=get("qk_nope_head_dim"),
        v_head_dim=get("v_head_dim"),
        dense_ff=get("hidden_dim"),
        expert_ff=get_moe("expert_hidden_dim"),
        n_experts=get_moe("num_experts"),
        n_experts_used=get_moe("num_experts_per_tok"),
        n_shared_experts=moe.get("num_shared_experts", 1),
        first_dense_layers=moe.get("first_k_dense_replace", 0),
        norm_topk_prob=True,
        routed_scaling_factor=float(moe.get("routed_scale", 1.0)),
        rms_norm_eps=float(params.get("norm_eps", 1e-6)),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        yarn_factor=yarn["factor"] if yarn else None,
        yarn_original_context=yarn["original_max_position_embeddings"] if yarn else None,
        yarn_beta_fast=yarn.get("beta") if yarn else None,
        yarn_beta_slow=yarn.get("alpha") if yarn else None,
        # `apply_scale` in Mistral's format means the YaRN attention scale is applied
        # by the rope itself, which is mscale_all_dim = 1 in HF terms.
        yarn_mscale_all_dim=(1.0 if yarn.get("apply_scale", True) else 0.0) if yarn else None,
        attn_temperature_beta=llama4.get("beta"),
        attn_temperature_length=llama4.get("original_max_position_embeddings"),
        context_length=params.get("max_position_embeddings", params.get("max_seq_len", 131072)),
        tie_embeddings=bool(params.get("tied_embeddings", False)),
        fp8_block_size=tuple(block) if block else None,
        fp8=bool(quant),
    )
