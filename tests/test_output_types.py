"""Output types: our encoders give the bytes gguf-py's reference quantizers give, and fall back when needed."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from quant.recipes import choose_type, encode, stored_nbytes


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0])
def test_encode_matches_gguf_reference(qtype):
    seed = int.from_bytes(os.urandom(4), "little")
    values = (np.random.default_rng(seed).standard_normal((37, 256)) * 10).astype(np.float32)
    ours = encode(values, qtype)
    assert ours.nbytes == stored_nbytes(values.shape, qtype)
    assert ours.tobytes() == quantize(values, qtype).tobytes(), f"seed {seed}"
    restored = dequantize(ours.view(np.uint8).reshape(values.shape[0], -1), qtype)
    assert np.abs(restored - values).max() <= {T.F32: 0, T.F16: 0.02, T.BF16: 0.3, T.Q8_0: 0.3}[qtype]


def test_type_choice():
    assert choose_type(T.Q8_0, "norm", (128,)).qtype == T.F32
    assert choose_type(T.Q8_0, "router", (16, 128)).qtype == T.F32
    assert choose_type(T.Q8_0, "routed_experts", (16, 128, 64)).qtype == T.Q8_0
    fallback = choose_type(T.Q8_0, "attention", (4, 32, 16))
    assert fallback.qtype == T.F16 and fallback.fallback_from == T.Q8_0
    assert choose_type(T.BF16, "attention", (4, 32, 16)).qtype == T.BF16
