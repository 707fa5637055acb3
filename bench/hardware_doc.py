"""Writes docs/hardware.md: `smallfour plan` for the real Mistral Small 4 on every built-in profile.

Each plan is the CLI's own output: `smallfour plan --model mistral-small-4 …` run in a
child process at a fixed terminal width, its stdout pasted verbatim (rich prints plain
text when stdout is not a terminal). The summary table comes from the same commands
with `--json`. Nothing here needs the weights: the planner works from the real
hyper-parameters.

    python bench/hardware_doc.py [--output docs/hardware.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Run as `python bench/hardware_doc.py`, this folder heads sys.path and bench/convert.py
# would shadow the `convert` package that smallfour.inventory imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from smallfour.inventory import REAL_MODEL_NAME, real_model  # noqa: E402
from smallfour.planner import assumptions as plan_assumptions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WIDTH = 110  # terminal columns the tables are rendered at
REFERENCE_CTX = 262144

# (profile, recipe, context): the datacenter profiles at the served 256K context, the
# workstation ones at 32K with the presets made for them (docs/recipes.md).
RUNS = [
    ("4xH100", "bf16", REFERENCE_CTX),
    ("4xH100", "q8_0", REFERENCE_CTX),
    ("2xH200", "bf16", REFERENCE_CTX),
    ("2xH200", "q8_0", REFERENCE_CTX),
    ("1xH100+256GB", "bf16", REFERENCE_CTX),
    ("1xH100+256GB", "q8_0", REFERENCE_CTX),
    ("24GB+128GB", "bf16", 32768),
    ("24GB+128GB", "q8_0", 32768),
    ("24GB+128GB", "sf-q4", 32768),
    ("cpu-96GB", "q8_0", 32768),
    ("cpu-96GB", "sf-q5", 32768),
    ("cpu-96GB", "sf-iq4", 32768),
]


def plan_args(profile: str, recipe: str, ctx: int) -> list[str]:
    return ["plan", "--model", REAL_MODEL_NAME, "--recipe", recipe, "--profile", profile, "--ctx", str(ctx)]


def smallfour(args: list[str]) -> str:
    env = {**os.environ, "COLUMNS": str(WIDTH), "NO_COLOR": "1", "TERM": "dumb"}
    result = subprocess.run([sys.executable, "-m", "smallfour", *args], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)
    if result.returncode not in (0, 3):  # 3: the plan does not fit, still a plan
        raise SystemExit(f"smallfour {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def trimmed(text: str) -> str:
    # rich pads table titles to the table width; the padding is all that is dropped.
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def summary_row(profile: str, recipe: str, ctx: int) -> str:
    info = json.loads(smallfour([*plan_args(profile, recipe, ctx), "--json"]))
    params, decode = info["llama_params"], info["decode"]
    split = ",".join(map(str, params["tensor_split"])) if params["tensor_split"] else "—"
    verdict = "yes" if info["fits"] else f"**no** — {info['suggestions'][0] if info['suggestions'] else '?'}"
    return (f"| {profile} | {recipe} | {ctx // 1024}K | {verdict} | {params['n_gpu_layers']} | {split} | "
            f"{params['cpu_experts']} | {info['weights_bytes'] / 1e9:.1f} | {info['kv_bytes'] / 1e9:.2f} | "
            f"{decode['tokens_per_s']:.0f} / {decode['ceiling_tokens_per_s']:.0f} |")


def sizes_table() -> list[str]:
    rows = ["| recipe | total GB | routed experts | attention | shared expert | embeddings + output | "
            "router + norms | brief |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    brief = {"bf16": "≈238 GB", "q8_0": "≈126 GB", "q4_k": "Q4_K_M ≈67 GB", "sf-q4": "", "sf-iq4": ""}
    for recipe in brief:
        model = real_model(recipe)
        roles = model.bytes_by_role()
        gb = lambda *keys: f"{sum(roles.get(k, 0) for k in keys) / 1e9:.2f}"  # noqa: E731
        rows.append(f"| {recipe} | {model.weights_bytes / 1e9:.2f} | {gb('routed_experts')} | {gb('attention')} | "
                    f"{gb('shared_expert')} | {gb('embeddings', 'output')} | {gb('router', 'norm')} | "
                    f"{brief[recipe]} |")
    return rows


def assumptions() -> list[str]:
    a = plan_assumptions()
    bw = ", ".join(f"{name} {rate / 1e9:,.0f} GB/s" for name, rate in a["bandwidths_bytes_per_s"].items())
    return [
        f"- **Bandwidths (peak)**: {bw}. Decode estimates use {a['gpu_bandwidth_efficiency']:.0%} of peak on GPUs "
        f"and {a['cpu_bandwidth_efficiency']:.0%} in RAM (llama.cpp's MoE decode: small expert matmuls); the "
        "ceiling is the same sum at 100%. Devices are read in turn (layer split), so their times add.",
        "- **Bytes read per token**: every always-active weight (attention, shared expert, router, norms, output), "
        "4/128 of each routed-expert tensor, one embedding row; plus, at full context, the whole KV cache.",
        f"- **Headroom**: {a['gpu_headroom_fraction']:.0%} of each GPU and {a['ram_headroom_fraction']:.0%} of RAM "
        f"stay free; each GPU also carries {a['gpu_runtime_overhead_bytes'] / 2**30:.0f} GiB of runtime overhead "
        f"(CUDA context, cuBLAS, flash-attention pool) and the process {a['cpu_runtime_overhead_bytes'] / 2**30:.0f} "
        "GiB of RAM.",
        "- **KV cache**: llama.cpp caches only the MLA latent + rope key, (256 + 64) values per token per layer "
        "(V is a view: 0 bytes), = 23,040 bytes/token in f16, rounded up to 256-token cells; checked against "
        "llama.cpp's allocation on the fixtures by `tests/test_plan.py`.",
        "- **Compute buffers**: the larger of the logits (vocab × batch × 4 B, on the GPU holding the output layer) "
        "and the attention buffers (with flash attention the f16 mask, ctx × batch × 2 B), plus activations; "
        "within 1% of llama.cpp's CPU compute buffer on the fixtures. With experts in RAM, prompt batches of ≥32 "
        "tokens copy one layer's experts to GPU0 (op_offload): that staging is reserved there.",
        "- **Placement** follows llama.cpp: token embeddings always in RAM; layers split over GPUs in order by "
        "`tensor_split` (the output layer last); `cpu_experts` = N keeps the routed experts of the first N layers "
        "in RAM (`--n-cpu-moe` convention).",
        "- **Sizes**: model sizes in decimal GB (1e9 bytes); device capacities in GiB as the drivers report them "
        "(H100 81,559 MiB, H200 143,771 MiB, RTX 4090 24,564 MiB).",
        "- **q4_k** is one Q4_K type for every matrix (norms/router F32, `attn_k_b` F16 because its 64-wide rows "
        "do not fill a 256 block); the `sf-*` presets spend bits by role and layer (docs/recipes.md). The planner "
        "sizes every recipe exactly as `smallfour convert --recipe` writes it.",
        "- **Applying a plan**: `smallfour run|chat|batch MODEL --plan auto` loads with the plan this machine gets "
        "(printed as `plan: --ctx … --gpu-layers … --cpu-experts …`); without it your own flags are used. Either "
        "way a model the planner says cannot fit is refused before llama.cpp allocates anything (one line, exit 1); "
        "`--force` loads it anyway.",
    ]


def document() -> str:
    lines = [
        "# Hardware plans for Mistral Small 4",
        "",
        "Generated by `python bench/hardware_doc.py` from `smallfour plan --model mistral-small-4`, the real model's",
        "hyper-parameters (hidden 4096, 36 layers, 32 heads, MLA q_lora 1024 / kv_lora 256 / rope 64, 128 routed",
        "experts of 2048 + 1 shared, 4 active, vocab 131072, untied output). No weights are needed to plan.",
        "Regenerate after changing the planner; do not edit by hand.",
        "",
        "## Sizes",
        "",
        *sizes_table(),
        "",
        "## Summary",
        "",
        "| profile | recipe | context | fits | n_gpu_layers | tensor_split | cpu_experts | weights GB | KV GB | "
        "decode tok/s (est. / ceiling) |",
        "|---|---|---|---|---:|---|---:|---:|---:|---|",
        *(summary_row(*run) for run in RUNS),
        "",
        "## Assumptions",
        "",
        *assumptions(),
        "",
        "## Plans",
        "",
        f"Each block is what the command prints at {WIDTH} columns (trailing spaces trimmed).",
    ]
    for profile, recipe, ctx in RUNS:
        args = plan_args(profile, recipe, ctx)
        lines += ["", f"### {profile}, {recipe}, {ctx // 1024}K context", "", "```text", f"$ smallfour {' '.join(args)}",
                  trimmed(smallfour(args)), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "hardware.md")
    args = parser.parse_args()
    args.output.write_text(document())
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
