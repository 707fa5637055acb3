"""The engine: sequences decoded together give what they give alone; slots, prefixes and stops behave.

Numerics run on the trained fixture (a network with real structure, so near-ties are rare)
converted to F32 and q8_0. Prompts are fresh held-out text every run (the seed is printed on
failure).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import HF
from smallfour.completion import ChatRequest, Sampling, resolve_request
from smallfour.engine import Engine
from smallfour.fixtures.trained import heldout_text, trained_checkpoint
from smallfour.generation import complete, prompt_with_images
from smallfour.model import Model

N_SEQ = 8
STEPS = 24


@pytest.fixture(scope="module")
def trained_gguf(tmp_path_factory):
    from convert.writer import convert_checkpoint

    made = {}

    def make(recipe: str):
        if recipe not in made:
            path = tmp_path_factory.mktemp("engine") / f"trained-{recipe}.gguf"
            convert_checkpoint(trained_checkpoint(), path, recipe, mmproj=False)
            made[recipe] = path
        return made[recipe]

    return make


def fresh_prompts(model: Model, count: int) -> tuple[int, list[list[int]]]:
    """`count` prompts of 24–60 tokens cut at random places from the held-out text (8 fit one batch)."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    tokens = model.tokenize(heldout_text().read_text())
    prompts = []
    for _ in range(count):
        length = int(rng.integers(24, 61))
        start = int(rng.integers(0, len(tokens) - length))
        prompts.append([model.bos, *tokens[start:start + length]])
    return seed, prompts


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# Measured here (8 sequences of 24–60 tokens in one batch vs each alone, 3 draws of 8): max relative
# error of the last-position logits 3.0e-7 in F32 (the matmuls run over other row counts), exactly 0 in
# q8_0. The bar, 1e-5, is 30× the worst seen and far below what a mixed-up sequence or position gives (≈1).
@pytest.mark.parametrize("recipe, tolerance", [("f32", 1e-5), ("q8_0", 1e-5)])
def test_a_sequence_among_others_gets_its_own_logits(trained_gguf, recipe, tolerance):
    path = trained_gguf(recipe)
    with Model.load(path, n_ctx=128, kv_type="f32") as alone:
        seed, prompts = fresh_prompts(alone, N_SEQ)
        expected = []
        for prompt in prompts:
            alone.reset()
            alone.decode(prompt)
            expected.append(alone.logits().copy())
    with Model.load(path, n_ctx=128, n_seq=N_SEQ, kv_type="f32") as together:
        indices = together.decode_batch([(seq, prompt, True) for seq, prompt in enumerate(prompts)])
        for seq, (index, want) in enumerate(zip(indices, expected)):
            error = relative_error(together.logits(index), want)
            assert error < tolerance, f"seed {seed}: sequence {seq} relative error {error:.2e}"
        # Then one token each, all in one batch, as the engine decodes: still each one's own.
        nexts = [int(np.argmax(want)) for want in expected]
        indices = together.decode_batch([(seq, [token], True) for seq, token in enumerate(nexts)])
        after = [together.logits(i).copy() for i in indices]
    with Model.load(path, n_ctx=128, kv_type="f32") as alone:
        for seq, (prompt, token) in enumerate(zip(prompts, nexts)):
            alone.reset()
            alone.decode([*prompt, token])
            error = relative_error(after[seq], alone.logits())
            assert error < tolerance, f"seed {seed}: sequence {seq}, second step, relative error {error:.2e}"


def test_parallel_greedy_equals_one_at_a_time(trained_gguf):
    """`--parallel 8` vs `--parallel 1`: the same greedy tokens, except after a near-tie."""
    path = trained_gguf("q8_0")
    greedy = Sampling(temperature=0.0, max_tokens=STEPS)
    with Model.load(path, n_ctx=160) as alone:
        seed, prompts = fresh_prompts(alone, 12)
        one_by_one = [complete_tokens(alone, prompt, greedy) for prompt in prompts]
    with Model.load(path, n_ctx=160, n_seq=N_SEQ) as model:
        engine = Engine(model)
        jobs = [engine.submit(ChatRequest([], sampling=greedy), prompt) for prompt in prompts]
        while engine.busy:
            engine.step()
        assert sum(job.result.finish_reason in ("length", "stop") for job in jobs) == len(jobs)
    with Model.load(path, n_ctx=160, kv_type="f32") as reference:
        for seq, (prompt, want, job) in enumerate(zip(prompts, one_by_one, jobs)):
            got = job.result.tokens
            if got == want:
                continue
            step = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            reference.reset()
            reference.decode([*prompt, *want[:step]])
            top2 = np.sort(reference.logits())[-2:]
            gap = float(top2[1] - top2[0]) / float(np.abs(reference.logits()).max())
            assert gap < 1e-3, (f"seed {seed}: request {seq} differs at step {step} ({got[step]} vs {want[step]}) "
                                f"with a relative top-2 gap of {gap:.1e}")


def complete_tokens(model: Model, prompt: list[int], sampling: Sampling) -> list[int]:
    engine = Engine(model)
    job = engine.submit(ChatRequest([], sampling=sampling), prompt)
    engine.run(job)
    return job.result.tokens


def test_slots_share_a_system_prompt_and_free_up(converted):
    """More requests than slots: each finished request frees its slot at once, later ones start from the
    system prompt another slot holds (copied, not evaluated), and every answer equals its answer alone."""
    system = {"role": "system", "content": "You answer in one short sentence. " * 12}
    requests = [resolve_request([system, {"role": "user", "content": f"Tell me about item {i}."}],
                                temperature=0.0, max_tokens=6 + 3 * (i % 4)) for i in range(10)]
    with Model.load(converted(HF, "f32"), n_ctx=512) as alone:
        expected = [complete(alone, r).tokens for r in requests]
    with Model.load(converted(HF, "f32"), n_ctx=512, n_seq=3) as model:
        engine = Engine(model)
        busiest = 0
        jobs = []
        for request in requests:
            _, tokens, spans = prompt_with_images(model, request)
            jobs.append(engine.submit(request, tokens, spans))
        while engine.busy:
            engine.step()
            busiest = max(busiest, engine.active)
    assert busiest == 3
    assert [job.result.tokens for job in jobs] == expected
    system_tokens = jobs[0].result.prompt_tokens - 20  # the user turn is far shorter than the system prompt
    # Only the first request reads the system prompt; the others wait a step and copy it.
    assert jobs[0].result.cached_tokens == 0
    assert all(job.result.cached_tokens > system_tokens for job in jobs[1:]), [j.result.cached_tokens for j in jobs]


def test_stopping_one_request_leaves_the_others(converted):
    with Model.load(converted(HF, "f32"), n_ctx=256, n_seq=2) as model:
        engine = Engine(model)
        request = resolve_request([{"role": "user", "content": "Count."}], temperature=0.0, max_tokens=12)
        _, tokens, _ = prompt_with_images(model, request)
        pieces = []
        stopped = engine.submit(request, tokens, should_stop=lambda: len(pieces) >= 3, on_event=pieces.append)
        going = engine.submit(request, tokens)
        while engine.busy:
            engine.step()
    assert stopped.result.finish_reason == "interrupted" and 3 <= stopped.result.completion_tokens < 12
    assert going.result.completion_tokens == 12 or going.result.finish_reason == "stop"
    assert going.result.tokens[:stopped.result.completion_tokens] == stopped.result.tokens
