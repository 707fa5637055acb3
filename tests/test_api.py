"""The public Python API (`import smallfour`), used the way docs/api.md shows it, and nothing else."""

from __future__ import annotations

import pytest

import smallfour
from conftest import HF


def test_convert_load_generate_stream_plan_quantize(checkpoint, tmp_path):
    gguf = tmp_path / "m.gguf"
    report = smallfour.convert(checkpoint(HF), gguf, recipe="bf16")
    assert gguf.is_file() and (tmp_path / "m-mmproj.gguf").is_file(), report

    plan = smallfour.plan(gguf, hardware="cpu-96GB", n_ctx=2048)
    assert plan.fits

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}]
    with smallfour.load(gguf, mmproj=tmp_path / "m-mmproj.gguf", n_ctx=1024) as model:
        answer = smallfour.generate(model, messages, temperature=0.7, seed=11, max_tokens=12)
        assert answer.completion_tokens > 0 and answer.finish_reason in ("stop", "length")
        events = list(smallfour.stream_generate(model, messages, temperature=0.7, seed=11, max_tokens=12))
        assert events[-1].kind == "finish"
        streamed = "".join(e.text for e in events if e.kind == "content")
        # Same seed, same prompt: the same tokens, whether streamed or not, and the second turn
        # read the prompt from the cache.
        assert events[-1].result.tokens == answer.tokens
        assert streamed == events[-1].result.content == answer.content
        assert events[-1].result.cached_tokens == answer.prompt_tokens - 1
        assert smallfour.generate(model, "Hello", max_tokens=4).prompt_tokens > 0
        with pytest.raises(smallfour.SmallfourError, match=r"messages\[0\] \(user\) has empty content"):
            smallfour.generate(model, " ")

    smaller = tmp_path / "m-q4.gguf"
    smallfour.quantize(gguf, smaller, "q4_k")
    assert 0 < smaller.stat().st_size < gguf.stat().st_size


def test_errors_are_smallfour_errors(tmp_path):
    with pytest.raises(smallfour.SmallfourError, match="does not exist"):
        smallfour.load(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(smallfour.SmallfourError, match="is not a GGUF file"):
        smallfour.load(tmp_path / "junk.gguf")
