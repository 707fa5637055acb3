"""`smallfour doctor --check-gpu` on this CPU build: the refusal, and every comparison fed CPU-against-CPU runs.

The GPU runs themselves need a GPU (bench/gpu_selfcheck.sh); here the same code compares a CPU
reference (n_gpu_layers 0, op offload off) with other CPU loads, where every check must hold
except the one that asks for weights on a GPU, and the comparisons must fail on planted errors.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.console import Console

from conftest import NATIVE
from helpers import assert_one_line_error, run_cli
from smallfour import gpucheck
from smallfour.gpucheck import Run, Subject


def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    result = run_cli("doctor", "--check-gpu", "-o", tmp_path / "report.json")
    assert_one_line_error(result, "llama.cpp sees no GPU (backends of this build: CPU)")
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def demo_subject(tmp_path_factory):
    """The demo's checkpoint converted to q8_0, with its projector."""
    from convert.writer import convert_checkpoint
    from smallfour.fixtures.checkpoint import build_fixture
    from smallfour.store import mmproj_for

    gguf = tmp_path_factory.mktemp("gpucheck") / "demo-q8_0.gguf"
    convert_checkpoint(build_fixture(NATIVE), gguf, "q8_0")
    return Subject("demo", gguf, mmproj_for(gguf))


def test_cpu_against_cpu_every_comparison_holds(demo_subject, tmp_path):
    report = gpucheck.run_checks([demo_subject], [])
    checks = {c["name"]: c for c in report["checks"]}
    judged = {name: c["ok"] for name, c in checks.items() if c["ok"] is not None}
    # No GPU: the one placement check that wants weights on a GPU fails, and so does the whole check.
    assert judged.pop("all on GPU: placement") is False and report["passed"] is False
    assert judged and all(judged.values()), {n: checks[n]["detail"] for n, ok in judged.items() if not ok}
    assert {"all on GPU: logits", "all on GPU: greedy", "--cpu-experts all: logits",
            "--cpu-experts all: tensors on CPU", "--cpu-experts 1: logits", "--cpu-experts 1: tensors on CPU",
            "vision projector on GPU"} <= set(judged)
    assert any(name.startswith("planner: CPU RAM") for name in judged)
    assert checks["--cpu-experts all: tensors on CPU"]["values"]["moved"] == 2 * 2  # gate_up and down, 2 layers
    assert checks["--cpu-experts 1: tensors on CPU"]["values"]["moved"] == 2
    assert checks["speed"]["values"]["cpu"]["decode_tps"] > 0
    # The CPU reference ran in another process with the same kernels: the logits agree exactly.
    assert checks["all on GPU: logits"]["values"]["max_relative_error"] == 0
    path = tmp_path / "report.json"
    gpucheck.write_report(path, report)
    assert json.loads(path.read_text()) == report and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    from smallfour.cli.doctor import gpu_table

    console = Console(file=io.StringIO(), width=300)
    console.print(gpu_table(report))
    table = console.file.getvalue()
    assert "GPU self-check on no GPU" in table and "FAIL" in table and "--cpu-experts 1: tensors on CPU" in table


def _run(logits, greedy=(1, 2, 3), margins=(0.5, 0.5, 0.5), **fields) -> Run:
    return Run(np.asarray(logits, dtype=np.float32), list(greedy), list(margins), **fields)


def test_logits_and_embeddings_beyond_the_tolerance_fail():
    rng = np.random.default_rng(0)
    reference = _run(rng.normal(size=(4, 100)))
    close = _run(reference.logits + 0.5 * gpucheck.LOGITS_TOLERANCE * np.abs(reference.logits).max())
    far = _run(reference.logits.copy())
    far.logits[2, 7] += 3 * gpucheck.LOGITS_TOLERANCE * np.abs(reference.logits[2]).max()
    assert gpucheck.logits_check("m", "x", reference, close).ok is True
    assert gpucheck.logits_check("m", "x", reference, far).ok is False
    reference.embeddings, far.embeddings = reference.logits, far.logits
    assert gpucheck.embeddings_check("m", reference, far).ok is False


def test_greedy_tokens_may_part_only_at_a_near_tie():
    reference = _run(np.zeros((1, 4)), greedy=(5, 6, 7), margins=(0.3, gpucheck.NEAR_TIE / 2, 0.3))
    assert gpucheck.greedy_check("m", "g", reference, _run(np.zeros((1, 4)), greedy=(5, 6, 7))).ok is True
    assert gpucheck.greedy_check("m", "g", reference, _run(np.zeros((1, 4)), greedy=(5, 9, 1))).ok is True
    parted = gpucheck.greedy_check("m", "g", reference, _run(np.zeros((1, 4)), greedy=(8, 6, 7)))
    assert parted.ok is False and "at token 0" in parted.detail


LOG = """load_tensors: tensor blk.0.ffn_down_exps.weight (q8_0) buffer type overridden to CPU
load_tensors:   CPU_Mapped model buffer size =   123.50 MiB
load_tensors:        CUDA0 model buffer size =  2048.00 MiB
llama_kv_cache:      CUDA0 KV buffer size =     0.38 MiB
llama_context:      CUDA0 compute buffer size =   259.19 MiB
llama_context:  CUDA_Host compute buffer size =     8.01 MiB
"""


def test_llama_cpp_log_is_read_into_buffers_and_overrides():
    buffers, overridden = gpucheck.parse_log(LOG)
    assert overridden == {"blk.0.ffn_down_exps.weight": "CPU"}
    assert buffers == {"CPU_Mapped": {"model": round(123.5 * 2**20)}, "CUDA0": {"model": 2048 * 2**20,
                       "KV": round(0.38 * 2**20), "compute": round(259.19 * 2**20)},
                       "CUDA_Host": {"compute": round(8.01 * 2**20)}}


def test_experts_left_on_the_gpu_or_extra_tensors_moved_fail(demo_subject):
    gguf = demo_subject.gguf
    from quant.gguf_io import read_header

    experts = [t.name for t in read_header(gguf).tensors if "_exps" in t.name]
    cpu = {"CPU_Mapped": {"model": 64 * 2**20}}
    assert gpucheck.experts_check("m", "e", gguf, "all", _run(np.zeros((1, 2)), buffers=cpu,
                                  overridden=dict.fromkeys(experts, "CPU")), ["CUDA0"]).ok is True
    missing = gpucheck.experts_check("m", "e", gguf, "all", _run(np.zeros((1, 2)), buffers=cpu,
                                     overridden=dict.fromkeys(experts[1:], "CPU")), ["CUDA0"])
    assert missing.ok is False and experts[0] in missing.detail
    extra = dict.fromkeys(experts, "CPU") | {"blk.0.attn_q_a.weight": "CPU"}
    assert gpucheck.experts_check("m", "e", gguf, "all", _run(np.zeros((1, 2)), buffers=cpu, overridden=extra),
                                  ["CUDA0"]).ok is False
    tiny_cpu = {"CPU_Mapped": {"model": 0}}
    assert gpucheck.experts_check("m", "e", gguf, "all", _run(np.zeros((1, 2)), buffers=tiny_cpu,
                                  overridden=dict.fromkeys(experts, "CPU")), ["CUDA0"]).ok is False


def test_planner_bytes_off_by_more_than_the_tolerance_fail(demo_subject):
    from smallfour.hardware import profile
    from smallfour.inventory import model_from_gguf
    from smallfour.planner import Settings, plan

    info = model_from_gguf(demo_subject.gguf)
    planned = plan(info, profile("24GB+128GB"), Settings(n_ctx=gpucheck.N_CTX))
    gpu, ram = planned.devices[0], planned.devices[-1]
    exact = {"CUDA0": {"model": sum(gpu.weights.values()), "KV": gpu.kv_bytes},
             "CPU_Mapped": {"model": sum(ram.weights.values())}, "CPU": {"KV": ram.kv_bytes}}
    assert all(c.ok for c in gpucheck.planner_checks("m", planned, _run(np.zeros((1, 2)), buffers=exact), ["CUDA0"]))
    off = json.loads(json.dumps(exact))
    off["CUDA0"]["model"] = int(exact["CUDA0"]["model"] * 1.05) + 2 * 2**20
    checks = gpucheck.planner_checks("m", planned, _run(np.zeros((1, 2)), buffers=off), ["CUDA0"])
    assert [c.ok for c in checks] == [False, True]



def test_auto_flash_attention_read_from_the_log():
    on = _run(np.zeros((1, 2)), log="llama_context: flash_attn = auto\nresolve_fused_ops: Flash Attention enabled\n")
    off = _run(np.zeros((1, 2)), log="resolve_fused_ops: layer 0 is assigned to device CUDA0 but Flash Attention is "
               "assigned to device CPU (usually due to missing support)\n"
               "resolve_fused_ops: Flash Attention not supported, set to disabled\n")
    assert gpucheck.flash_check("m", on, judged=True).ok is True
    refused = gpucheck.flash_check("m", off, judged=True)
    assert refused.ok is False and "falls to CPU beside layers on CUDA0" in refused.detail
    assert gpucheck.flash_check("m", off, judged=False).ok is None  # a shape without a GPU kernel: reported
    assert gpucheck.flash_check("m", _run(np.zeros((1, 2)), log=""), judged=True).ok is False


def test_a_step_whose_run_fails_is_a_failed_check_and_the_rest_still_run(demo_subject, tmp_path):
    broken = tmp_path / "mmproj.gguf"
    broken.write_text("not a projector")
    checks = gpucheck.check_subject(Subject("demo", demo_subject.gguf, broken), [], log_dir=tmp_path / "logs")
    failed = {c.name: c.detail for c in checks if c.ok is False}
    # The two runs that read the projector fail, each in one line; what needs neither of them is still checked.
    assert {"CPU reference: run", "everything on the GPU: run"} <= set(failed), failed
    assert all(detail.startswith("the run failed (exit 1): ") and "\n" not in detail
               for name, detail in failed.items() if name.endswith(": run"))
    passed = {c.name for c in checks if c.ok}
    assert {"--cpu-experts all: tensors on CPU", "flash attention on: logits", "flash attention on: greedy"} <= passed
    assert next(c for c in checks if c.name == "flash attention: auto").detail.startswith("auto: on")
    logs = {p.name for p in (tmp_path / "logs").iterdir()}
    assert "demo--CPU-reference.log" in logs and "demo--flash-attention-on.log" in logs
    assert "Traceback" in (tmp_path / "logs" / "demo--CPU-reference.log").read_text()


def test_experts_moved_to_pinned_host_memory_count_as_on_the_cpu(demo_subject):
    """With a GPU present llama.cpp puts a "CPU" override in the GPU's pinned host buffers (CUDA_Host; seen on an
    H200): those are host memory; a tensor left on the GPU is not."""
    from quant.gguf_io import read_header

    experts = [t.name for t in read_header(demo_subject.gguf).tensors if "_exps." in t.name]
    host = {"CUDA_Host": {"model": 2**30}, "CUDA0": {"model": 2**20}}
    pinned = _run(np.zeros((1, 2)), buffers=host, overridden=dict.fromkeys(experts, "CUDA_Host"))
    assert gpucheck.experts_check("m", "e", demo_subject.gguf, "all", pinned, ["CUDA0"]).ok is True
    on_gpu = _run(np.zeros((1, 2)), buffers=host, overridden=dict.fromkeys(experts, "CUDA0"))
    assert gpucheck.experts_check("m", "e", demo_subject.gguf, "all", on_gpu, ["CUDA0"]).ok is False


def test_the_cpu_reference_must_hold_nothing_on_a_gpu():
    cpu = _run(np.zeros((1, 2)), buffers={"CPU_Mapped": {"model": 2**20}, "CPU": {"KV": 2**10},
                                          "CUDA0": {"compute": 2**20}})
    assert gpucheck.cpu_only_check("m", "c", cpu, ["CUDA0"]).ok is True
    leaked = _run(np.zeros((1, 2)), buffers={"CUDA0": {"model": 2**20, "compute": 2**20}})
    check = gpucheck.cpu_only_check("m", "c", leaked, ["CUDA0"])
    assert check.ok is False and "CUDA0 model 1.0 MiB" in check.detail
