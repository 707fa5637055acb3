"""`--recipe fit:SIZE`: routed-expert types per layer so that the file lands just under SIZE.

Everything but the routed experts gets fixed types (BASE_ROLES, ~3 B weights of the real
model; the token embeddings Q6_K, or Q4_K when the budget is too tight for that); each
routed-expert tensor (one `ffn_gate_up_exps` and one `ffn_down_exps` per layer: one GGUF
tensor has one type) then gets a type from a ladder, greedily: start every
tensor on the lowest rung and repeatedly take the upgrade that buys the most error
reduction per byte, while it fits.

Error model: a type's relative RMS error on Gaussian rows (RELATIVE_RMSE, measured with
quant.ggml), squared, weighted per tensor by

- with an imatrix: the tensor's mean importance (mean squared input activation, all
  experts) divided by the mean of the tensors of its kind (gate_up or down), so the layers
  whose experts see large activations get the bits;
- without one, the heuristic llama.cpp's recipes use: down projections ×1.5, the first and
  last 11 % of layers ×2.

Sizes come from `stored_nbytes` (the same function the planner uses), plus the GGUF
overhead (header, vocabulary, alignment) when the caller knows it.
"""

from __future__ import annotations

import heapq
import re

import numpy as np
from gguf import GGMLQuantizationType

from quant.errors import SmallfourError
from quant.imatrix import tensor_importance
from quant.names import (ROLE_ATTENTION, ROLE_DENSE_FFN, ROLE_EMBEDDINGS, ROLE_OUTPUT, ROLE_ROUTED_EXPERTS,
                         ROLE_SHARED_EXPERT)
from quant.recipes import Recipe, TensorSlot, compatible, stored_nbytes

T = GGMLQuantizationType

# Relative RMS error (RMSE / RMS of the values) on standard-normal rows of 512, no imatrix.
RELATIVE_RMSE = {
    T.Q8_0: 0.0054, T.Q6_K: 0.0177, T.Q5_K: 0.0363, T.Q4_K: 0.0712, T.IQ4_XS: 0.0769, T.Q3_K: 0.152,
    T.IQ3_S: 0.166, T.IQ3_XXS: 0.190, T.Q2_K: 0.296, T.IQ2_S: 0.257, T.IQ2_XS: 0.311, T.IQ2_XXS: 0.353,
}
LADDER_PLAIN = (T.Q2_K, T.Q3_K, T.IQ4_XS, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
LADDER_IMATRIX = (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
# The token embeddings: Q6_K, or Q4_K when the budget cannot hold Q6_K beside the experts' lowest rung. On the
# proxy (docs/recipes.md) Q4_K embeddings alone cost KL 0.0086 and Q6_K 0.0008, for ≈0.14 GB on Mistral Small 4.
EMBEDDINGS_TYPES = (T.Q6_K, T.Q4_K)
BASE_ROLES = ((ROLE_OUTPUT, T.Q6_K), (ROLE_ATTENTION, T.Q8_0),
              (ROLE_SHARED_EXPERT, T.Q8_0), (ROLE_DENSE_FFN, T.Q8_0))
EDGE_FRACTION = 0.11

_SIZE = re.compile(r"^\s*([\d.]+)\s*(tb|tib|gb|gib|mb|mib|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "mb": 10**6, "gb": 10**9, "tb": 10**12, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_UNIT_NAMES = {"b": "bytes", "mb": "MB", "gb": "GB", "tb": "TB", "mib": "MiB", "gib": "GiB", "tib": "TiB"}


def parse_budget(text: str) -> int:
    """"60GB" (10^9 bytes, as file sizes are usually quoted), "56GiB" (2^30), "500MB" → bytes."""
    m = _SIZE.match(text)
    if not m:
        raise SmallfourError(f"fit:{text}: cannot read the size; write e.g. fit:60GB or fit:56GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "gb").lower()])


def in_unit_of(n: int, written: str) -> str:
    """`n` bytes in the unit a `fit:SIZE` was written in (`fit:30MB` → "40.9 MB"), so an answer reads like the question."""
    m = _SIZE.match(written)
    unit = (m.group(2) or "gb").lower() if m else "gb"
    return f"{n:,} bytes" if unit == "b" else f"{n / _UNITS[unit]:,.1f} {_UNIT_NAMES[unit]}"


def _is_edge(layer: int | None, n_layers: int) -> bool:
    if layer is None:
        return False
    edge = max(1, int(np.ceil(EDGE_FRACTION * n_layers)))
    return layer < edge or layer >= n_layers - edge


def _kind(name: str) -> str:
    return "down" if "down" in name else "gate_up"


def fit_recipe(budget: int, slots: list[TensorSlot], n_layers: int, importance: dict[str, np.ndarray] | None = None, *,
               overhead_bytes: int | None = 0, name: str = "fit", written: str | None = None) -> Recipe:
    """Routed-expert types per layer so the file lands under `budget` bytes (`written`: the SIZE as the user typed
    it, for messages). `overhead_bytes` is the header and vocabulary; None when not measured yet, so a budget the
    tensors alone exceed is refused before the (slow) measurement."""
    written = written or f"{budget / 1e9:g}GB"
    measured = overhead_bytes is not None
    overhead_bytes = overhead_bytes or 0
    experts = [s for s in slots if s.role == ROLE_ROUTED_EXPERTS]
    if not experts:
        raise SmallfourError("fit: this model has no routed-expert tensors to size")
    with_imatrix = importance is not None and all(tensor_importance(importance, s) is not None for s in experts)
    ladder = LADDER_IMATRIX if with_imatrix else LADDER_PLAIN
    weights = _weights(experts, n_layers, importance if with_imatrix else None)

    def size(slot, rung: int) -> int:
        return stored_nbytes(slot.shape, compatible(ladder[rung], slot.shape).qtype)

    def cost(slot, rung: int) -> float:
        return RELATIVE_RMSE[ladder[rung]] ** 2

    for embeddings in EMBEDDINGS_TYPES:
        roles = ((ROLE_EMBEDDINGS, embeddings), *BASE_ROLES)
        base = Recipe(name, T.Q8_0, roles)
        total = overhead_bytes + sum(size(s, 0) for s in experts) + sum(
            stored_nbytes(s.shape, base.choose(s.name, s.role, s.layer, s.shape, n_layers).qtype)
            for s in slots if s.role != ROLE_ROUTED_EXPERTS)
        if total <= budget:
            break
    rung = {s.name: 0 for s in experts}
    if total > budget:
        raise SmallfourError(f"fit:{written} is too small; the smallest this model gets is "
                             f"{'' if measured else 'more than '}{in_unit_of(total, written)} (experts {ladder[0].name}"
                             f"{'' if with_imatrix else '; an imatrix allows IQ2 types'})")

    def best_step(s) -> tuple[float, int] | None:
        here, best = rung[s.name], None
        for k in range(here + 1, len(ladder)):
            extra = size(s, k) - size(s, here)
            gain = weights[s.name] * s_params(s) * (cost(s, here) - cost(s, k))
            if extra > 0 and gain > 0 and (best is None or gain / extra > best[0]):
                best = (gain / extra, k)
        return best

    heap = []
    for i, s in enumerate(experts):
        step = best_step(s)
        if step:
            heapq.heappush(heap, (-step[0], i, step[1]))
    while heap:
        _, i, k = heapq.heappop(heap)
        s = experts[i]
        extra = size(s, k) - size(s, rung[s.name])
        if total + extra > budget:
            continue  # the next upgrade of this tensor does not fit; others may
        total += extra
        rung[s.name] = k
        step = best_step(s)
        if step:
            heapq.heappush(heap, (-step[0], i, step[1]))
    fixed = tuple((s.name, ladder[rung[s.name]]) for s in experts)
    described = f"fitted to {_size(budget)} ({_size(total)} planned), " + \
        ("imatrix-weighted" if with_imatrix else "heuristic: down projections and first/last layers first")
    return Recipe(name, T.Q8_0, roles, (), described, fixed)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def s_params(slot) -> int:
    return int(np.prod(slot.shape, dtype=np.int64))


def _weights(experts, n_layers: int, importance) -> dict[str, float]:
    if importance is None:
        return {s.name: (1.5 if _kind(s.name) == "down" else 1.0) * (2.0 if _is_edge(s.layer, n_layers) else 1.0)
                for s in experts}
    means = {s.name: float(np.mean(tensor_importance(importance, s))) for s in experts}
    kind_mean = {k: np.mean([m for n, m in means.items() if _kind(n) == k]) or 1.0 for k in ("down", "gate_up")}
    return {n: max(m / kind_mean[_kind(n)], 1e-6) for n, m in means.items()}
