"""Quantization benchmark: our one-pass FP8 → Q8_0 conversion against llama.cpp's two steps.

Same machine, same run, same FP8 checkpoint (a random Mistral Small 4 fixture in the
release's form, ≥ --size-gb on disk, built with bench/convert.py's spec and cache):

- ours: `convert_checkpoint(SRC, OUT, "q8_0")` — FP8 decoded and quantized straight
  to Q8_0 through ggml's quantizer on all cores, one tensor piece at a time;
- llama.cpp's reference: `convert_hf_to_gguf.py SRC --outtype bf16` (the sdist's own
  script), then `llama_model_quantize` (what `llama-quantize … Q8_0` runs), via ctypes.

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

BEGIN, END = "<!-- bench/quantize.py -->", "<!-- /bench/quantize.py -->"
GB, MB = 1e9, 2**20

OURS = """
import json, sys, time
from convert.writer import convert_checkpoint
start = time.perf_counter()
report = convert_checkpoint(sys.argv[1], sys.argv[2], "q8_0", force=True, mmproj=False)
print(json.dumps({"seconds": time.perf_counter() - start, "tensors": report.tensors}))
"""
REFERENCE_CONVERT = """
import contextlib, json, os, runpy, sys, time
script = sys.argv[1]
os.chdir(os.path.dirname(script))
sys.path.insert(0, os.path.dirname(script))
sys.argv = [script, sys.argv[2], "--outtype", "bf16", "--outfile", sys.argv[3]]
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
from gguf import LlamaFileType
from quant.llamacpp import llama_quantize
start = time.perf_counter()
llama_quantize(sys.argv[1], sys.argv[2], ftype=LlamaFileType.MOSTLY_Q8_0, threads=os.cpu_count())
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def shadow(checkpoint: Path, target: Path) -> Path:
    target.mkdir()
    for item in checkpoint.iterdir():
        if item.name != "tekken.json":
            (target / item.name).symlink_to(item)
    return target


def row(label: str, m, output: Path | None) -> str:
    size = f"{output.stat().st_size / MB:,.0f}" if output is not None else "–"
    return (f"| {label} | {m.wall_s:.1f} | {m.cpu_s:.1f} | {m.peak_rss / MB:,.0f} | "
            f"{m.peak_anon / MB:,.0f} / {m.peak_file / MB:,.0f} | {size} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.2)
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
        ours_out = scratch / "ours-q8_0.gguf"
        ours = bench_convert.run_child("ours", checkpoint_bytes, OURS, str(checkpoint), str(ours_out))
        print(f"  ours: {ours.wall_s:.1f} s, peak RSS {ours.peak_rss / MB:,.0f} MB", flush=True)
        ours_row = row("smallfour `convert --recipe q8_0` (one pass)", ours, ours_out)
        ours_out.unlink()
        bf16_out, q8_out = scratch / "ref-bf16.gguf", scratch / "ref-q8_0.gguf"
        step1 = bench_convert.run_child("ref convert", checkpoint_bytes, REFERENCE_CONVERT, str(script),
                                        str(shadow(checkpoint, scratch / "src")), str(bf16_out))
        print(f"  convert_hf_to_gguf bf16: {step1.wall_s:.1f} s, peak RSS {step1.peak_rss / MB:,.0f} MB", flush=True)
        step2 = bench_convert.run_child("ref quantize", checkpoint_bytes, REFERENCE_QUANTIZE, str(bf16_out),
                                        str(q8_out))
        print(f"  llama_model_quantize q8_0: {step2.wall_s:.1f} s, peak RSS {step2.peak_rss / MB:,.0f} MB",
              flush=True)
        rows = [ours_row,
                row("llama.cpp step 1: `convert_hf_to_gguf.py --outtype bf16`", step1, bf16_out),
                row("llama.cpp step 2: `llama_model_quantize` → Q8_0", step2, q8_out)]
        ref_wall, ref_cpu = step1.wall_s + step2.wall_s, step1.cpu_s + step2.cpu_s
        ref_peak = max(step1.peak_rss, step2.peak_rss)
        rows.append(f"| llama.cpp, both steps | {ref_wall:.1f} | {ref_cpu:.1f} | {ref_peak / MB:,.0f} (max) | – | "
                    f"{q8_out.stat().st_size / MB:,.0f} (+ {bf16_out.stat().st_size / MB:,.0f} intermediate) |")
    total = time.perf_counter() - started
    text = f"""{BEGIN}
## One-pass quantization vs llama.cpp's two steps (`bench/quantize.py`)

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

| run | wall (s) | CPU (s) | peak RSS (MB) | sampled anon / file (MB) | output (MB) |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Ours goes straight from FP8 to Q8_0 (float32 in between, never BF16), so it also skips the BF16 rounding \
step the reference applies before quantizing, and writes no intermediate file.
{END}"""
    bench_convert.write_section.__globals__["BEGIN"], bench_convert.write_section.__globals__["END"] = BEGIN, END
    bench_convert.write_section(args.output, text)
    print(f"wrote {args.output} ({total:.0f} s in all)")


if __name__ == "__main__":
    main()
