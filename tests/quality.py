"""How far a quantized GGUF's predictions move from a reference GGUF's, on text, through llama.cpp.

The measure `llama-perplexity --kl-divergence` reports: over every position of
held-out text (chunks of `n_ctx` tokens, `<s>` first, KV cache cleared between
chunks), the KL divergence KL(P_ref ‖ P_quant) of the next-token distributions
over the whole vocabulary, and how often both models rank the same token first.
All models run in lockstep chunk by chunk, so only one chunk of reference
logits is held at a time. Used by tests and by bench/quant_quality.py (which puts tests/ on its path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Divergence:
    positions: int = 0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    top1_same: int = 0
    nll_sum: float = 0.0  # of the quantized model on the text's next tokens
    kl_chunks: list[np.ndarray] = field(default_factory=list)  # per position, for percentiles

    @property
    def kl_positions(self) -> np.ndarray:
        return np.concatenate(self.kl_chunks) if self.kl_chunks else np.zeros(0)

    @property
    def kl(self) -> float:
        return self.kl_sum / max(self.positions, 1)

    @property
    def top1(self) -> float:
        return self.top1_same / max(self.positions, 1)

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll_sum / max(self.positions, 1)))


def text_chunks(model, text: str, n_ctx: int) -> list[list[int]]:
    """The text's tokens in whole chunks of `n_ctx`, each starting with `<s>` (as llama-perplexity does)."""
    tokens = model.tokenize(text, add_bos=True)
    bos = model.bos
    return [[bos, *tokens[i * n_ctx + 1:(i + 1) * n_ctx]] for i in range(len(tokens) // n_ctx)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def measure(reference: Path, variants: dict[str, Path], chunks: list[list[int]], n_ctx: int,
            threads: int | None = None, group: int = 6) -> dict[str, Divergence]:
    """KL / top-1 / perplexity of every variant against `reference` over `chunks`.

    At most `group` variants are loaded at once (the reference runs again for each group).
    """
    from smallfour.model import Model

    def load(path: Path) -> Model:
        return Model.load(path, n_ctx=n_ctx, kv_type="f32", n_threads=threads)

    results = {label: Divergence() for label in variants}
    labels = list(variants)
    ref_model = load(reference)
    for first in range(0, len(labels), group):
        models = {label: load(variants[label]) for label in labels[first:first + group]}
        for chunk in chunks:
            ref = log_softmax(ref_model.evaluate(chunk))[:-1]
            p = np.exp(ref)
            ref_top = ref.argmax(-1)
            targets = np.array(chunk[1:])
            for label, model in models.items():
                got = log_softmax(model.evaluate(chunk))[:-1]
                kl = (p * (ref - got)).sum(-1)
                r = results[label]
                r.positions += len(kl)
                r.kl_sum += float(kl.sum())
                r.kl_max = max(r.kl_max, float(kl.max()))
                r.kl_chunks.append(kl)
                r.top1_same += int((got.argmax(-1) == ref_top).sum())
                r.nll_sum += float(-got[np.arange(len(targets)), targets].sum())
        for model in models.values():
            model.close()
        del models
    ref_model.close()
    return results
