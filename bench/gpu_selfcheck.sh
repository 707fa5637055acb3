#!/usr/bin/env bash
# The GPU self-check in one call, on a CUDA machine without network: install smallfour from an offline
# bundle for one CUDA architecture, then run `smallfour doctor --check-gpu`.
#
#   bench/gpu_selfcheck.sh BUNDLE [OUT]
#
# BUNDLE: a directory written by `smallfour bundle` for this machine's Python (`--python-version`, and
# `--platform manylinux_2_28_x86_64` when built elsewhere). OUT (default: $OUT, else .cache/gpu-selfcheck):
# machine.txt, install.log, doctor.txt, gpu-selfcheck.txt and gpu-selfcheck.json, timings.txt, and
# llama-logs.tar.gz (llama.cpp's log of every run the check made).
# CUDA_ARCH (default 90: H100/H200) and VENV (default .cache/gpu-selfcheck-venv) may be set. A second run
# reuses the venv's llama-cpp-python build (install.sh skips it) and the cached fixtures, so a run cut
# short by a time limit resumes where it stopped. Needs the CUDA toolkit (nvcc) and CMake >= 3.21.
set -euo pipefail

BUNDLE="${1:?usage: bench/gpu_selfcheck.sh BUNDLE [OUT]}"
OUT="${2:-${OUT:-.cache/gpu-selfcheck}}"
CUDA_ARCH="${CUDA_ARCH:-90}"
VENV="${VENV:-.cache/gpu-selfcheck-venv}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# Fixtures and the model store in the (ignored) .cache beside the checkout, kept between runs.
export SMALLFOUR_CACHE="${SMALLFOUR_CACHE:-$PWD/.cache}" SMALLFOUR_HOME="${SMALLFOUR_HOME:-$PWD/.cache/gpu-selfcheck-home}"
export HF_HUB_OFFLINE=1

{ date -u; nvidia-smi || true; nvcc --version || true; cmake --version | head -1; python3 -V; nproc; free -g; } \
  > "$OUT/machine.txt" 2>&1
started=$(date +%s)
"$BUNDLE/install.sh" --venv "$VENV" --cuda "$CUDA_ARCH" > "$OUT/install.log" 2>&1 \
  || { tail -20 "$OUT/install.log"; echo "error: the install from $BUNDLE failed (all of it: $OUT/install.log)" >&2; exit 1; }
installed=$(date +%s)
echo "install (llama-cpp-python for sm_$CUDA_ARCH, or reused): $((installed - started)) s" | tee "$OUT/timings.txt"
"$VENV/bin/smallfour" doctor > "$OUT/doctor.txt" 2>&1 || true
status=0
LOGS="$(mktemp -d)/llama-logs"
"$VENV/bin/smallfour" doctor --check-gpu -o "$OUT/gpu-selfcheck.json" --logs "$LOGS" 2>&1 \
  | tee "$OUT/gpu-selfcheck.txt" || status=${PIPESTATUS[0]}
[ -d "$LOGS" ] && tar czf "$OUT/llama-logs.tar.gz" -C "$(dirname "$LOGS")" llama-logs
echo "self-check: $(($(date +%s) - installed)) s, exit $status" | tee -a "$OUT/timings.txt"
exit "$status"
