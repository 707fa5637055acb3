"""Conversion benchmark: throughput and peak memory of the one-pass checkpoint → GGUF converter.

For each `--size-gb`, builds (or reuses from the fixture cache) a random Mistral
Small 4 checkpoint in the release's form (Hugging Face layout, FP8 E4M3 weights
with 128×128 block scales, the real 131072-token vocabulary) whose safetensors
total at least that size on disk; the sizes differ only in layer count, so they
show how memory scales. Each checkpoint is converted once per recipe, each time
in a fresh child process, measuring wall and CPU time and the child's peak RSS
(`os.wait4`). While a
child runs its resident memory is also sampled from /proc to split the peak into
anonymous memory (the converter's own arrays) and file-backed pages (the
memory-mapped shards).

The same-run reference for memory is a child that holds the whole checkpoint in
RAM (every shard read with `np.fromfile`): the floor for any converter that
loads the checkpoint before writing. A child that only imports the converter
gives the interpreter's fixed cost.

The fixture is built in a child process too: Linux carries a parent's RSS
high-water mark into the children it forks, so the parent must stay small for
the children's `ru_maxrss` to be their own.

Results replace this script's section of docs/benchmarks.md.

    python bench/convert.py [--size-gb 0.4,1.2] [--recipes bf16,q8_0] [--fp8 block] [--output docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Run as `python bench/convert.py`, this file's folder heads sys.path and its name
# would shadow the `convert` package that the fixture builder imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from smallfour.fixtures.checkpoint import FixtureSpec, default_cache_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOC_HEADER = ("# Benchmarks\n\n"
              "Measured numbers; each section is written by the script it names, with the command that ran it.\n")
GB, MB = 1e9, 2**20
SAMPLE_SECONDS = 0.02

# The widths of the benchmark checkpoint; only the layer count follows --size-gb.
# Experts are most of the bytes, as in the release (128 routed experts, 4 used).
BASE_SPEC = FixtureSpec(
    layout="hf", fp8="block", fp8_block=128, hidden_size=512, n_heads=8, q_lora_rank=256, kv_lora_rank=128,
    qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_experts=128, n_experts_used=4, expert_ff=512,
    dense_ff=1024, n_shared_experts=1, first_dense_layers=0, shards=4, n_layers=1,
)

# Child processes. Each prints one JSON object on stdout.
BUILD = """
import json, sys
from smallfour.fixtures.checkpoint import FixtureSpec, build_fixture
print(json.dumps({"path": str(build_fixture(FixtureSpec(**json.loads(sys.argv[1])), sys.argv[2]))}))
"""
IMPORT_ONLY = "import json, convert.writer; print(json.dumps({}))"
LOAD_ALL = """
import json, sys, time
import numpy as np
start = time.perf_counter()
shards = [np.fromfile(path, dtype=np.uint8) for path in sys.argv[1:]]
print(json.dumps({"seconds": time.perf_counter() - start, "bytes": sum(s.nbytes for s in shards)}))
"""
CONVERT = """
import json, sys, time
from convert.writer import convert_checkpoint
start = time.perf_counter()
report = convert_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], force=True)
print(json.dumps({"seconds": time.perf_counter() - start, "tensors": report.tensors}))
"""


@dataclasses.dataclass
class Measurement:
    label: str
    checkpoint_bytes: int
    wall_s: float          # the whole child process, interpreter start included
    cpu_s: float           # its user + system CPU time
    peak_rss: int          # bytes, the kernel's high-water mark (ru_maxrss)
    peak_anon: int         # bytes, sampled RssAnon
    peak_file: int         # bytes, sampled RssFile
    result: dict
    output_bytes: int | None = None


def estimated_bytes(spec: FixtureSpec) -> int:
    """On-disk bytes of the text model's matrices (FP8 linear layers, BF16 embeddings/head/router).

    Norms, FP8 scales and the small vision tower add a few MB on top; assumes no dense layers.
    """
    h, heads = spec.hidden_size, spec.n_heads
    linear_bytes = 1 if spec.fp8 else 2
    attention = (spec.q_lora_rank * h
                 + heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim) * spec.q_lora_rank
                 + (spec.kv_lora_rank + spec.qk_rope_head_dim) * h
                 + heads * (spec.qk_nope_head_dim + spec.v_head_dim) * spec.kv_lora_rank
                 + h * heads * spec.v_head_dim)
    ffn = 3 * spec.expert_ff * h * (spec.n_experts + spec.n_shared_experts)
    router = spec.n_experts * h * 2
    embeddings_and_head = 2 * spec.vocab_size * h * 2
    return embeddings_and_head + spec.n_layers * ((attention + ffn) * linear_bytes + router)


def spec_for_size(size_gb: float, fp8: str | None) -> FixtureSpec:
    """BASE_SPEC with the fewest layers that reach `size_gb` (26 and 27 layers are skipped)."""
    one = dataclasses.replace(BASE_SPEC, fp8=fp8, n_layers=1)
    per_layer = estimated_bytes(dataclasses.replace(one, n_layers=2)) - estimated_bytes(one)
    fixed = estimated_bytes(one) - per_layer
    n_layers = max(1, math.ceil((size_gb * GB - fixed) / per_layer))
    if n_layers in (26, 27):
        n_layers = 28
    return dataclasses.replace(one, n_layers=n_layers)


def shard_paths(checkpoint: Path) -> list[Path]:
    return sorted(checkpoint.glob("*.safetensors"))


def rss_parts(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of a live process in bytes; zeros once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    kib = lambda key: int(fields.get(key, "0 kB").split()[0]) * 1024  # noqa: E731
    return kib("RssAnon"), kib("RssFile")


def run_child(label: str, checkpoint_bytes: int, code: str, *args: str) -> Measurement:
    """Run `python -c code args…` from the repo root; wall time, peak RSS and its JSON output."""
    with tempfile.TemporaryFile() as stdout:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=stdout)
        peak_anon = peak_file = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            anon, file = rss_parts(proc.pid)
            peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file)
            time.sleep(SAMPLE_SECONDS)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"{label}: child exited with {proc.returncode}")
        stdout.seek(0)
        result = json.loads(stdout.read())
    return Measurement(label, checkpoint_bytes, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024,
                       peak_anon, peak_file, result)


def build_checkpoint(spec: FixtureSpec) -> tuple[Path, int]:
    """The fixture for `spec` (built in a child, or found in the cache) and its safetensors bytes."""
    print(f"fixture: {spec.n_layers} layers, about {estimated_bytes(spec) / GB:.3f} GB of safetensors", flush=True)
    # One cache folder per layer count: the fixture cache keeps one build per spec name, and the
    # sizes differ only in layers, so in one folder each build would evict the other.
    cache_dir = default_cache_dir() / "bench-convert" / f"{spec.n_layers}-layers"
    build = run_child("build", 0, BUILD, json.dumps(dataclasses.asdict(spec)), str(cache_dir))
    checkpoint = Path(build.result["path"])
    checkpoint_bytes = sum(p.stat().st_size for p in shard_paths(checkpoint))
    print(f"  {checkpoint} ({checkpoint_bytes / GB:.3f} GB; built or found in {build.wall_s:.0f} s, "
          f"peak RSS {build.peak_rss / MB:,.0f} MB)", flush=True)
    return checkpoint, checkpoint_bytes


def measure(checkpoint: Path, checkpoint_bytes: int, recipes: list[str], scratch: Path) -> list[Measurement]:
    """The whole-checkpoint reference, then one conversion per recipe (its GGUF deleted once measured)."""
    rows = [run_child("reference: whole checkpoint in RAM", checkpoint_bytes, LOAD_ALL,
                      *map(str, shard_paths(checkpoint)))]
    for recipe in recipes:
        gguf_path = scratch / f"{recipe}.gguf"
        row = run_child(f"convert `{recipe}`", checkpoint_bytes, CONVERT, str(checkpoint), str(gguf_path), recipe)
        row.output_bytes = gguf_path.stat().st_size
        gguf_path.unlink()
        rows.append(row)
    for m in rows:
        print(f"  {m.label}: {m.result['seconds']:.1f} s, peak RSS {m.peak_rss / MB:,.0f} MB "
              f"(anon {m.peak_anon / MB:,.0f}, file {m.peak_file / MB:,.0f})", flush=True)
    return rows


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    return (f"{os.cpu_count()} × {cpu}, {mem_kib / 2**20:.1f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}")


def table(rows: list[Measurement]) -> str:
    lines = ["| checkpoint (GB) | run | time (s) | CPU (s) | GB/s in | tensors/s | output (MB) | peak RSS (MB) "
             "| peak RSS / checkpoint | sampled peak anon / file-backed (MB) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in rows:
        seconds, tensors = m.result.get("seconds"), m.result.get("tensors")
        cells = [
            f"{m.checkpoint_bytes / GB:.3f}" if m.checkpoint_bytes else "–",
            m.label,
            f"{seconds:.1f} ({m.wall_s:.1f})" if seconds is not None else f"({m.wall_s:.1f})",
            f"{m.cpu_s:.1f}",
            f"{m.checkpoint_bytes / GB / seconds:.3f}" if seconds and m.checkpoint_bytes else "–",
            f"{tensors / seconds:.1f}" if tensors else "–",
            f"{m.output_bytes / MB:,.0f}" if m.output_bytes else "–",
            f"{m.peak_rss / MB:,.0f}",
            f"{100 * m.peak_rss / m.checkpoint_bytes:.0f} %" if m.checkpoint_bytes else "–",
            f"{m.peak_anon / MB:,.0f} / {m.peak_file / MB:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def interpretation(rows: list[Measurement], recipes: list[str]) -> str:
    """What the measured peaks say, per recipe: how each part moved with the checkpoint size."""
    sizes = sorted({m.checkpoint_bytes for m in rows if m.checkpoint_bytes})
    sentences = []
    for recipe in recipes:
        small, large = (next(m for m in rows if m.label == f"convert `{recipe}`" and m.checkpoint_bytes == size)
                        for size in (sizes[0], sizes[-1]))
        text = f"`{recipe}`: "
        if len(sizes) > 1:
            flat = large.peak_anon < 1.2 * small.peak_anon
            text += (f"from the {sizes[0] / GB:.2f} to the {sizes[-1] / GB:.2f} GB checkpoint its own (anonymous) "
                     f"memory went {small.peak_anon / MB:,.0f} → {large.peak_anon / MB:,.0f} MB, "
                     + ("flat, so it is set by the pieces in flight, not by the checkpoint size"
                        if flat else "growing with the checkpoint") + "; ")
        share = large.peak_file / large.checkpoint_bytes
        text += (f"its file-backed RSS reached {large.peak_file / MB:,.0f} MB, {100 * share:.0f} % of the checkpoint"
                 + (": every page read from the memory-mapped shards stays mapped into the process until the "
                    "conversion ends (clean page cache the kernel may reclaim, but counted in RSS)"
                    if share > 0.5 else "") + ".")
        sentences.append(text)
    return "\n".join(f"- {s}" for s in sentences) + "\n"


def section(command: str, specs: list[FixtureSpec], recipes: list[str], rows: list[Measurement],
            total_s: float, loads: tuple[float, float]) -> str:
    spec = specs[-1]
    embedding_bytes = spec.vocab_size * spec.hidden_size * 4
    expert_bytes = 2 * spec.expert_ff * spec.hidden_size * 4
    layers = ", ".join(str(s.n_layers) for s in specs)
    begin, end = section_markers("bench/convert.py")
    return f"""{begin}
## Conversion (`bench/convert.py`)

Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}, with

```
{command}
```

Checkpoints: random Mistral Small 4 fixtures in the release's form (HF layout, FP8 E4M3 with {spec.fp8} scales \
{spec.fp8_block}×{spec.fp8_block}, BF16 embeddings and head), hidden {spec.hidden_size}, {spec.n_experts} routed + \
{spec.n_shared_experts} shared experts of width {spec.expert_ff}, vocabulary {spec.vocab_size}, {layers} layers, \
{spec.shards} shards; sizes are the safetensors bytes on disk. They are in the page cache: each reference run \
reads its checkpoint just before the conversions.

Each run is a fresh child process. Time is the measured call itself, the whole process in parentheses; \
GB/s in = checkpoint bytes / that time; tensors/s counts GGUF tensors written. Peak RSS is the kernel's \
high-water mark for the child (`os.wait4` → `ru_maxrss`); it counts the resident pages of the memory-mapped \
shards as well as the process's own arrays. The last column splits it by sampling `RssAnon`/`RssFile` every \
{SAMPLE_SECONDS * 1000:.0f} ms (samples can miss a short spike). One run each; the whole benchmark took \
{total_s:.0f} s, with a 1-minute load average of {loads[0]:.2f} at its start and {loads[1]:.2f} at its end \
(other work on the machine stretches wall time more than CPU time).

{table(rows)}
{interpretation(rows, recipes)}
For scale, as float32: `token_embd` and `output` ({spec.vocab_size}×{spec.hidden_size}) are \
{embedding_bytes / MB:,.0f} MB each, one routed expert's gate+up slice {expert_bytes / MB:,.0f} MB.
{end}"""


def section_markers(script: str) -> tuple[str, str]:
    """The comments that delimit a benchmark script's section of docs/benchmarks.md."""
    return f"<!-- {script} -->", f"<!-- /{script} -->"


def write_section(path: Path, text: str, script: str = "bench/convert.py") -> None:
    """Replace `script`'s section of `path` (or append it), leaving other sections alone.

    `text` is the whole section, markers included; every benchmark script writes through here.
    """
    begin, end = section_markers(script)
    doc = path.read_text() if path.exists() else DOC_HEADER
    if begin in doc and end in doc:
        before, rest = doc.split(begin, 1)
        doc = before + text + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", default="0.4,1.2",
                        help="comma-separated checkpoint sizes to reach on disk, in GB (1e9 B)")
    parser.add_argument("--recipes", default="bf16,q8_0", help="comma-separated conversion recipes")
    parser.add_argument("--fp8", default="block", choices=["tensor", "expert", "block"], help="FP8 scale layout")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    command = shlex.join(["python", "bench/convert.py", *sys.argv[1:]])
    recipes = args.recipes.split(",")
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]

    specs = [spec_for_size(float(size), args.fp8) for size in args.size_gb.split(",")]
    rows = [run_child("baseline: import only", 0, IMPORT_ONLY)]
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as scratch:
        for spec in specs:
            checkpoint, checkpoint_bytes = build_checkpoint(spec)
            rows += measure(checkpoint, checkpoint_bytes, recipes, Path(scratch))

    total_s = time.perf_counter() - started
    loads = (load_at_start, os.getloadavg()[0])
    write_section(args.output, section(command, specs, recipes, rows, total_s, loads))
    print(f"wrote {args.output} ({total_s:.0f} s in all)")


if __name__ == "__main__":
    main()
