"""Quantization quality on the trained fixture: KL divergence and top-1 agreement vs F32, imatrix vs none.

    .venv/bin/python bench/quant_quality.py [--chunks 24] [--ctx 128] [--markdown]

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


if __name__ == "__main__":
    main()
