"""quant.ggml: our binding's bytes are llama.cpp's, errors are what the types promise.

References: llama.cpp's own quantizer (`llama_model_quantize`, run on an f32 GGUF of a
fixture whose rows suit K-quants), gguf-py's numpy quantizers and dequantizers. Data and
importance vectors are fresh random draws (seeds printed on failure).
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest

from quant import ggml
from quant.fit import RELATIVE_RMSE
from quant.gguf_io import read_header, read_tensor
from llamacpp import llama_quantize
from quant.pipeline import bits_per_weight
from quant.recipes import compatible
from quant_fixtures import KQUANT

T = gguf.GGMLQuantizationType
QUANTIZED = [t for t in ggml.supported_types() if t not in (T.F32, T.F16, T.BF16)]


def fresh_rng() -> tuple[int, np.random.Generator]:
    seed = int.from_bytes(os.urandom(4), "little")
    return seed, np.random.default_rng(seed)


@pytest.fixture(scope="module")
def f32_gguf(converted):
    return converted(KQUANT, "f32")


def _importance_for(path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random positive importance for every quantizable matrix but the embeddings and output."""
    out = {}
    for t in read_header(path).tensors:
        if len(t.shape) < 2 or t.name in ("token_embd.weight", "output.weight") or "ffn_gate_inp" in t.name:
            continue
        values = rng.gamma(0.5, 1.0, size=(t.shape[0] if len(t.shape) == 3 else 1, t.shape[-1])).astype(np.float32)
        out[t.name] = values[0] if len(t.shape) == 2 else values
    return out


def _compare_with_llama(f32_gguf, tmp_path, qtype, importance):
    out = tmp_path / f"{qtype.name}.gguf"
    llama_quantize(f32_gguf, out, qtype, importance=importance, threads=2, embeddings_type=T.Q8_0,
                   output_type=T.Q8_0)
    source = read_header(f32_gguf)
    result = read_header(out)
    compared = 0
    for ref in result.tensors:
        if ref.name in ("token_embd.weight", "output.weight") or ref.qtype == T.F32:
            continue
        values = np.asarray(read_tensor(source, ref.name), dtype=np.float32)
        expected = compatible(qtype, values.shape)
        assert ref.qtype == expected.qtype, f"{ref.name}: llama.cpp chose {ref.qtype.name}"
        imp = importance.get(ref.name) if importance else None
        if imp is not None and imp.ndim == 2:
            ours = np.stack([ggml.quantize(values[j], expected.qtype, imp[j]) for j in range(values.shape[0])])
        else:
            ours = ggml.quantize(values.reshape(-1, values.shape[-1]), expected.qtype, imp)
        assert np.array_equal(ours.reshape(-1), np.asarray(read_tensor(result, ref.name)).reshape(-1)), f"{ref.name} differs"
        compared += 1
    return compared


@pytest.mark.parametrize("qtype", [t for t in QUANTIZED if not ggml.requires_importance(t)], ids=lambda t: t.name)
def test_bytes_equal_llama_quantize(f32_gguf, tmp_path, qtype):
    assert _compare_with_llama(f32_gguf, tmp_path, qtype, None) >= 20


@pytest.mark.parametrize("qtype", [t for t in QUANTIZED if ggml.requires_importance(t)]
                         + [T.Q2_K, T.Q4_K, T.IQ4_XS],
                         ids=lambda t: t.name)
def test_bytes_equal_llama_quantize_with_importance(f32_gguf, tmp_path, qtype):
    seed, rng = fresh_rng()
    importance = _importance_for(f32_gguf, rng)
    assert _compare_with_llama(f32_gguf, tmp_path, qtype, importance) >= 20, f"seed {seed}"


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_dequantized_error_is_what_the_type_promises(qtype):
    seed, rng = fresh_rng()
    x = rng.standard_normal((96, 512)).astype(np.float32)
    imp = rng.gamma(0.5, 1.0, 512).astype(np.float32) if ggml.requires_importance(qtype) else None
    q = ggml.quantize(x, qtype, imp)
    assert q.shape == (96, 512 // ggml.block_size(qtype) * gguf.GGML_QUANT_SIZES[qtype][1])
    back = gguf.quants.dequantize(q, qtype).reshape(x.shape)
    rel = float(np.sqrt(np.mean((back - x) ** 2)) / np.sqrt(np.mean(x ** 2)))
    # Loose bound from the bits: about half a step of a (bpw - 2)-bit grid.
    assert rel < 1.6 * 2.0 ** -(bits_per_weight(qtype) - 2), f"seed {seed}: relative RMSE {rel:.4f}"
    if qtype in RELATIVE_RMSE and imp is None:
        # The error table fit:SIZE plans with (measured once) still holds.
        assert 0.7 * RELATIVE_RMSE[qtype] < rel < 1.3 * RELATIVE_RMSE[qtype], f"seed {seed}: {rel:.4f}"
    try:
        reference = gguf.quants.quantize(x, qtype)
    except NotImplementedError:
        return
    assert np.array_equal(reference.view(np.uint8).reshape(q.shape), q), f"seed {seed}: differs from gguf-py"


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q3_K, T.IQ4_XS, T.IQ2_XS, T.Q6_K])
def test_importance_lowers_the_weighted_error(qtype):
    seed, rng = fresh_rng()
    x = rng.standard_normal((128, 512)).astype(np.float32)
    imp = (rng.gamma(0.3, 1.0, 512) ** 2).astype(np.float32)

    def weighted(q):
        back = gguf.quants.dequantize(q, qtype).reshape(x.shape)
        return float(np.sum(imp * (back - x) ** 2))

    flat = ggml.quantize(x, qtype, np.ones(512, np.float32))
    assert weighted(ggml.quantize(x, qtype, imp)) < 0.9 * weighted(flat), f"seed {seed}"


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.IQ4_XS, T.IQ2_XXS, T.IQ1_M, T.TQ1_0])
def test_threads_give_identical_bytes(qtype):
    seed, rng = fresh_rng()
    x = rng.standard_normal((77, 768)).astype(np.float32)  # rows not divisible by the thread counts
    imp = rng.gamma(0.5, 1.0, 768).astype(np.float32)
    one = ggml.quantize(x, qtype, imp, threads=1)
    for threads in (2, 3, 8, None):
        assert np.array_equal(one, ggml.quantize(x, qtype, imp, threads=threads)), f"seed {seed}, {threads}"


def test_imatrix_types_refuse_without_importance():
    assert {t for t in QUANTIZED if ggml.requires_importance(t)} == \
        {T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS}
    x = np.ones((2, 256), np.float32)
    for qtype in (T.IQ1_S, T.IQ2_XXS, T.IQ3_XXS):
        with pytest.raises(ggml.QuantizationError, match="requires an importance matrix"):
            ggml.quantize(x, qtype)


@pytest.mark.parametrize("call,message", [
    (lambda: ggml.quantize(np.ones((2, 100), np.float32), T.Q8_0), "multiple of 32"),
    (lambda: ggml.quantize(np.ones((2, 128), np.float32), T.Q4_K), "multiple of 256"),
    (lambda: ggml.quantize(np.ones(256, np.float32), T.Q4_K), "2-D rows"),
    (lambda: ggml.quantize(np.full((1, 32), np.nan, np.float32), T.Q8_0), "NaN"),
    (lambda: ggml.quantize(np.ones((1, 256), np.float32), T.Q4_K, np.ones(128, np.float32)), "one value per column"),
    (lambda: ggml.quantize(np.ones((1, 256), np.float32), T.Q4_K, -np.ones(256, np.float32)), "negative"),
    (lambda: ggml.quantize(np.ones((1, 256), np.float32), T.Q8_1), "cannot quantize to Q8_1"),
    (lambda: ggml.quantize(np.ones((1, 256), np.float32), T.Q4_K, threads=0), "at least 1"),
])
def test_bad_requests_raise_instead_of_aborting(call, message):
    with pytest.raises(ggml.QuantizationError, match=message):
        call()
