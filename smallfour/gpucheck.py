"""`smallfour doctor --check-gpu`: does this llama.cpp build compute on the GPU(s) what it computes on the CPU?

For each model (the demo and a few-hundred-MB fixture) it loads the GGUF several ways and
compares each with a CPU reference:

- the CPU reference keeps every layer on the CPU and llama.cpp's op offload off (large CPU-side
  batches would otherwise run on a GPU), and is checked to hold no weights or KV on a GPU. (Hiding
  the GPUs instead, CUDA_VISIBLE_DEVICES="", makes a CUDA build of llama.cpp 0.3.36 abort at context
  creation: seen on an H200);
- everything on the GPU(s), then `--cpu-experts all` and `--cpu-experts N`: the logits of a
  fixed prompt equal the CPU's within `LOGITS_TOLERANCE`, and the routed-expert tensors the
  overrides name are exactly those llama.cpp's log says it moved to the CPU;
- the planner's layout: per device, the weight and KV bytes it planned equal the model and KV
  buffers llama.cpp's log reports (compute buffers reported beside them);
- with two GPUs or more, layer and row split give the same greedy tokens;
- flash attention: whether llama.cpp's auto mode keeps it on for the GPU (judged for the fixture
  with Mistral Small 4's attention shape: 32 heads, K 320 and V 256 wide after MLA's absorption,
  a kernel llama.cpp's CUDA backend builds for this model alone), and the logits with it forced on;
- the vision projector on the GPU gives the CPU's image embeddings within `EMBEDDING_TOLERANCE`;
- prefill and decode tokens/s, GPU and CPU (reported, not judged: a tiny model can decode
  faster on the CPU).

Every load runs in a child process (`python -m smallfour.gpucheck`), so a llama.cpp abort or hang
in one becomes that step's failed check and the others still run. Every check is a `Check`; the
command passes only if none failed. The comparisons are plain functions of two `Run`s, so a
CPU-only machine tests them on CPU-against-CPU runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from smallfour.errors import SmallfourError
from smallfour.fixtures.checkpoint import DEMO_SPEC, FixtureSpec
from smallfour.placement import Placement, expert_overrides

# max |GPU − CPU| / max |CPU| over each position's logits. Measured on an H200 (q8_0, 24 positions of random-weight
# fixtures): 3.1 % (demo) and 5.1 % (Mistral Small 4's attention shape) all on GPU, 5.5 / 6.3 % with the experts on
# the CPU, 5.9 / 7.9 % with flash attention against the CPU's; the CPU's own flash against exact attention: 2.9 %
# (demo). The GPU's q8_1 activations and its summation order; the greedy check is the sharper test.
LOGITS_TOLERANCE = 0.10
# the same measure over an image's embedding rows
EMBEDDING_TOLERANCE = 0.02
# a greedy token may differ only where the reference's top two logits are this close (fraction of the range)
NEAR_TIE = 0.01
# the planner's weight bytes per device against llama.cpp's model buffers: tensor padding and the log's MiB rounding
PLANNER_WEIGHTS_TOLERANCE = 0.01
MIB = 2**20
LOG_ROUNDING = MIB // 100  # llama.cpp's log prints buffer sizes in MiB to 2 decimals
PROMPT_TOKENS = 24  # below 32: the CPU reference would not offload these batches even if a GPU were visible
SPEED_PROMPT_TOKENS = 512
DECODE_TOKENS = 48
N_CTX = 2048
# The second model: 131072 × 1024 token embedding and output head (2 × 143 MB at q8_0), 4 layers of 16
# experts (≈ 107 MB) and Mistral Small 4's attention (32 heads, q_lora 1024, kv_lora 256, rope 64, nope 64,
# v 128: ≈ 47 MB): about 450 MB, enough that every kernel runs at a real size, and the real model's
# flash-attention kernel (K 320, V 256, 32 query heads per KV head).
LARGE_SPEC = FixtureSpec(layout="native", hidden_size=1024, n_layers=4, n_heads=32, q_lora_rank=1024,
                         kv_lora_rank=256, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=128,
                         expert_ff=512, dense_ff=2048)
# The CPU reference: no layer on a GPU and no op offload (see the module's docstring).
ON_CPU = Placement(n_gpu_layers=0, op_offload=False)
# One load and its measurements take seconds; a child still running after this is hung.
CHILD_TIMEOUT = 600

BUFFER_LINE = re.compile(r"(\S+) (model|KV|compute) buffer size =\s*([\d.]+) MiB")
OVERRIDDEN = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")
# flash attention in llama.cpp's auto mode: kept on, or off because a device lacks the kernel
AUTO_FLASH = re.compile(r"Flash Attention (enabled|not supported, set to disabled)")
FLASH_MISMATCH = re.compile(r"layer \d+ is assigned to device (\S+) but Flash Attention is assigned to device (\S+)")


class NoGpu(SmallfourError):
    """The GPU self-check on a machine (or a llama.cpp build) without a GPU."""


@dataclass
class Check:
    model: str
    name: str
    ok: bool | None  # None: a measurement reported, not judged (or not applicable here)
    detail: str
    values: dict = field(default_factory=dict)


@dataclass
class Run:
    """One load of a model, measured."""

    logits: np.ndarray  # [PROMPT_TOKENS, vocab] for the fixed prompt
    greedy: list[int]
    margins: list[float]  # top-1 minus top-2 logit at each greedy step, over the logit range
    buffers: dict[str, dict[str, int]] = field(default_factory=dict)  # buffer name → {model|KV|compute: bytes}
    overridden: dict[str, str] = field(default_factory=dict)  # tensor → buffer type it was moved to
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    embeddings: np.ndarray | None = None
    log: str = ""  # llama.cpp's log of the load and the run


@dataclass(frozen=True)
class Subject:
    """A model to check: its GGUF, its projector (or None), a label; `real_attention`: the GGUF has Mistral
    Small 4's attention shape, so the GPU must run its flash attention."""

    label: str
    gguf: Path
    mmproj: Path | None = None
    real_attention: bool = False


# --- measuring --------------------------------------------------------------------------------------------------


def prompts(n_vocab: int) -> tuple[list[int], list[int]]:
    """The fixed prompt (logits) and the longer one (prefill speed): ordinary tokens, the same every run."""
    rng = np.random.default_rng(14)
    ordinary = (1000, min(n_vocab, 100_000))
    return [int(t) for t in rng.integers(*ordinary, PROMPT_TOKENS)], \
        [int(t) for t in rng.integers(*ordinary, SPEED_PROMPT_TOKENS)]


def parse_log(log: str) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """llama.cpp's load log → (buffer sizes by buffer name and kind, tensors moved by an override)."""
    buffers: dict[str, dict[str, int]] = {}
    for name, kind, mib in BUFFER_LINE.findall(log):
        held = buffers.setdefault(name, {})
        held[kind] = held.get(kind, 0) + round(float(mib) * MIB)
    return buffers, dict(OVERRIDDEN.findall(log))


def measure(subject: Subject, placement: Placement, *, speed: bool = False, vision: bool = False,
            capture_log: bool = True) -> Run:
    """Load `subject` as `placement` says and measure it; llama.cpp's log is captured into the run (or, with
    `capture_log` off, left on stderr for a parent process to read, even after an abort)."""
    from smallfour.model import Model

    log = io.StringIO()
    with contextlib.redirect_stderr(log) if capture_log else contextlib.nullcontext():
        model = Model.load(subject.gguf, n_ctx=N_CTX, placement=placement, verbose=True)
        try:
            prompt, long_prompt = prompts(model.n_vocab)
            logits = model.evaluate(prompt)
            model.reset()
            model.decode(prompt)
            greedy, margins = [], []
            for _ in range(DECODE_TOKENS):
                row = model.logits()
                top2 = np.partition(row, -2)[-2:]
                greedy.append(int(np.argmax(row)))
                margins.append(float((top2[1] - top2[0]) / max(float(np.ptp(row)), 1e-30)))
                model.decode([greedy[-1]])
            run = Run(logits, greedy, margins)
            if speed:
                run.prefill_tps, run.decode_tps = _speed(model, long_prompt)
            if vision and subject.mmproj is not None:
                run.embeddings = _embeddings(model, subject.mmproj, use_gpu=placement.n_gpu_layers != 0)
        finally:
            model.close()
    run.log = log.getvalue()
    run.buffers, run.overridden = parse_log(run.log)
    return run


def _speed(model, prompt: list[int]) -> tuple[float, float]:
    model.reset()
    started = time.perf_counter()
    model.decode(prompt)
    model.logits()  # reading the logits waits for the backend (a GPU returns from llama_decode before it is done)
    prefill = len(prompt) / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        model.decode([int(np.argmax(model.logits()))])
    return prefill, DECODE_TOKENS / (time.perf_counter() - started)


def _embeddings(model, mmproj: Path, *, use_gpu: bool) -> np.ndarray:
    from PIL import Image

    from smallfour.images import prepare_bytes
    from smallfour.vision import encode_image, open_projector

    pixels = np.random.default_rng(14).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    projector = open_projector(model, mmproj, use_gpu=use_gpu)
    try:
        return encode_image(projector, prepare_bytes("check.png", data.getvalue())).copy()
    finally:
        projector.close()


def measure_in_child(subject: Subject, placement: Placement, *, speed: bool = False, vision: bool = False) -> Run:
    """`measure` in a child process (`python -m smallfour.gpucheck`): an abort or a hang fails this run alone."""
    with tempfile.TemporaryDirectory(prefix="smallfour-gpucheck-") as scratch:
        out = Path(scratch) / "run.npz"
        command = [sys.executable, "-m", "smallfour.gpucheck", str(subject.gguf), str(subject.mmproj or ""), str(out),
                   json.dumps(asdict(placement)), json.dumps({"speed": speed, "vision": vision})]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise RunFailed(f"no result after {CHILD_TIMEOUT} s (hung; the child was killed)") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or ["no output"]
            how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
            raise RunFailed(f"the run failed ({how}): {lines[-1].strip()}", done.stderr)
        run = load_run(out)
    run.log = done.stderr
    run.buffers, run.overridden = parse_log(run.log)
    return run


class RunFailed(SmallfourError):
    """A measured run that did not finish; `log` is what its process wrote (llama.cpp's log, an abort's message)."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


def save_run(run: Run, path: Path) -> None:
    arrays = {"logits": run.logits, "greedy": np.array(run.greedy), "margins": np.array(run.margins)}
    if run.embeddings is not None:
        arrays["embeddings"] = run.embeddings
    meta = {"buffers": run.buffers, "overridden": run.overridden, "prefill_tps": run.prefill_tps,
            "decode_tps": run.decode_tps}
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def load_run(path: Path) -> Run:
    with np.load(path) as saved:
        meta = json.loads(str(saved["meta"]))
        return Run(saved["logits"], saved["greedy"].tolist(), saved["margins"].tolist(), meta["buffers"],
                   meta["overridden"], meta["prefill_tps"], meta["decode_tps"],
                   saved["embeddings"] if "embeddings" in saved else None)


# --- comparing ----------------------------------------------------------------------------------------------------


def relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    """max over rows of max |other − reference| / max |reference| (a row: one position's logits, one embedding)."""
    scale = np.maximum(np.abs(reference).max(axis=-1), 1e-30)
    return float((np.abs(other - reference).max(axis=-1) / scale).max())


def logits_check(model: str, name: str, reference: Run, run: Run) -> Check:
    error = relative_error(reference.logits, run.logits)
    same_argmax = float((reference.logits.argmax(-1) == run.logits.argmax(-1)).mean())
    return Check(model, name, error <= LOGITS_TOLERANCE,
                 f"logits vs CPU: max relative error {error:.2e} (≤ {LOGITS_TOLERANCE:g}), argmax agrees at "
                 f"{same_argmax:.0%} of {len(run.logits)} positions",
                 {"max_relative_error": error, "argmax_agreement": same_argmax, "tolerance": LOGITS_TOLERANCE})


def greedy_check(model: str, name: str, reference: Run, run: Run, against: str = "CPU") -> Check:
    """Same greedy tokens, or the first difference at a near-tie of the reference (then the texts part ways)."""
    first = next((i for i, (a, b) in enumerate(zip(reference.greedy, run.greedy)) if a != b), None)
    ok = first is None or reference.margins[first] < NEAR_TIE
    detail = (f"greedy tokens equal {against}'s ({len(run.greedy)} tokens)" if first is None else
              f"greedy tokens differ from {against}'s at token {first} (reference margin "
              f"{reference.margins[first]:.1e}{' < ' if ok else ' ≥ '}{NEAR_TIE:g}: "
              f"{'a near-tie' if ok else 'not a tie'})")
    return Check(model, name, ok, detail, {"first_difference": first})


def experts_check(model: str, name: str, gguf: Path, cpu_experts: str, run: Run, gpu_names: list[str]) -> Check:
    """The tensors `--cpu-experts` names are exactly those moved to the CPU, and the CPU buffers can hold them."""
    from quant.gguf_io import read_header

    header = read_header(gguf, what="model file")
    patterns = [re.compile(p) for p, _ in expert_overrides(cpu_experts, int(header.arch_field("block_count")))]
    expected = {t.name: t.nbytes for t in header.tensors if any(p.search(t.name) for p in patterns)}
    # host memory: CPU, or with a GPU present its pinned host buffers (CUDA_Host), which llama.cpp picks for "CPU"
    moved = {t for t, buft in run.overridden.items() if buft not in gpu_names}
    cpu_model = sum(kinds.get("model", 0) for buft, kinds in run.buffers.items() if buft not in gpu_names)
    ok = bool(expected) and moved == set(expected) and set(run.overridden) == moved \
        and cpu_model + len(run.buffers) * LOG_ROUNDING >= sum(expected.values())
    wrong = sorted(moved ^ set(expected))[:3]
    return Check(model, name, ok, f"{len(moved)} of {len(expected)} expert tensors moved to the CPU; CPU model "
                 f"buffers {cpu_model / MIB:.1f} MiB ≥ their {sum(expected.values()) / MIB:.1f} MiB"
                 + (f"; differing: {', '.join(wrong)}" if wrong else ""),
                 {"expected": len(expected), "moved": len(moved), "cpu_model_bytes": cpu_model,
                  "expert_bytes": sum(expected.values())})


def cpu_only_check(model: str, name: str, run: Run, gpu_names: list[str]) -> Check:
    """No weights and no KV cache on a GPU (compute buffers may be: llama.cpp keeps one per backend)."""
    on_gpu = {n: {k: v for k, v in run.buffers.get(n, {}).items() if k in ("model", "KV") and v}
              for n in gpu_names}
    on_gpu = {n: kinds for n, kinds in on_gpu.items() if kinds}
    return Check(model, name, not on_gpu, "no weights or KV cache on a GPU" if not on_gpu else
                 "on a GPU: " + "; ".join(f"{n} {k} {v / MIB:.1f} MiB" for n, kinds in on_gpu.items()
                                          for k, v in kinds.items()), {"on_gpu": on_gpu})


def offload_check(model: str, run: Run, gpu_names: list[str], weights_bytes: int, input_bytes: int) -> Check:
    """Everything on the GPU(s): their model buffers hold every weight but the token embedding (llama.cpp
    keeps the input layer on the CPU)."""
    on_gpu = sum(run.buffers.get(name, {}).get("model", 0) for name in gpu_names)
    wanted = weights_bytes - input_bytes
    ok = on_gpu + len(gpu_names) * LOG_ROUNDING >= wanted
    return Check(model, "all on GPU: placement", ok, f"GPU model buffers {on_gpu / MIB:.1f} MiB of the "
                 f"{wanted / MIB:.1f} MiB of weights besides the token embedding",
                 {"gpu_model_bytes": on_gpu, "expected_bytes": wanted})


def planner_checks(model: str, plan, run: Run, gpu_names: list[str]) -> list[Check]:
    """Per planned device: weights against llama.cpp's model buffers, KV against its KV buffer; compute reported."""
    checks = []
    for device_plan, buffer_names in zip(plan.devices, [[n] for n in gpu_names[:len(plan.devices) - 1]] + [None]):
        if buffer_names is None:  # the RAM: every buffer not on a planned GPU (CPU, CPU_Mapped, CUDA_Host, …)
            buffer_names = [n for n in run.buffers if n not in gpu_names]
        got = {kind: sum(run.buffers.get(n, {}).get(kind, 0) for n in buffer_names) for kind in ("model", "KV",
                                                                                                 "compute")}
        planned_weights = sum(device_plan.weights.values())
        planned_kv = device_plan.kv_bytes
        slack = len(buffer_names) * LOG_ROUNDING
        weights_ok = abs(got["model"] - planned_weights) <= PLANNER_WEIGHTS_TOLERANCE * planned_weights + slack
        kv_ok = abs(got["KV"] - planned_kv) <= slack
        planned_compute = device_plan.other.get("compute buffer", 0)
        checks.append(Check(model, f"planner: {device_plan.device.name}", weights_ok and kv_ok,
                            f"weights planned {planned_weights / MIB:.1f} MiB, llama.cpp {got['model'] / MIB:.1f}; "
                            f"KV {planned_kv / MIB:.2f} / {got['KV'] / MIB:.2f} MiB; "
                            f"compute {planned_compute / MIB:.1f} / {got['compute'] / MIB:.1f} MiB (reported)",
                            {"planned": {"weights": planned_weights, "kv": planned_kv, "compute": planned_compute},
                             "llama_cpp": got, "buffers": buffer_names}))
    return checks


def embeddings_check(model: str, reference: Run, run: Run) -> Check:
    error = relative_error(reference.embeddings, run.embeddings)
    return Check(model, "vision projector on GPU", error <= EMBEDDING_TOLERANCE,
                 f"image embeddings vs CPU: max relative error {error:.2e} (≤ {EMBEDDING_TOLERANCE:g}), "
                 f"{len(run.embeddings)} rows", {"max_relative_error": error, "tolerance": EMBEDDING_TOLERANCE})


def speed_check(model: str, reference: Run, run: Run, name: str = "speed") -> Check:
    return Check(model, name, None, f"prefill {run.prefill_tps:.0f} tok/s on GPU, {reference.prefill_tps:.0f} on "
                 f"CPU; decode {run.decode_tps:.1f} / {reference.decode_tps:.1f} tok/s",
                 {"gpu": {"prefill_tps": run.prefill_tps, "decode_tps": run.decode_tps},
                  "cpu": {"prefill_tps": reference.prefill_tps, "decode_tps": reference.decode_tps}})


# --- the whole check ----------------------------------------------------------------------------------------------


def flash_check(model: str, run: Run, judged: bool) -> Check:
    """What llama.cpp's auto mode chose for flash attention; `judged`: the model has the real attention shape,
    which the GPU backend must run (else a shape without a GPU kernel is reported, not judged)."""
    chose = AUTO_FLASH.findall(run.log)
    mismatch = FLASH_MISMATCH.search(run.log)
    on = chose == ["enabled"]
    detail = ("auto: on (the attention of every layer runs on that layer's device)" if on else
              f"auto: off ({f'flash attention falls to {mismatch[2]} beside layers on {mismatch[1]}' if mismatch else 'no kernel for this shape'})"
              if chose else "llama.cpp's log does not say what auto flash attention chose")
    return Check(model, "flash attention: auto", on if judged else None, detail, {"chose": chose})


def check_subject(subject: Subject, gpu_names: list[str], say=lambda text: None, log_dir: Path | None = None
                  ) -> list[Check]:
    """Every check on one model; `gpu_names` are llama.cpp's GPU devices (CUDA0, …) in order. A step whose run
    fails (or whose comparison breaks) is a failed check and the next step runs; `log_dir` keeps each run's log."""
    from smallfour.inventory import model_from_gguf
    from smallfour.planner import plan_for_load

    label = subject.label
    checks: list[Check] = []

    def run(step: str, placement: Placement, **options) -> Run | None:
        say(f"{label}: {step}")
        try:
            result = measure_in_child(subject, placement, **options)
        except RunFailed as exc:
            checks.append(Check(label, f"{step}: run", False, str(exc)))
            log = exc.log
            result = None
        else:
            log = result.log
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / f"{label}--{re.sub(r'[^A-Za-z0-9]+', '-', step).strip('-')}.log").write_text(log)
        return result

    @contextlib.contextmanager
    def step(name: str):
        try:
            yield
        except Exception as exc:  # a broken step is that step's failure; the others still say what they found
            checks.append(Check(label, name, False, f"{type(exc).__name__}: {exc}"))

    info = None
    with step("reading the GGUF"):
        info = model_from_gguf(subject.gguf)
    if info is None:
        return checks
    reference = run("CPU reference", ON_CPU, speed=True, vision=True)
    with step("CPU reference: on the CPU"):
        if reference is not None:
            checks.append(cpu_only_check(label, "CPU reference: on the CPU", reference, gpu_names))
    full = run("everything on the GPU", Placement(), speed=True, vision=True)
    with step("all on GPU"):
        if full is not None:
            if reference is not None:
                checks += [logits_check(label, "all on GPU: logits", reference, full),
                           greedy_check(label, "all on GPU: greedy", reference, full)]
            input_bytes = sum(t.nbytes for t in info.tensors if t.name == "token_embd.weight")
            checks.append(offload_check(label, full, gpu_names, info.weights_bytes, input_bytes))
    for cpu_experts in ("all", str(max(1, info.n_layers // 2))):
        moved = run(f"--cpu-experts {cpu_experts}", Placement(cpu_experts=cpu_experts))
        with step(f"--cpu-experts {cpu_experts}"):
            if moved is not None:
                if reference is not None:
                    checks.append(logits_check(label, f"--cpu-experts {cpu_experts}: logits", reference, moved))
                checks.append(experts_check(label, f"--cpu-experts {cpu_experts}: tensors on CPU", subject.gguf,
                                            cpu_experts, moved, gpu_names))
    with step("planner"):
        plan = plan_for_load(subject.gguf, N_CTX)
        params = plan.llama_params
        planned = Placement(n_gpu_layers=params["n_gpu_layers"], cpu_experts=str(params["cpu_experts"] or "none"),
                            tensor_split=tuple(float(v) for v in params["tensor_split"]) if params["tensor_split"]
                            else None, flash_attn=params["flash_attn"])
        laid_out = run("the planner's layout", planned)
        if laid_out is not None:
            checks += planner_checks(label, plan, laid_out, gpu_names)
    auto = run("flash attention: auto", Placement(flash_attn=None))
    with step("flash attention: auto"):
        if auto is not None:
            checks.append(flash_check(label, auto, subject.real_attention))
    # Flash attention rounds K, V and the scores through f16 where the exact path does not: its reference is
    # the CPU's flash attention.
    flash_reference = run("CPU reference with flash attention", replace(ON_CPU, flash_attn=True), speed=True)
    flash = run("flash attention on", Placement(flash_attn=True), speed=True)
    with step("flash attention on"):
        if flash is not None and flash_reference is not None:
            checks += [logits_check(label, "flash attention on: logits", flash_reference, flash),
                       greedy_check(label, "flash attention on: greedy", flash_reference, flash),
                       speed_check(label, flash_reference, flash, "speed, flash attention on")]
    if len(gpu_names) >= 2:
        row = run("row split", Placement(split_mode="row"))
        with step("row vs layer split"):
            if row is not None and full is not None:
                checks.append(greedy_check(label, "row vs layer split: greedy", full, row, against="layer split's"))
    else:
        checks.append(Check(label, "row vs layer split: greedy", None, f"not run: {len(gpu_names)} GPU(s)"))
    with step("vision and speed"):
        if full is not None and reference is not None:
            if subject.mmproj is not None:
                checks.append(embeddings_check(label, reference, full))
            checks.append(speed_check(label, reference, full))
    return checks


def gpu_names_or_refuse() -> list[str]:
    """llama.cpp's GPU devices, or `NoGpu` with what this build and machine have."""
    import llama_cpp

    from smallfour.placement import backend_names, gpu_devices

    gpus = [d.name for d in gpu_devices()]
    if not gpus or not llama_cpp.llama_supports_gpu_offload():
        backends = "+".join(backend_names()) or "none"
        raise NoGpu(f"llama.cpp sees no GPU (backends of this build: {backends}); the GPU self-check needs a "
                    "GPU build on a GPU machine (smallfour doctor says what to rebuild)")
    return gpus


def default_subjects(say=lambda text: None) -> list[Subject]:
    """The demo model (with its projector) and a few-hundred-MB fixture, built and converted once (cached)."""
    from convert.writer import convert_checkpoint
    from smallfour.fixtures.checkpoint import build_fixture
    from smallfour.store import mmproj_for

    subjects = []
    # The demo's GGUF is the one `smallfour demo` converts (same cache); the large one goes beside its checkpoint.
    for label, spec, name, vision in (("demo", DEMO_SPEC, "demo-q8_0.gguf", True),
                                      ("fixture-450MB", LARGE_SPEC, "q8_0.gguf", False)):
        say(f"{label}: building and converting (once; cached)")
        gguf = build_fixture(spec) / name
        if not gguf.exists():
            convert_checkpoint(build_fixture(spec), gguf, "q8_0")
        subjects.append(Subject(label, gguf, mmproj_for(gguf) if vision else None, real_attention=spec is LARGE_SPEC))
    return subjects


def run_checks(subjects: list[Subject], gpu_names: list[str], say=lambda text: None, log_dir: Path | None = None,
               report_path: Path | None = None) -> dict:
    """Every check on every subject; `report_path` gets the report so far after each subject (`complete`
    false until the last), so a check cut short still leaves what it found."""
    checks: list[Check] = []
    for done, subject in enumerate(subjects, 1):
        checks += check_subject(subject, gpu_names, say, log_dir)
        report = {"gpus": gpu_names, "passed": not any(c.ok is False for c in checks),
                  "complete": done == len(subjects),
                  "tolerances": {"logits": LOGITS_TOLERANCE, "embeddings": EMBEDDING_TOLERANCE, "near_tie": NEAR_TIE,
                                 "planner_weights": PLANNER_WEIGHTS_TOLERANCE},
                  "checks": [asdict(c) for c in checks]}
        if report_path is not None:
            write_report(report_path, report)
    return report


def write_report(path: Path, report: dict) -> None:
    """The JSON report, written under a temporary name and renamed (never half a file)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        raise SmallfourError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        temporary.unlink(missing_ok=True)


def _child_main(arguments: list[str]) -> None:
    """`python -m smallfour.gpucheck GGUF MMPROJ|'' OUT.npz PLACEMENT_JSON OPTIONS_JSON`: one measured run."""
    gguf, mmproj, out, placement, options = arguments
    fields = json.loads(placement)
    fields["tensor_split"] = tuple(fields["tensor_split"]) if fields["tensor_split"] is not None else None
    fields["overrides"] = tuple(tuple(o) for o in fields["overrides"])
    subject = Subject("child", Path(gguf), Path(mmproj) if mmproj else None)
    save_run(measure(subject, Placement(**fields), **json.loads(options), capture_log=False), Path(out))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
