"""Mistral Small 4 described for GGUF: which GGUF tensors a config makes, and from which source tensors.

`tensor_inventory` lists every GGUF tensor of the `mistral4` llama.cpp architecture
(a DeepSeek-V2 subclass: MLA attention, routed + shared experts) from the config
alone: the converter writes exactly these, and the planner sizes them before any
download. One readable table per checkpoint layout says where each weight lives, and
`plan_tensors` turns a checkpoint into `PlannedTensor`s in inventory order. Each
planned tensor knows its shape before any data is read, so the GGUF header is written
first and the data streamed after it, one expert slice at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from convert.checkpoint import Checkpoint
from convert.config import TextConfig
from convert.errors import ConversionError
from quant.names import ROLE_OF, ROLE_ROUTED_EXPERTS

# Unquantized 2-D tensors bigger than this are streamed in row chunks (the real
# embedding and output matrices are 131072×4096: 2 GB each in float32).
CHUNK_ELEMENTS = 8 * 1024 * 1024

# A layer's tensors in file order: attention, then the MoE or the dense feed-forward.
# MLA's kv_b_proj is written as attn_k_b (transposed per head) and attn_v_b.
ATTENTION_KEYS = ("attn_norm", "attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv_a_mqa", "attn_kv_a_norm",
                  "attn_k_b", "attn_v_b", "attn_output", "ffn_norm")
MOE_KEYS = ("ffn_gate_inp", "ffn_gate_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
DENSE_KEYS = ("ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class GGUFTensor:
    """One GGUF tensor of the text model, known from the config alone."""

    name: str  # blk.3.ffn_down_exps.weight
    key: str  # the base name: ffn_down_exps
    layer: int | None
    shape: tuple[int, ...]  # numpy order: the row length last

    @property
    def role(self) -> str:
        return ROLE_OF[self.key]


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    role: str
    layer: int | None
    source_bytes: int
    # Yields float32 pieces that, concatenated along axis 0, form the tensor.
    pieces: Callable[[], Iterator[np.ndarray]]
    # The checkpoint tensors it is made of (their FP8 scales aside), so that any tensor nothing consumes is refused.
    sources: tuple[str, ...]


# Per-layer source names. `{p}` is the HF text-model prefix, `{i}` the layer.
HF_NAMES = {
    "attn_norm": "{p}layers.{i}.input_layernorm.weight",
    "attn_q_a": "{p}layers.{i}.self_attn.q_a_proj.weight",
    "attn_q_a_norm": "{p}layers.{i}.self_attn.q_a_layernorm.weight",
    "attn_q_b": "{p}layers.{i}.self_attn.q_b_proj.weight",
    "attn_kv_a_mqa": "{p}layers.{i}.self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm": "{p}layers.{i}.self_attn.kv_a_layernorm.weight",
    "attn_kv_b": "{p}layers.{i}.self_attn.kv_b_proj.weight",
    "attn_output": "{p}layers.{i}.self_attn.o_proj.weight",
    "ffn_norm": "{p}layers.{i}.post_attention_layernorm.weight",
    "ffn_gate_inp": "{p}layers.{i}.mlp.gate.weight",
    "ffn_gate_up_exps": "{p}layers.{i}.mlp.experts.gate_up_proj",
    "ffn_down_exps": "{p}layers.{i}.mlp.experts.down_proj",
    "ffn_gate_shexp": "{p}layers.{i}.mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp": "{p}layers.{i}.mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp": "{p}layers.{i}.mlp.shared_experts.down_proj.weight",
    "ffn_gate": "{p}layers.{i}.mlp.gate_proj.weight",
    "ffn_up": "{p}layers.{i}.mlp.up_proj.weight",
    "ffn_down": "{p}layers.{i}.mlp.down_proj.weight",
    "token_embd": "{p}embed_tokens.weight",
    "output_norm": "{p}norm.weight",
}
# Prefixes seen for the text model: the multimodal wrapper on disk, its
# transformers-5 in-memory form, and a text-only Mistral4ForCausalLM.
HF_PREFIXES = ("language_model.model.", "model.language_model.", "model.")
HF_LM_HEADS = ("language_model.lm_head.weight", "lm_head.weight")

# Mistral-native names; experts are stored one per tensor (`{e}`), w1/w3/w2 = gate/up/down.
NATIVE_NAMES = {
    "attn_norm": "layers.{i}.attention_norm.weight",
    "attn_q_a": "layers.{i}.attention.wq_a.weight",
    "attn_q_a_norm": "layers.{i}.attention.q_a_norm.weight",
    "attn_q_b": "layers.{i}.attention.wq_b.weight",
    "attn_kv_a_mqa": "layers.{i}.attention.wkv_a_with_mqa.weight",
    "attn_kv_a_norm": "layers.{i}.attention.kv_a_norm.weight",
    "attn_kv_b": "layers.{i}.attention.wkv_b.weight",
    "attn_output": "layers.{i}.attention.wo.weight",
    "ffn_norm": "layers.{i}.ffn_norm.weight",
    "ffn_gate_inp": "layers.{i}.gate.weight",
    "expert_gate": "layers.{i}.experts.{e}.w1.weight",
    "expert_up": "layers.{i}.experts.{e}.w3.weight",
    "expert_down": "layers.{i}.experts.{e}.w2.weight",
    "ffn_gate_shexp": "layers.{i}.shared_experts.w1.weight",
    "ffn_up_shexp": "layers.{i}.shared_experts.w3.weight",
    "ffn_down_shexp": "layers.{i}.shared_experts.w2.weight",
    "ffn_gate": "layers.{i}.feed_forward.w1.weight",
    "ffn_up": "layers.{i}.feed_forward.w3.weight",
    "ffn_down": "layers.{i}.feed_forward.w2.weight",
    "token_embd": "tok_embeddings.weight",
    "output_norm": "norm.weight",
    "output": "output.weight",
}

def expected_shapes(cfg: TextConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Source-layout (HF) shapes of one layer's tensors, from the hyper-parameters."""
    h, heads = cfg.hidden_size, cfg.n_heads
    shapes = {
        "attn_norm": (h,),
        "attn_q_a": (cfg.q_lora_rank, h),
        "attn_q_a_norm": (cfg.q_lora_rank,),
        "attn_q_b": (heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), cfg.q_lora_rank),
        "attn_kv_a_mqa": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
        "attn_kv_a_norm": (cfg.kv_lora_rank,),
        "attn_kv_b": (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        "attn_output": (h, heads * cfg.v_head_dim),
        "ffn_norm": (h,),
    }
    if cfg.is_moe_layer(layer):
        shapes |= {
            "ffn_gate_inp": (cfg.n_experts, h),
            "ffn_gate_up_exps": (cfg.n_experts, 2 * cfg.expert_ff, h),
            "ffn_down_exps": (cfg.n_experts, h, cfg.expert_ff),
            "expert_gate": (cfg.expert_ff, h),
            "expert_up": (cfg.expert_ff, h),
            "expert_down": (h, cfg.expert_ff),
        }
        if cfg.n_shared_experts:
            shapes |= {
                "ffn_gate_shexp": (cfg.shared_ff, h),
                "ffn_up_shexp": (cfg.shared_ff, h),
                "ffn_down_shexp": (h, cfg.shared_ff),
            }
    else:
        shapes |= {"ffn_gate": (cfg.dense_ff, h), "ffn_up": (cfg.dense_ff, h), "ffn_down": (h, cfg.dense_ff)}
    return shapes


def tensor_inventory(cfg: TextConfig) -> list[GGUFTensor]:
    """Every GGUF tensor of the text model for `cfg`, in file order: what the converter writes."""
    inventory = [GGUFTensor("token_embd.weight", "token_embd", None, (cfg.vocab_size, cfg.hidden_size))]
    for i in range(cfg.n_layers):
        shapes = expected_shapes(cfg, i)
        shapes["attn_k_b"] = (cfg.n_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim)
        shapes["attn_v_b"] = (cfg.n_heads, cfg.v_head_dim, cfg.kv_lora_rank)
        keys = ATTENTION_KEYS + (MOE_KEYS if cfg.is_moe_layer(i) else DENSE_KEYS)
        inventory += [GGUFTensor(f"blk.{i}.{key}.weight", key, i, shapes[key]) for key in keys if key in shapes]
    inventory.append(GGUFTensor("output_norm.weight", "output_norm", None, (cfg.hidden_size,)))
    if not cfg.tie_embeddings:
        inventory.append(GGUFTensor("output.weight", "output", None, (cfg.vocab_size, cfg.hidden_size)))
    return inventory


def plan_tensors(ckpt: Checkpoint) -> list[PlannedTensor]:
    """Every tensor of `tensor_inventory`, in file order, with the source shapes checked against the config."""
    cfg = ckpt.config
    names = _source_names(ckpt)
    planned: list[PlannedTensor] = []
    for tensor in tensor_inventory(cfg):
        if tensor.key in ("attn_k_b", "attn_v_b"):
            planned.append(_kv_b_half(ckpt, cfg, tensor, names("attn_kv_b", tensor.layer)))
        elif tensor.role == ROLE_ROUTED_EXPERTS:
            planned.append(_experts(ckpt, cfg, tensor, names))
        else:
            source = names(tensor.key, tensor.layer)
            _check_shape(ckpt, source, tensor.shape)
            planned.append(PlannedTensor(tensor.name, tensor.shape, tensor.role, tensor.layer, ckpt.nbytes(source),
                                         lambda source=source, shape=tensor.shape: _row_chunks(ckpt, source, shape),
                                         (source,)))
    return planned


def _check_shape(ckpt: Checkpoint, source: str, expected: tuple[int, ...]) -> None:
    actual = ckpt.shape(source)
    if actual != expected:
        raise ConversionError(f"config does not match tensors: {source} has shape {list(actual)}, "
                              f"the config implies {list(expected)}")


def _row_chunks(ckpt: Checkpoint, source: str, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    if len(shape) < 2 or ckpt.is_fp8(source) or np.prod(shape) <= CHUNK_ELEMENTS:
        yield ckpt.read(source)
        return
    step = max(1, CHUNK_ELEMENTS // int(np.prod(shape[1:])))
    for start in range(0, shape[0], step):
        yield ckpt.read(source, rows=slice(start, min(start + step, shape[0])))


def _source_names(ckpt: Checkpoint) -> Callable[..., str]:
    if ckpt.layout == "native":
        return lambda key, layer=None, expert=None: NATIVE_NAMES[key].format(i=layer, e=expert)
    prefix = next((p for p in HF_PREFIXES if f"{p}embed_tokens.weight" in ckpt), None)
    if prefix is None:
        raise ConversionError("checkpoint has no embed_tokens.weight under any known text-model prefix")
    lm_head = next((n for n in HF_LM_HEADS if n in ckpt), HF_LM_HEADS[0])

    def name(key: str, layer: int | None = None, expert: int | None = None) -> str:
        return lm_head if key == "output" else HF_NAMES[key].format(p=prefix, i=layer)

    return name


def _kv_b_half(ckpt: Checkpoint, cfg: TextConfig, tensor: GGUFTensor, source: str) -> PlannedTensor:
    """MLA's kv_b_proj becomes k_b (transposed per head, for weight absorption) and v_b."""
    heads, nope, v, rank = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    _check_shape(ckpt, source, expected_shapes(cfg, tensor.layer)["attn_kv_b"])

    def pieces() -> Iterator[np.ndarray]:
        per_head = ckpt.read(source).reshape(heads, nope + v, rank)
        if tensor.key == "attn_k_b":
            yield np.ascontiguousarray(per_head[:, :nope, :].transpose(0, 2, 1))
        else:
            yield np.ascontiguousarray(per_head[:, nope:, :])

    return PlannedTensor(tensor.name, tensor.shape, tensor.role, tensor.layer, ckpt.nbytes(source) // 2, pieces,
                         (source,))


def _experts(ckpt: Checkpoint, cfg: TextConfig, tensor: GGUFTensor, names: Callable[..., str]) -> PlannedTensor:
    """One routed-expert tensor (gate_up or down) as a 3-D tensor, produced one expert at a time."""
    n, layer = cfg.n_experts, tensor.layer
    if ckpt.layout == "hf":
        merged = names(tensor.key, layer)
        _check_shape(ckpt, merged, tensor.shape)
        pieces = lambda: (ckpt.read(merged, e)[None] for e in range(n))  # noqa: E731
        return PlannedTensor(tensor.name, tensor.shape, tensor.role, layer, ckpt.nbytes(merged), pieces, (merged,))
    # Mistral-native checkpoints store one tensor per expert, gate (w1) and up (w3) apart.
    parts = ("expert_gate", "expert_up") if tensor.key == "ffn_gate_up_exps" else ("expert_down",)
    shapes = expected_shapes(cfg, layer)
    sources = [[names(part, layer, e) for e in range(n)] for part in parts]
    for part, names_of_part in zip(parts, sources):
        for name in names_of_part:
            _check_shape(ckpt, name, shapes[part])
    if tensor.key == "ffn_gate_up_exps":
        pieces = lambda: (np.concatenate([ckpt.read(g), ckpt.read(u)])[None] for g, u in zip(*sources))  # noqa: E731
    else:
        pieces = lambda: (ckpt.read(d)[None] for d in sources[0])  # noqa: E731
    return PlannedTensor(tensor.name, tensor.shape, tensor.role, layer,
                         sum(ckpt.nbytes(s) for names_of_part in sources for s in names_of_part), pieces,
                         tuple(s for names_of_part in sources for s in names_of_part))
