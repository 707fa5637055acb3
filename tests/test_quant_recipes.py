"""Recipes: the TOML format, the shipped presets on the real model, fit:SIZE, the planner's view."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from quant.errors import SmallfourError
from quant.fit import fit_recipe, parse_budget
from quant.pipeline import assign_types, check_requirements, gguf_overhead, tensor_bytes
from quant.recipes import TensorSlot, load_recipe, parse_recipe, preset_names
from smallfour.inventory import model_from_config, real_config, real_model

PRESETS_BY_SIZE = ["sf-q6", "sf-q5", "sf-q4", "sf-iq4", "sf-q3", "sf-iq3", "sf-q2", "sf-iq2"]
N_LAYERS = 36


@pytest.fixture(scope="module")
def slots():
    return [TensorSlot(t.name, t.role, t.layer, t.shape) for t in real_model("bf16").tensors]


def params(slots) -> int:
    return sum(int(np.prod(s.shape)) for s in slots)


def test_presets_span_eight_to_two_and_a_half_bits(slots):
    assert sorted(PRESETS_BY_SIZE) == preset_names()
    sizes = [tensor_bytes(slots, assign_types(load_recipe(name), slots, N_LAYERS)) for name in PRESETS_BY_SIZE]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    bpw = [8 * size / params(slots) for size in sizes]
    assert 6.0 < bpw[0] < 7.0 and 2.4 < bpw[-1] < 2.9, bpw
    q8 = tensor_bytes(slots, assign_types(load_recipe("q8_0"), slots, N_LAYERS))
    assert 8 * q8 / params(slots) == pytest.approx(8.5, abs=0.01)


@pytest.mark.parametrize("name", PRESETS_BY_SIZE)
def test_presets_keep_router_and_norms_f32_and_report_fallbacks(name, slots):
    choices = assign_types(load_recipe(name), slots, N_LAYERS)
    for s in slots:
        if s.role in ("router", "norm"):
            assert choices[s.name].qtype == T.F32, s.name
    # attn_k_b rows are qk_nope = 64 values: a 256-block type falls back, as llama.cpp's table says.
    k_b = choices["blk.0.attn_k_b.weight"]
    assert (k_b.fallback_from is not None) == (k_b.qtype != load_recipe(name).target("blk.0.attn_k_b.weight",
                                                                                      "attention", 0, N_LAYERS))
    # llama.cpp falls back to a 32-value block type of about the same size, never to F16.
    if k_b.fallback_from is not None:
        fallback_bpw = 8 * GGML_QUANT_SIZES[k_b.qtype][1] / GGML_QUANT_SIZES[k_b.qtype][0]
        wanted_bpw = 8 * GGML_QUANT_SIZES[k_b.fallback_from][1] / GGML_QUANT_SIZES[k_b.fallback_from][0]
        assert GGML_QUANT_SIZES[k_b.qtype][0] == 32 and wanted_bpw <= fallback_bpw <= wanted_bpw + 2.5, k_b


def test_imatrix_preset_refuses_without_imatrix(slots):
    choices = assign_types(load_recipe("sf-iq2"), slots, N_LAYERS)
    with pytest.raises(SmallfourError, match=r"need an imatrix \(--imatrix FILE\): blk\.0\.ffn_gate_up_exps"):
        check_requirements(choices, slots, None)
    importance = {s.name: np.ones((128, s.shape[-1]), np.float32) for s in slots if s.role == "routed_experts"}
    check_requirements(choices, slots, importance)


RULES = """
[recipe]
name = "mine"
default = "Q4_K"

[roles]
attention = "q8_0"
output = "Q6_K"

[[rules]]
tensor = "ffn_down_exps"
layers = "first:2, last:10%, 17"
type = "Q6_K"

[[rules]]
role = "routed_experts"
layers = "10-12"
type = "iq4_xs"

[[rules]]
tensor = "ffn_down_exps"
type = "Q3_K"

[[rules]]
pattern = 'blk\\.(5|6)\\.attn_q_b'
type = "Q5_K"

[[rules]]
pattern = 'ffn_gate_inp'
type = "Q2_K"
"""


def test_rules_first_match_wins_then_roles_then_default(slots):
    recipe = parse_recipe(RULES, "x", "test")
    choices = {n: c.qtype for n, c in assign_types(recipe, slots, N_LAYERS).items()}
    assert recipe.name == "mine"
    down = {i: choices[f"blk.{i}.ffn_down_exps.weight"] for i in range(N_LAYERS)}
    assert {i for i, t in down.items() if t == T.Q6_K} == {0, 1, 17, 32, 33, 34, 35}  # last 10 % of 36 → 4
    # Rules 1, 2 and 3 all match ffn_down_exps of layers 10-12 or 17: the earlier rule decides.
    assert down[10] == down[11] == down[12] == T.IQ4_XS and down[13] == T.Q3_K
    assert choices["blk.11.ffn_gate_up_exps.weight"] == T.IQ4_XS
    assert choices["blk.5.attn_q_b.weight"] == choices["blk.6.attn_q_b.weight"] == T.Q5_K
    assert choices["blk.7.attn_q_b.weight"] == T.Q8_0 and choices["output.weight"] == T.Q6_K
    assert choices["token_embd.weight"] == T.Q4_K and choices["blk.3.ffn_gate_shexp.weight"] == T.Q4_K
    assert choices["blk.4.ffn_gate_inp.weight"] == T.F32  # the router stays F32 whatever a rule says


# The shipped presets put an edge-layer rule for ffn_down_exps before a rule that matches every
# layer's ffn_down_exps (and sf-q2/sf-q4 a role rule between them): the edge layers must keep the
# first rule's type. 11 % of 36 layers → the first 4 and the last 4.
EDGE_LAYERS = {0, 1, 2, 3, 32, 33, 34, 35}


@pytest.mark.parametrize(("name", "edge", "middle", "edge_gate_up"), [
    ("sf-q4", T.Q6_K, T.Q5_K, T.Q5_K), ("sf-q2", T.Q4_K, T.Q3_K, T.Q3_K), ("sf-iq4", T.Q5_K, T.Q4_K, T.IQ4_XS)])
def test_presets_edge_layers_take_the_first_matching_rule(slots, name, edge, middle, edge_gate_up):
    choices = {n: c.qtype for n, c in assign_types(load_recipe(name), slots, N_LAYERS).items()}
    down = {i: choices[f"blk.{i}.ffn_down_exps.weight"] for i in range(N_LAYERS)}
    assert {i for i, t in down.items() if t == edge} == EDGE_LAYERS
    assert all(down[i] == middle for i in set(range(N_LAYERS)) - EDGE_LAYERS)
    assert {choices[f"blk.{i}.ffn_gate_up_exps.weight"] for i in EDGE_LAYERS} == {edge_gate_up}


@pytest.mark.parametrize("text,message", [
    ('[recipe]\ndefault = "Q4_Z"', "unknown or unsupported type 'Q4_Z'"),
    ('[recipe]\ndefault = "Q4_K"\n[roles]\nexperts = "Q4_K"', "unknown role 'experts'"),
    ('[recipe]\ndefault = "Q4_K"\n[[rules]]\nlayers = "1..3"\ntype = "Q4_K"', "cannot read '1..3'"),
    ('[recipe]\ndefault = "Q4_K"\n[[rules]]\npattern = "("\ntype = "Q4_K"', "bad pattern"),
    ('[recipe]\ndefault = "Q4_K"\n[[rules]]\ntensor = "x"', "needs a type"),
    ('[recipe]\nname = "x"', "needs a default type"),
    ('[recipe]\ndefault = "Q4_K"\n[typo]\n', "unknown section"),
    ('[recipe\n', "not valid TOML"),
])
def test_bad_recipes_are_refused_in_one_line(text, message):
    with pytest.raises(SmallfourError, match=message):
        parse_recipe(text, "x", "test.toml")


def test_recipe_names_files_and_types(tmp_path):
    assert load_recipe("q8_0").default == T.Q8_0 and load_recipe("Q5_K").default == T.Q5_K
    path = tmp_path / "r.toml"
    path.write_text(RULES)
    assert load_recipe(str(path)).name == "mine"
    with pytest.raises(SmallfourError, match="unknown recipe 'q9'.*sf-q4"):
        load_recipe("q9")
    with pytest.raises(SmallfourError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.toml"))


def test_parse_budget():
    assert parse_budget("60GB") == 60 * 10**9 and parse_budget("56GiB") == 56 * 2**30
    assert parse_budget("500 MB") == 500 * 10**6 and parse_budget("60") == 60 * 10**9
    with pytest.raises(SmallfourError, match="fit:60 parsecs"):
        parse_budget("60 parsecs")


@pytest.mark.parametrize("budget_gb", [44, 52, 60, 75, 100, 118])
def test_fit_lands_just_under_the_budget(slots, budget_gb):
    overhead = gguf_overhead(8_000_000, slots)
    recipe = fit_recipe(budget_gb * 10**9, slots, N_LAYERS, overhead_bytes=overhead)
    total = overhead + tensor_bytes(slots, assign_types(recipe, slots, N_LAYERS))
    # Under the budget, by less than one step of the smallest expert tensor (≈0.3 GB at these shapes).
    assert budget_gb * 10**9 - 0.35e9 < total <= budget_gb * 10**9


def test_fit_with_room_to_spare_gives_every_expert_q8_0(slots):
    assert {t for _, t in fit_recipe(200 * 10**9, slots, N_LAYERS).fixed} == {T.Q8_0}


def test_fit_heuristic_spends_on_down_projections_and_edge_layers(slots):
    recipe = fit_recipe(60 * 10**9, slots, N_LAYERS)
    bits = {name: T(t) for name, t in recipe.fixed}
    rank = {t: i for i, t in enumerate((T.Q2_K, T.Q3_K, T.IQ4_XS, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0))}
    for i in range(N_LAYERS):
        assert rank[bits[f"blk.{i}.ffn_down_exps.weight"]] >= rank[bits[f"blk.{i}.ffn_gate_up_exps.weight"]]
    edge, middle = bits["blk.0.ffn_gate_up_exps.weight"], bits["blk.18.ffn_gate_up_exps.weight"]
    assert rank[edge] > rank[middle]


def test_fit_with_importance_spends_where_importance_is_high(slots):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    hot = set(rng.choice(N_LAYERS, size=6, replace=False).tolist())
    importance = {s.name: np.full((128, s.shape[-1]), 10.0 if s.layer in hot else 1.0, np.float32)
                  for s in slots if s.role == "routed_experts"}
    recipe = fit_recipe(50 * 10**9, slots, N_LAYERS, importance)
    bits = {name: T(t).name for name, t in recipe.fixed}
    assert "imatrix-weighted" in recipe.description
    for kind in ("ffn_gate_up_exps", "ffn_down_exps"):
        hot_types = {bits[f"blk.{i}.{kind}.weight"] for i in hot}
        cold_types = {bits[f"blk.{i}.{kind}.weight"] for i in range(N_LAYERS) if i not in hot}
        from quant.fit import LADDER_IMATRIX
        order = [t.name for t in LADDER_IMATRIX]
        assert min(order.index(t) for t in hot_types) >= max(order.index(t) for t in cold_types), f"seed {seed}"


def test_fit_keeps_embeddings_q6_k_unless_only_q4_k_fits(slots):
    def embeddings_type(recipe):
        embd = next(s for s in slots if s.role == "embeddings")
        return recipe.choose(embd.name, embd.role, embd.layer, embd.shape, N_LAYERS).qtype

    assert embeddings_type(fit_recipe(60 * 10**9, slots, N_LAYERS)) == T.Q6_K
    with pytest.raises(SmallfourError) as refused:
        fit_recipe(10**9, slots, N_LAYERS, written="1000MB")
    smallest = float(re.search(r"gets is ([\d,.]+) MB", str(refused.value)).group(1).replace(",", "")) * 10**6
    # 1 MB above the minimum (which has Q4_K embeddings); Q6_K ones would need ≈140 MB more.
    assert embeddings_type(fit_recipe(int(smallest + 10**6), slots, N_LAYERS)) == T.Q4_K


def test_fit_too_small_says_the_minimum(slots):
    with pytest.raises(SmallfourError, match=r"fit:30GB is too small; the smallest this model gets is 4\d\.\d GB"):
        fit_recipe(30 * 10**9, slots, N_LAYERS)
    with pytest.raises(SmallfourError, match=r"fit:30000MB is too small; the smallest this model gets is 4\d,\d{3}\.\d MB"):
        fit_recipe(30 * 10**9, slots, N_LAYERS, written="30000MB")


def test_planner_sizes_presets_and_fit_like_the_converter(slots):
    for name in ("sf-q4", "sf-q2", "q4_k"):
        assert real_model(name).weights_bytes == tensor_bytes(slots, assign_types(load_recipe(name), slots, N_LAYERS))
    fitted = model_from_config(real_config(), "fit:60GB")
    assert 59.0e9 < fitted.weights_bytes <= 60e9
    with pytest.raises(SmallfourError, match="unknown recipe"):
        real_model("q9")
