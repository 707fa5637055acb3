"""GGUF tensor names read once: layer index, base name and role.

A GGUF tensor is named `blk.{layer}.{base}.weight` inside a layer and `{base}.weight`
outside one (llama.cpp's naming). The role groups tensors the way recipes, the planner
and `inspect` talk about them; norms and the router are the roles every recipe keeps F32.
"""

from __future__ import annotations

import re

ROLE_EMBEDDINGS = "embeddings"
ROLE_OUTPUT = "output"
ROLE_NORM = "norm"
ROLE_ATTENTION = "attention"
ROLE_ROUTER = "router"
ROLE_SHARED_EXPERT = "shared_expert"
ROLE_ROUTED_EXPERTS = "routed_experts"
ROLE_DENSE_FFN = "dense_ffn"

ROLES = (ROLE_EMBEDDINGS, ROLE_ATTENTION, ROLE_ROUTER, ROLE_SHARED_EXPERT, ROLE_ROUTED_EXPERTS,
         ROLE_DENSE_FFN, ROLE_NORM, ROLE_OUTPUT)

# Base name → role, for the tensors smallfour writes (MLA attention, merged gate_up experts).
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

_LAYER = re.compile(r"blk\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """`blk.3.ffn_down_exps.weight` → 3; None outside the repeating layers."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def base_name(name: str) -> str:
    """`blk.3.ffn_down_exps.weight` → `ffn_down_exps` (what recipe rules name with `tensor =`)."""
    base = name.removesuffix(".weight").removesuffix(".bias")
    return base.split(".", 2)[2] if base.startswith("blk.") else base


def role_of(name: str) -> str:
    """The role of a GGUF tensor; expert tensors of other converters (split gate/up) count as experts too."""
    base = base_name(name)
    if base in ROLE_OF:
        return ROLE_OF[base]
    if base.endswith("_exps"):
        return ROLE_ROUTED_EXPERTS
    if base.endswith("_shexp"):
        return ROLE_SHARED_EXPERT
    return ROLE_ATTENTION if base.startswith("attn") else ROLE_NORM
