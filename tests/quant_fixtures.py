"""Fixture specs for the quantization tests.

Every row length is a multiple of 256 (hidden, q/kv LoRA ranks, heads × v, expert width)
so K-quants and IQ types apply unchanged; `attn_k_b` rows (qk_nope = 64) still exercise
the block-size fallback, as in the real model.
"""

from smallfour.fixtures.checkpoint import FixtureSpec

KQUANT = FixtureSpec(hidden_size=256, q_lora_rank=256, kv_lora_rank=256, n_heads=2, qk_rope_head_dim=64,
                     qk_nope_head_dim=64, v_head_dim=128, n_experts=4, n_experts_used=2, expert_ff=256,
                     dense_ff=512)
KQUANT_FP8 = FixtureSpec(fp8="expert", hidden_size=256, q_lora_rank=256, kv_lora_rank=256, n_heads=2,
                         qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=128, n_experts=4, n_experts_used=2,
                         expert_ff=256, dense_ff=512)
