"""`smallfour inspect`: what a GGUF holds, as tables or JSON."""

from __future__ import annotations

import json
from rich.table import Table

from smallfour.cli.options import AsJson, ModelRef
from smallfour.console import out


def inspect(
    model: ModelRef,
    as_json: AsJson = False,
) -> None:
    """Show a GGUF's architecture, hyper-parameters, tokenizer and tensors grouped by role."""
    from smallfour.inspect import describe
    from smallfour.store import resolve_gguf

    info = describe(resolve_gguf(model))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    out((info["file"], "bold"), f"  {info['architecture']}  {info['file_bytes'] / 1e6:.1f} MB")
    hyper = Table("hyper-parameter", "value", title="Hyper-parameters", title_justify="left")
    for key, value in info["hyperparameters"].items():
        hyper.add_row(key, str(value))
    out(hyper)
    tok = info["tokenizer"]
    out(f"tokenizer: {tok.get('model')} / {tok.get('pre')}, {tok.get('tokens')} tokens, "
        f"bos {tok.get('bos_token_id')}, eos {tok.get('eos_token_id')}; chat template: "
        f"{'yes' if info['chat_template'] else 'no'}")
    roles = Table("role", "type", "tensors", "parameters", "bytes", "bits/weight", title="Tensors by role",
                  title_justify="left")
    for row in info["roles"]:
        roles.add_row(row["role"], row["type"], str(row["count"]), f"{row['parameters']:,}", f"{row['bytes']:,}",
                      f"{row['bits_per_weight']:.2f}")
    total = info["tensors"]
    roles.add_row("total", "", str(total["count"]), f"{total['parameters']:,}", f"{total['bytes']:,}",
                  f"{total['bits_per_weight']:.2f}", style="bold")
    out(roles)
    _print_recipe(info)


def _print_recipe(info: dict) -> None:
    """The recipe a GGUF was quantized with, and the types it gave each layer."""
    recipe = info.get("recipe") or {}
    if recipe.get("name"):
        extra = f" — {recipe['description']}" if recipe.get("description") else ""
        imatrix = f" (imatrix {recipe['imatrix']})" if recipe.get("imatrix") else ""
        out("recipe: ", (recipe["name"], "bold"), f"{extra}{imatrix}")
    layers = info.get("layers") or []
    if not layers:
        return
    def types(row: dict, keys) -> str:
        return "/".join(sorted({t for k, t in row["types"].items() if k in keys}))

    groups = {"attention": ("attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_k_b", "attn_v_b", "attn_output"),
              "experts gate_up": ("ffn_gate_up_exps",), "experts down": ("ffn_down_exps",),
              "shared expert": ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"),
              "dense ffn": ("ffn_gate", "ffn_up", "ffn_down")}
    shown = {label: keys for label, keys in groups.items() if any(types(row, keys) for row in layers)}
    table = Table("layer", *shown, "bits/weight", title="Types per layer", title_justify="left")
    for row in layers:
        table.add_row(str(row["layer"]), *(types(row, keys) for keys in shown.values()),
                      f"{row['bits_per_weight']:.2f}")
    out(table)
