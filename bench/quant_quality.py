"""Quantization quality on the trained fixture: KL divergence and top-1 agreement vs F32, imatrix vs none.

    .venv/bin/python bench/quant_quality.py [--chunks 24] [--ctx 128] [--markdown]
    .venv/bin/python bench/quant_quality.py --proxy [--mixes Q4_K_M,Q3_K_M,Q2_K] [--chunks 32] [--write]
    .venv/bin/python bench/quant_quality.py --proxy --diagnostics [--chunks 32]

`--proxy`: equal-size comparisons on the proxy of bench/train_proxy.py (Mistral Small 4's
proportions: routed experts ≈91 % of the weights): llama-quantize's mixes, `fit:SIZE` at each
mix's exact file size and the nearest presets, without and with one shared imatrix; `--write`
puts the table into this script's section of docs/benchmarks.md. `--diagnostics`: one role at a
time below Q8_0 and preset variants (printed; docs/recipes.md quotes them).

Steps (all through smallfour's own pipeline and llama.cpp):
1. expand the trained fixture (tests/data/trained-fixture/) and convert it to an F32 GGUF;
2. `smallfour imatrix` on its calibration text (Python's zipfile.py, not trained on);
3. convert again with each recipe, without and with `--imatrix` (same types, so equal size):
   single-type recipes (every matrix one type), experts-only variants (everything Q8_0 but the
   routed experts), and the shipped presets of quant/recipes/ (IQ presets need an imatrix);
4. run every GGUF over held-out text (other stdlib modules, not trained on) in lockstep with the
   F32 one: mean KL(P_f32 ‖ P_quant) per position, top-1 agreement, perplexity.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the KL measure, shared with tests/test_quant_quality.py
os.environ.setdefault("SMALLFOUR_CACHE", str(REPO / ".cache"))

SINGLE_TYPES = ["q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k"]
EXPERT_TYPES = ["q4_k", "q3_k", "q2_k", "iq3_xxs", "iq2_xs"]


def experts_only_recipe(directory: Path, qtype: str) -> Path:
    """Q8_0 everywhere except the routed experts: isolates what per-expert importance does."""
    path = directory / f"experts-{qtype}.toml"
    path.write_text(f'[recipe]\nname = "experts-{qtype}"\ndefault = "Q8_0"\n\n[roles]\n'
                    f'routed_experts = "{qtype.upper()}"\n')
    return path


def build_variants(work: Path, checkpoint: Path, imatrix: Path, recipes: list[tuple[str, str, bool]],
                   log=print, reuse: bool = False) -> dict[str, tuple[Path, str, bool]]:
    """label → (GGUF, recipe, with imatrix); recipes are (label, recipe spec, needs imatrix)."""
    from convert.writer import convert_checkpoint

    made = {}
    for label, spec, needs in recipes:
        for use in ([True] if needs else [False, True]):
            out = work / f"{label}{'-imatrix' if use else ''}.gguf"
            made[f"{label}{' +imatrix' if use else ''}"] = (out, label, use)
            if reuse and out.is_file():
                continue
            start = time.time()
            convert_checkpoint(checkpoint, out, spec, mmproj=False, imatrix=imatrix if use else None, force=True)
            log(f"  converted {out.name} ({out.stat().st_size / 1e6:.1f} MB, {time.time() - start:.0f}s)")
    return made


def expert_bits_per_weight(path: Path) -> float:
    """Bits per routed-expert weight, from the GGUF's tensor table."""
    import numpy as np

    from quant.gguf_io import read_header
    from quant.names import ROLE_ROUTED_EXPERTS, role_of

    experts = [t for t in read_header(path).tensors if role_of(t.name) == ROLE_ROUTED_EXPERTS]
    return sum(8 * t.nbytes for t in experts) / sum(int(np.prod(t.shape)) for t in experts)


def main() -> None:
    if "--proxy" in sys.argv[1:]:
        return proxy_main()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=24, help="held-out chunks of --ctx tokens")
    parser.add_argument("--imatrix-chunks", type=int, default=None)
    parser.add_argument("--presets", default=None, help="comma-separated; default: every shipped preset")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="keep GGUFs already in --work (same code and fixture)")
    args = parser.parse_args()

    from convert.writer import convert_checkpoint
    from quality import measure, text_chunks
    from quant.recipes import load_recipe, preset_names
    from smallfour.fixtures.trained import calibration_text, heldout_text, trained_checkpoint
    from smallfour.imatrix import collect_imatrix
    from smallfour.model import Model

    work = args.work or Path(tempfile.mkdtemp(prefix="quant-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    checkpoint = trained_checkpoint()
    f32 = work / "f32.gguf"
    if not (args.reuse and f32.is_file()):
        convert_checkpoint(checkpoint, f32, "f32", mmproj=False, force=True)
    imatrix = work / "imatrix.gguf"
    if not (args.reuse and imatrix.is_file()):
        report = collect_imatrix(f32, calibration_text(), imatrix, n_ctx=args.ctx, chunks=args.imatrix_chunks)
        print(f"imatrix: {report.chunks} chunks of {report.chunk_size} tokens ({time.time() - start:.0f}s)",
              flush=True)

    presets = args.presets.split(",") if args.presets else preset_names()
    recipes = [(t, t, False) for t in SINGLE_TYPES]
    recipes += [(f"experts-{t}", str(experts_only_recipe(work, t)), t.startswith("iq")) for t in EXPERT_TYPES]
    recipes += [(p, p, _needs_imatrix(load_recipe(p))) for p in presets]
    variants = build_variants(work, checkpoint, imatrix, recipes, log=lambda m: print(m, flush=True),
                              reuse=args.reuse)

    with Model.load(f32, n_ctx=args.ctx, vocab_only=True) as model:
        chunks = text_chunks(model, heldout_text().read_text(), args.ctx)[: args.chunks]
    results = measure(f32, {label: path for label, (path, _, _) in variants.items()}, chunks, args.ctx)
    base = measure(f32, {"f32": f32}, chunks[:2], args.ctx)["f32"]
    print(f"held-out: {len(chunks)} chunks × {args.ctx} tokens; f32 self-KL {base.kl:.1e}; "
          f"total {time.time() - start:.0f}s\n", flush=True)

    rows = []
    for label, (path, recipe, use) in variants.items():
        r = results[label]
        rows.append((label, path.stat().st_size / 1e6, expert_bits_per_weight(path), r.kl, r.kl_max, r.top1, r.ppl))
    if args.markdown:
        print(markdown_table(rows))
    else:
        header = ("variant", "file MB", "expert bpw", "mean KL", "max KL", "top-1", "PPL")
        print(f"{header[0]:<24}{header[1]:>9}{header[2]:>12}{header[3]:>10}{header[4]:>9}{header[5]:>8}{header[6]:>8}")
        for row in rows:
            print(f"{row[0]:<24}{row[1]:>9.1f}{row[2]:>12.2f}{row[3]:>10.4f}{row[4]:>9.3f}{row[5]:>8.3f}{row[6]:>8.2f}")
    ppl_f32 = measure(f32, {"f32": f32}, chunks, args.ctx)["f32"].ppl
    print(f"\nF32 perplexity on the same text: {ppl_f32:.2f}")


def markdown_table(rows) -> str:
    """One line per recipe: without and with the imatrix side by side (rows as main() builds them)."""
    by_label = {row[0]: row for row in rows}
    lines = ["| variant | expert bpw | mean KL | max KL | top-1 | mean KL +imatrix | max KL +imatrix | "
             "top-1 +imatrix |", "|---|---|---|---|---|---|---|---|"]
    for label, row in by_label.items():
        if label.endswith(" +imatrix"):
            continue
        weighted = by_label.get(label + " +imatrix")
        right = f"{weighted[3]:.4f} | {weighted[4]:.3f} | {weighted[5]:.3f}" if weighted else "| |"
        lines.append(f"| {label} | {row[2]:.2f} | {row[3]:.4f} | {row[4]:.3f} | {row[5]:.3f} | {right} |")
    for label, row in by_label.items():
        if label.endswith(" +imatrix") and label.removesuffix(" +imatrix") not in by_label:
            lines.append(f"| {label.removesuffix(' +imatrix')} | {row[2]:.2f} | (needs an imatrix) | | | "
                         f"{row[3]:.4f} | {row[4]:.3f} | {row[5]:.3f} |")
    return "\n".join(lines)


def _needs_imatrix(recipe) -> bool:
    from quant import ggml

    return any(ggml.requires_importance(t) for t in recipe.types_used())


# --- equal-size comparisons on the proxy ------------------------------------------------------

# llama.cpp's mixes (`llama-quantize` ftypes) by size class, with the presets nearest in expert bpw.
MIX_PRESETS = {"Q6_K": ["sf-q6"], "Q5_K_M": ["sf-q5"], "Q4_K_M": ["sf-q4", "sf-iq4"], "Q3_K_M": ["sf-q3", "sf-iq3"],
               "Q2_K": ["sf-q2", "sf-iq2"], "IQ3_XXS": [], "IQ2_XS": []}
IMATRIX_ONLY_MIXES = {"IQ3_XXS", "IQ2_XS", "IQ2_XXS", "IQ1_S"}
PROXY_MARKER = "bench/quant_quality.py:proxy"


def llama_quantize_tool(build: Path) -> Path:
    """`llama-quantize` from the pinned sdist's vendored llama.cpp (built beside the other tools)."""
    import subprocess

    from throughput import llama_tools

    tool = build / "bin" / "llama-quantize"
    if not tool.exists():
        llama_tools(build)  # configures the build (and fetches the sdist) if it is not there yet
        subprocess.run(["nice", "-n", "10", "cmake", "--build", ".", "-j", str(os.cpu_count() or 1), "--target",
                        "llama-quantize"], cwd=build, check=True, stdout=subprocess.DEVNULL)
    return tool


def llama_mix(tool: Path, f32: Path, out: Path, mix: str, imatrix: Path | None) -> None:
    import subprocess

    command = [str(tool), *(["--imatrix", str(imatrix)] if imatrix else []), str(f32), str(out), mix,
               str(os.cpu_count() or 1)]
    done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    if done.returncode != 0:
        raise SystemExit(f"llama-quantize {mix} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def proxy_main() -> None:
    import json

    from quality import measure

    parser = argparse.ArgumentParser(description="Equal-size comparisons on the proxy: our presets and fit:SIZE "
                                                 "against llama-quantize's mixes")
    parser.add_argument("--proxy", action="store_true")
    parser.add_argument("--mixes", default="Q4_K_M,Q3_K_M,Q2_K", help=f"llama.cpp mixes, of {','.join(MIX_PRESETS)}")
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=24, help="held-out chunks of --ctx tokens")
    parser.add_argument("--steps", type=int, default=None, help="proxy training steps (default: train_proxy's)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="keep GGUFs already in --work")
    parser.add_argument("--llama-build", type=Path, default=REPO / ".cache" / "llama-tools")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    parser.add_argument("--diagnostics", action="store_true",
                        help="instead of the mixes: one role at a time below Q8_0, and preset variants (printed only)")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    command = " ".join([".venv/bin/python", "bench/quant_quality.py", *sys.argv[1:]])

    sys.path.append(str(REPO / "bench"))
    from convert.writer import convert_checkpoint
    from quant.imatrix import read_imatrix
    from quality import text_chunks
    from smallfour.imatrix import collect_imatrix
    from smallfour.model import Model
    from train_proxy import STEPS, TRAIN_JSON, load_histogram, proxy_checkpoint

    start = time.time()
    log = lambda m: print(m, flush=True)  # noqa: E731
    checkpoint = proxy_checkpoint(args.steps or STEPS, log=log)
    report = json.loads((checkpoint / TRAIN_JSON).read_text())
    tool = llama_quantize_tool(args.llama_build)
    work = args.work or Path(tempfile.mkdtemp(prefix="quant-proxy-"))
    work.mkdir(parents=True, exist_ok=True)

    f32 = work / "f32.gguf"
    if not (args.reuse and f32.is_file()):
        convert_checkpoint(checkpoint, f32, "f32", mmproj=False, force=True)
    imatrix = work / "imatrix.gguf"
    if not (args.reuse and imatrix.is_file()):
        done = collect_imatrix(f32, checkpoint / "calibration.txt", imatrix, n_ctx=args.ctx)
        log(f"imatrix: {done.chunks} chunks of {done.chunk_size} tokens ({time.time() - start:.0f}s)")
    imatrix_chunks = read_imatrix(imatrix).chunk_count

    rows: list[tuple[str, str, bool, Path]] = []  # (size class, variant, imatrix, GGUF)

    def ours(label: str, recipe: str, use: bool) -> Path:
        out = work / f"{label}{'-imatrix' if use else ''}.gguf"
        if not (args.reuse and out.is_file()):
            convert_checkpoint(checkpoint, out, recipe, mmproj=False, imatrix=imatrix if use else None, force=True)
        return out

    if args.diagnostics:
        with Model.load(f32, n_ctx=args.ctx, vocab_only=True) as model:
            chunks = text_chunks(model, (checkpoint / "heldout.txt").read_text(), args.ctx)[: args.chunks]
        print(diagnostics(args, checkpoint, work, f32, imatrix, chunks, log))
        print(f"{len(chunks)} chunks × {args.ctx} tokens; total {time.time() - start:.0f}s")
        return

    mixes = args.mixes.split(",")
    for mix in mixes:
        for use in ([True] if mix in IMATRIX_ONLY_MIXES else [False, True]):
            suffix = "-imatrix" if use else ""
            theirs = work / f"llama-{mix}{suffix}.gguf"
            if not (args.reuse and theirs.is_file()):
                llama_mix(tool, f32, theirs, mix, imatrix if use else None)
            size = theirs.stat().st_size
            rows.append((mix, f"llama.cpp {mix}", use, theirs))
            rows.append((mix, f"fit:{size}b", use, ours(f"fit-{mix}", f"fit:{size}b", use)))
            for preset in MIX_PRESETS.get(mix, []):
                if use or not preset.startswith("sf-iq"):
                    rows.append((mix, preset, use, ours(preset, preset, use)))
            log(f"  {mix}{' +imatrix' if use else ''}: {size:,} bytes ({time.time() - start:.0f}s)")

    with Model.load(f32, n_ctx=args.ctx, vocab_only=True) as model:
        chunks = text_chunks(model, (checkpoint / "heldout.txt").read_text(), args.ctx)[: args.chunks]
    variants = {f"{cls}|{name}|{use}": path for cls, name, use, path in rows}
    measured = measure(f32, variants, chunks, args.ctx, group=8)
    lines = ["| class | variant | imatrix | file bytes | vs llama.cpp | expert bpw | mean KL | p99 KL | max KL "
             "| top-1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    sizes = {}
    for cls, name, use, path in rows:
        result = measured[f"{cls}|{name}|{use}"]
        kl = result.kl_positions
        size = path.stat().st_size
        if name.startswith("llama.cpp"):
            sizes[(cls, use)] = size
        shown = "fit (= llama.cpp's size)" if name.startswith("fit:") else name
        lines.append(f"| {cls} | {shown} | {'yes' if use else 'no'} | {size:,} | "
                     f"{size / sizes[(cls, use)] - 1:+.1%} | {expert_bits_per_weight(path):.2f} | {kl.mean():.4f} | "
                     f"{np.percentile(kl, 99):.4f} | {kl.max():.3f} | {result.top1:.3f} |")
    table = "\n".join(lines)
    print(table, flush=True)
    print(load_histogram(report))
    print(f"total {time.time() - start:.0f}s")
    if args.write:
        write_proxy_section(args.output, proxy_text(command, report, len(chunks), args.ctx, imatrix_chunks, table,
                                                    load_histogram(report)))


def proxy_text(command: str, report: dict, chunks: int, ctx: int, imatrix_chunks, table: str, histogram: str) -> str:
    from train_proxy import SPEC

    weights = report["weights"]
    total = sum(weights.values())
    shares = ", ".join(f"{k} {v / total:.1%}" for k, v in weights.items())
    calibration = f"{imatrix_chunks} chunks × {ctx} tokens" if imatrix_chunks else f"chunks of {ctx} tokens"
    return f"""<!-- {PROXY_MARKER} -->
### Equal size against llama.cpp's mixes, on a proxy with Mistral Small 4's proportions

Model: the proxy of `bench/train_proxy.py` (rebuilt deterministically and cached by content
hash, not shipped): the Mistral Small 4 architecture at hidden {SPEC.hidden_size}, {SPEC.n_layers} layers (the first
dense), MLA, {SPEC.n_experts} routed experts of {SPEC.expert_ff} with {SPEC.n_experts_used} active + 1 shared, and a Tekken v15
vocabulary cut to {SPEC.vocab_size} ids, so that the routed experts are {weights['routed experts'] / total:.1%} of its
{total / 1e6:.1f} M text weights (Mistral Small 4: ≈97 %; here {shares}). Trained
{report['steps']} steps ({report['seconds']:.0f} s on one CPU thread; loss {report['first_loss']:.2f} → {report['final_loss']:.2f},
held-out {report['heldout_loss']:.2f}, next-token top-1 {report['heldout_top1']:.1%}) on Python standard-library source with a
weak balancing loss, so routing is uneven. Expert load on the held-out text (share of the top-4
slots per expert, relative to uniform):

```text
{histogram}
```

For each llama.cpp mix, `llama-quantize` (built from the pinned sdist's llama.cpp) quantizes the
F32 GGUF; `fit:SIZE` is given exactly that file's size in bytes; the shipped presets nearest in
size are shown at their own size ("vs llama.cpp" is the file size relative to the mix). The
imatrix is collected once by `smallfour imatrix` on `calibration.txt` (`zipfile.py`,
{calibration}) and the same file goes to both sides. Held-out text: other stdlib modules,
{chunks} chunks × {ctx} tokens; KL(P_f32 ‖ P_quant) per predicted position (nats), its mean,
99th percentile and maximum, top-1 agreement with F32.

<!-- needs: slow -->
```bash
{command}
```

{table}
<!-- /{PROXY_MARKER} -->"""


def write_proxy_section(path: Path, text: str) -> None:
    """The proxy block lives inside this script's section of docs/benchmarks.md (written through write_section)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_convert", REPO / "bench" / "convert.py")
    bench_convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_convert)
    section_markers, write_section = bench_convert.section_markers, bench_convert.write_section
    begin, _ = section_markers("bench/quant_quality.py")
    sub_begin, _ = section_markers(PROXY_MARKER)
    doc = path.read_text()
    if sub_begin not in doc:
        doc = doc.replace(begin + "\n", f"{begin}\n{sub_begin}\n<!-- /{PROXY_MARKER} -->\n\n", 1)
        path.write_text(doc)
    write_section(path, text, PROXY_MARKER)


# Where the error comes from: one role at a time below Q8_0, and presets with other edge-role types.
DIAGNOSTICS = {  # label → (base: "Q8_0" or a preset, role overrides)
    "all Q8_0": ("Q8_0", {}),
    "Q8_0, embeddings Q4_K": ("Q8_0", {"embeddings": "Q4_K"}),
    "Q8_0, embeddings Q6_K": ("Q8_0", {"embeddings": "Q6_K"}),
    "Q8_0, embeddings Q3_K": ("Q8_0", {"embeddings": "Q3_K"}),
    "Q8_0, output Q5_K": ("Q8_0", {"output": "Q5_K"}),
    "Q8_0, attention+shared+dense Q3_K": ("Q8_0", {"attention": "Q3_K", "shared_expert": "Q3_K",
                                                    "dense_ffn": "Q3_K"}),
    "Q8_0, routed experts Q3_K": ("Q8_0", {"routed_experts": "Q3_K"}),
    "sf-q2, embeddings Q4_K, output Q6_K": ("sf-q2", {"embeddings": "Q4_K", "output": "Q6_K"}),
    "sf-iq2, embeddings Q4_K, output Q6_K": ("sf-iq2", {"embeddings": "Q4_K", "output": "Q6_K"}),
    "sf-q2, embeddings Q6_K, output Q6_K": ("sf-q2", {"embeddings": "Q6_K", "output": "Q6_K"}),
    "sf-q3, embeddings Q6_K": ("sf-q3", {"embeddings": "Q6_K"}),
    "sf-q4, embeddings Q6_K": ("sf-q4", {"embeddings": "Q6_K"}),
}


def diagnostic_recipe(directory: Path, index: int, base: str, roles: dict[str, str]) -> Path:
    import re

    path = directory / f"diag-{index}.toml"
    if base == "Q8_0":
        text = f'[recipe]\nname = "diag-{index}"\ndefault = "Q8_0"\n\n[roles]\n' + "".join(
            f'{role} = "{qtype}"\n' for role, qtype in roles.items())
    else:
        text = (REPO / "quant" / "recipes" / f"{base}.toml").read_text()
        text = re.sub(r'(?m)^name = ".*"$', f'name = "diag-{index}"', text)
        for role, qtype in roles.items():
            text = re.sub(rf'(?m)^{role} = ".*"$', f'{role} = "{qtype}"', text)
    path.write_text(text)
    return path


def diagnostics(args, checkpoint: Path, work: Path, f32: Path, imatrix: Path, chunks, log) -> str:
    from convert.writer import convert_checkpoint
    from quality import measure

    rows = []
    for index, (label, (base, roles)) in enumerate(DIAGNOSTICS.items()):
        recipe = diagnostic_recipe(work, index, base, roles)
        for use in ([True] if base == "sf-iq2" else [False, True] if base.startswith("sf-") else [False]):
            out = work / f"diag-{index}{'-imatrix' if use else ''}.gguf"
            if not (args.reuse and out.is_file()):
                convert_checkpoint(checkpoint, out, str(recipe), mmproj=False, imatrix=imatrix if use else None,
                                   force=True)
            rows.append((label, use, out))
    log("  diagnostics converted")
    measured = measure(f32, {f"{label}|{use}": out for label, use, out in rows}, chunks, args.ctx, group=8)
    lines = ["| variant | imatrix | file bytes | expert bpw | mean KL | p99 KL | max KL | top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for label, use, out in rows:
        result = measured[f"{label}|{use}"]
        kl = result.kl_positions
        lines.append(f"| {label} | {'yes' if use else 'no'} | {out.stat().st_size:,} | "
                     f"{expert_bits_per_weight(out):.2f} "
                     f"| {kl.mean():.4f} | {np.percentile(kl, 99):.4f} | {kl.max():.3f} | {result.top1:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
