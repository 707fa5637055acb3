"""Quantization benchmark: our one-pass FP8 → quantized GGUF against llama.cpp's tools.

Same machine, same run, same FP8 checkpoint (a random Mistral Small 4 fixture in the
release's form, ≥ --size-gb on disk, built with bench/convert.py's spec and cache):

- Q8_0: ours `convert_checkpoint(SRC, OUT, "q8_0")` (FP8 decoded and quantized through
  ggml's quantizer on all cores, one tensor piece at a time) against llama.cpp's own
  `convert_hf_to_gguf.py --outtype q8_0` (the sdist's script), and against its two steps
  `--outtype bf16` then `llama_model_quantize` (what `llama-quantize … Q8_0` runs, via ctypes);
- K-quants: ours `--recipe sf-q4` in one pass against the two steps to `Q4_K_M`
  (the converter itself writes no K-quants).

Every step runs in a fresh child process: wall time and peak RSS (`os.wait4` ru_maxrss).
The reference converter reads the checkpoint through a shadow directory of symlinks
without `tekken.json`: with transformers 5 present, its vocabulary code otherwise takes
the tekken path that fails (`MistralCommonBackend has no attribute vocab`); weights are
the same files.

Results replace this script's section of docs/benchmarks.md.

    python bench/quantize.py [--size-gb 1.2] [--sdist /tmp/sdist/llama_cpp_python-0.3.36]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_convert", Path(__file__).with_name("convert.py"))
bench_convert = importlib.util.module_from_spec(_spec)
sys.modules["bench_convert"] = bench_convert  # dataclasses look their module up
_spec.loader.exec_module(bench_convert)

BEGIN, END = bench_convert.section_markers("bench/quantize.py")
GB, MB = 1e9, 2**20

OURS = """
import json, sys, time
from convert.writer import convert_checkpoint
start = time.perf_counter()
report = convert_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], force=True, mmproj=False)
print(json.dumps({"seconds": time.perf_counter() - start, "tensors": report.tensors}))
"""
REFERENCE_CONVERT = """
import contextlib, json, os, runpy, sys, time
script = sys.argv[1]
os.chdir(os.path.dirname(script))
sys.path.insert(0, os.path.dirname(script))
sys.argv = [script, sys.argv[2], "--outtype", sys.argv[4], "--outfile", sys.argv[3]]
start = time.perf_counter()
with contextlib.redirect_stdout(sys.stderr):
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code:
            raise
print(json.dumps({"seconds": time.perf_counter() - start}))
"""
REFERENCE_QUANTIZE = """
import json, os, sys, time
sys.path.insert(0, "tests")  # llama.cpp's quantizer, wrapped for the tests
from gguf import LlamaFileType
from llamacpp import llama_quantize
start = time.perf_counter()
llama_quantize(sys.argv[1], sys.argv[2], ftype=LlamaFileType[sys.argv[3]], threads=os.cpu_count())
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def shadow(checkpoint: Path, target: Path) -> Path:
    target.mkdir()
    for item in checkpoint.iterdir():
        if item.name != "tekken.json":
            (target / item.name).symlink_to(item)
    return target


def row(target: str, label: str, m, output_bytes: int) -> str:
    return (f"| {target} | {label} | {m.wall_s:.1f} | {m.cpu_s:.1f} | {m.peak_rss / MB:,.0f} | "
            f"{m.peak_anon / MB:,.0f} / {m.peak_file / MB:,.0f} | {output_bytes / MB:,.0f} |")


def two_steps(target: str, first, second, ftype: str) -> str:
    """llama.cpp's BF16 intermediate, then `llama-quantize`: times add up, the peak is the larger one."""
    (m1, bf16_bytes), (m2, out_bytes) = first, second
    return (f"| {target} | llama.cpp `convert_hf_to_gguf.py --outtype bf16` + `llama_model_quantize` {ftype} | "
            f"{m1.wall_s + m2.wall_s:.1f} | {m1.cpu_s + m2.cpu_s:.1f} | {max(m1.peak_rss, m2.peak_rss) / MB:,.0f} | "
            f"– | {out_bytes / MB:,.0f} (+ {bf16_bytes / MB:,.0f} BF16 written first) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.2)
    parser.add_argument("--k-recipe", default="sf-q4", help="our K-quant recipe, against llama.cpp's Q4_K_M")
    parser.add_argument("--sdist", type=Path, default=Path("/tmp/sdist/llama_cpp_python-0.3.36"))
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    script = args.sdist / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"{script} not found: download the llama-cpp-python 0.3.36 sdist (see docs/benchmarks.md)")
    command = shlex.join(["python", "bench/quantize.py", *sys.argv[1:]])
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    spec = bench_convert.spec_for_size(args.size_gb, "block")
    checkpoint, checkpoint_bytes = bench_convert.build_checkpoint(spec)
    with tempfile.TemporaryDirectory(prefix="bench-quantize-", dir=REPO / ".cache") as scratch:
        scratch = Path(scratch)
        # Warm the page cache the same way for both sides.
        warm = bench_convert.run_child("read", checkpoint_bytes, bench_convert.LOAD_ALL,
                                       *map(str, bench_convert.shard_paths(checkpoint)))
        print(f"  checkpoint read in {warm.result['seconds']:.1f} s", flush=True)
        src = str(checkpoint)
        ref_src = str(shadow(checkpoint, scratch / "src"))

        def step(label: str, code: str, output: Path, *args: str):
            measured = bench_convert.run_child(label, checkpoint_bytes, code, *args)
            print(f"  {label}: {measured.wall_s:.1f} s, peak RSS {measured.peak_rss / MB:,.0f} MB", flush=True)
            return measured, output.stat().st_size

        def ours(recipe: str):
            out = scratch / f"ours-{recipe}.gguf"
            measured = step(f"ours {recipe}", OURS, out, src, str(out), recipe)
            out.unlink()
            return measured

        def converted_by_llama_cpp(outtype: str):
            out = scratch / f"ref-{outtype}.gguf"
            return step(f"convert_hf_to_gguf {outtype}", REFERENCE_CONVERT, out, str(script), ref_src, str(out),
                        outtype)

        def quantized_by_llama_cpp(ftype: str):
            out = scratch / f"ref-{ftype}.gguf"
            measured = step(f"llama_model_quantize {ftype}", REFERENCE_QUANTIZE, out, str(scratch / "ref-bf16.gguf"),
                            str(out), ftype)
            out.unlink()
            return measured

        q8_ours, q8_direct = ours("q8_0"), converted_by_llama_cpp("q8_0")
        (scratch / "ref-q8_0.gguf").unlink()
        bf16 = converted_by_llama_cpp("bf16")
        q8_step2, k_step2 = quantized_by_llama_cpp("MOSTLY_Q8_0"), quantized_by_llama_cpp("MOSTLY_Q4_K_M")
        k_ours = ours(args.k_recipe)
        rows = [
            row("Q8_0", "smallfour `convert --recipe q8_0` (one pass)", *q8_ours),
            row("Q8_0", "llama.cpp `convert_hf_to_gguf.py --outtype q8_0` (one pass)", *q8_direct),
            two_steps("Q8_0", bf16, q8_step2, "Q8_0"),
            row("4-bit", f"smallfour `convert --recipe {args.k_recipe}` (one pass)", *k_ours),
            two_steps("4-bit", bf16, k_step2, "Q4_K_M"),
        ]
    total = time.perf_counter() - started
    text = f"""{BEGIN}
## One-pass quantization vs llama.cpp's converter and quantizer (`bench/quantize.py`)

Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {bench_convert.machine()}, with

```
{command}
```

Checkpoint: {checkpoint_bytes / GB:.2f} GB of safetensors, HF layout, FP8 E4M3 with {spec.fp8_block}×{spec.fp8_block} \
block scales, hidden {spec.hidden_size}, {spec.n_experts} routed experts of width {spec.expert_ff}, {spec.n_layers} \
layers, vocabulary {spec.vocab_size}; in the page cache before each run. Each step is a fresh child process; time is \
the whole process (interpreter start included), peak RSS the kernel's high-water mark (`ru_maxrss`, memory-mapped \
pages included), split into sampled anonymous / file-backed peaks. Ours quantizes with ggml on all \
{os.cpu_count()} cores and reads the next piece on a background thread; `llama_model_quantize` gets \
nthread = {os.cpu_count()}; `convert_hf_to_gguf.py` runs as it comes. The whole benchmark took \
{total:.0f} s; 1-minute load average {load0:.2f} at its start, {os.getloadavg()[0]:.2f} at its end.

| target | run | wall (s) | CPU (s) | peak RSS (MB) | sampled anon / file (MB) | output (MB) |
|---|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Ours goes straight from FP8 to the target types (float32 in between, never BF16), so it also skips the BF16 \
rounding step the two-step reference applies before quantizing, and writes no intermediate file. \
`{args.k_recipe}` is our MoE-aware 4-bit preset (docs/recipes.md), llama.cpp's `Q4_K_M` its own 4-bit mix: \
the sizes differ, the output column says by how much.
{END}"""
    bench_convert.write_section(args.output, text, "bench/quantize.py")
    print(f"wrote {args.output} ({total:.0f} s in all)")


if __name__ == "__main__":
    main()
