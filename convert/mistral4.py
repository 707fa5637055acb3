"""Mistral Small 4 described for GGUF: which source tensors become which GGUF tensors.

One readable table per layout of where each weight lives, and one function that
turns a checkpoint into a list of `PlannedTensor`s for the `mistral4` llama.cpp
architecture (a DeepSeek-V2 subclass: MLA attention, routed + shared experts).
Each planned tensor knows its shape before any data is read, so the GGUF header
is written first and the data streamed after it, one expert slice at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from convert.checkpoint import Checkpoint
from convert.config import TextConfig
from convert.errors import ConversionError

# Tensor roles, shared with `inspect` and the quantization recipes.
ROLE_EMBEDDINGS = "embeddings"
ROLE_OUTPUT = "output"
ROLE_NORM = "norm"
ROLE_ATTENTION = "attention"
ROLE_ROUTER = "router"
ROLE_SHARED_EXPERT = "shared_expert"
ROLE_ROUTED_EXPERTS = "routed_experts"
ROLE_DENSE_FFN = "dense_ffn"

# Unquantized 2-D tensors bigger than this are streamed in row chunks (the real
# embedding and output matrices are 131072×4096: 2 GB each in float32).
CHUNK_ELEMENTS = 8 * 1024 * 1024

ROLES = (ROLE_EMBEDDINGS, ROLE_ATTENTION, ROLE_ROUTER, ROLE_SHARED_EXPERT, ROLE_ROUTED_EXPERTS,
         ROLE_DENSE_FFN, ROLE_NORM, ROLE_OUTPUT)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    role: str
    layer: int | None
    source_bytes: int
    # Yields float32 pieces that, concatenated along axis 0, form the tensor.
    pieces: Callable[[], Iterator[np.ndarray]]


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

ROLE_OF = {
    "attn_norm": ROLE_NORM, "attn_q_a_norm": ROLE_NORM, "attn_kv_a_norm": ROLE_NORM, "ffn_norm": ROLE_NORM,
    "output_norm": ROLE_NORM,
    "attn_q_a": ROLE_ATTENTION, "attn_q_b": ROLE_ATTENTION, "attn_kv_a_mqa": ROLE_ATTENTION,
    "attn_k_b": ROLE_ATTENTION, "attn_v_b": ROLE_ATTENTION, "attn_output": ROLE_ATTENTION,
    "ffn_gate_inp": ROLE_ROUTER,
    "ffn_gate_up_exps": ROLE_ROUTED_EXPERTS, "ffn_down_exps": ROLE_ROUTED_EXPERTS,
    "ffn_gate_shexp": ROLE_SHARED_EXPERT, "ffn_up_shexp": ROLE_SHARED_EXPERT, "ffn_down_shexp": ROLE_SHARED_EXPERT,
    "ffn_gate": ROLE_DENSE_FFN, "ffn_up": ROLE_DENSE_FFN, "ffn_down": ROLE_DENSE_FFN,
    "token_embd": ROLE_EMBEDDINGS, "output": ROLE_OUTPUT,
}


def role_of_gguf_name(name: str) -> str:
    """The role of a GGUF tensor name like `blk.3.ffn_down_exps.weight`."""
    base = name.removesuffix(".weight").removesuffix(".bias")
    base = base.split(".", 2)[2] if base.startswith("blk.") else base
    return ROLE_OF.get(base, ROLE_ATTENTION if base.startswith("attn") else ROLE_NORM)


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


def plan_tensors(ckpt: Checkpoint) -> list[PlannedTensor]:
    """Every GGUF tensor of the text model, in file order, with shapes checked against the config."""
    cfg = ckpt.config
    names = _source_names(ckpt)
    planned: list[PlannedTensor] = []

    def whole(key: str, layer: int | None, expected: tuple[int, ...], gguf_name: str) -> None:
        source = names(key, layer)
        _check_shape(ckpt, source, expected)
        planned.append(PlannedTensor(gguf_name, expected, ROLE_OF[key], layer, ckpt.nbytes(source),
                                     lambda source=source: _row_chunks(ckpt, source, expected)))

    whole("token_embd", None, (cfg.vocab_size, cfg.hidden_size), "token_embd.weight")
    for i in range(cfg.n_layers):
        shapes = expected_shapes(cfg, i)
        for key in ("attn_norm", "attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv_a_mqa", "attn_kv_a_norm"):
            whole(key, i, shapes[key], f"blk.{i}.{key}.weight")
        planned.extend(_split_kv_b(ckpt, cfg, i, names("attn_kv_b", i), shapes["attn_kv_b"]))
        whole("attn_output", i, shapes["attn_output"], f"blk.{i}.attn_output.weight")
        whole("ffn_norm", i, shapes["ffn_norm"], f"blk.{i}.ffn_norm.weight")
        if cfg.is_moe_layer(i):
            whole("ffn_gate_inp", i, shapes["ffn_gate_inp"], f"blk.{i}.ffn_gate_inp.weight")
            planned.extend(_experts(ckpt, cfg, i, names, shapes))
            for key in ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"):
                if key in shapes:
                    whole(key, i, shapes[key], f"blk.{i}.{key}.weight")
        else:
            for key in ("ffn_gate", "ffn_up", "ffn_down"):
                whole(key, i, shapes[key], f"blk.{i}.{key}.weight")
    whole("output_norm", None, (cfg.hidden_size,), "output_norm.weight")
    if not cfg.tie_embeddings:
        whole("output", None, (cfg.vocab_size, cfg.hidden_size), "output.weight")
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


def _split_kv_b(ckpt: Checkpoint, cfg: TextConfig, layer: int, source: str,
                expected: tuple[int, ...]) -> list[PlannedTensor]:
    """MLA's kv_b_proj becomes k_b (transposed per head, for weight absorption) and v_b."""
    _check_shape(ckpt, source, expected)
    heads, nope, v, rank = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank

    def per_head() -> np.ndarray:
        return ckpt.read(source).reshape(heads, nope + v, rank)

    half = ckpt.nbytes(source) // 2
    return [
        PlannedTensor(f"blk.{layer}.attn_k_b.weight", (heads, rank, nope), ROLE_ATTENTION, layer, half,
                      lambda: iter([np.ascontiguousarray(per_head()[:, :nope, :].transpose(0, 2, 1))])),
        PlannedTensor(f"blk.{layer}.attn_v_b.weight", (heads, v, rank), ROLE_ATTENTION, layer, half,
                      lambda: iter([np.ascontiguousarray(per_head()[:, nope:, :])])),
    ]


def _experts(ckpt: Checkpoint, cfg: TextConfig, layer: int, names: Callable[..., str],
             shapes: dict[str, tuple[int, ...]]) -> list[PlannedTensor]:
    """Routed experts as two 3-D tensors, produced one expert at a time."""
    n = cfg.n_experts
    gate_up_shape, down_shape = shapes["ffn_gate_up_exps"], shapes["ffn_down_exps"]
    if ckpt.layout == "hf":
        gate_up, down = names("ffn_gate_up_exps", layer), names("ffn_down_exps", layer)
        _check_shape(ckpt, gate_up, gate_up_shape)
        _check_shape(ckpt, down, down_shape)
        gate_up_pieces = lambda: (ckpt.read(gate_up, e)[None] for e in range(n))  # noqa: E731
        down_pieces = lambda: (ckpt.read(down, e)[None] for e in range(n))  # noqa: E731
        gate_up_bytes, down_bytes = ckpt.nbytes(gate_up), ckpt.nbytes(down)
    else:
        source = {key: [names(key, layer, e) for e in range(n)] for key in ("expert_gate", "expert_up", "expert_down")}
        for key, sources in source.items():
            for name in sources:
                _check_shape(ckpt, name, shapes[key])
        gate_up_pieces = lambda: (  # noqa: E731
            np.concatenate([ckpt.read(g), ckpt.read(u)])[None]
            for g, u in zip(source["expert_gate"], source["expert_up"])
        )
        down_pieces = lambda: (ckpt.read(d)[None] for d in source["expert_down"])  # noqa: E731
        gate_up_bytes = sum(ckpt.nbytes(s) for s in source["expert_gate"] + source["expert_up"])
        down_bytes = sum(ckpt.nbytes(s) for s in source["expert_down"])
    return [
        PlannedTensor(f"blk.{layer}.ffn_gate_up_exps.weight", gate_up_shape, ROLE_ROUTED_EXPERTS, layer,
                      gate_up_bytes, gate_up_pieces),
        PlannedTensor(f"blk.{layer}.ffn_down_exps.weight", down_shape, ROLE_ROUTED_EXPERTS, layer,
                      down_bytes, down_pieces),
    ]
