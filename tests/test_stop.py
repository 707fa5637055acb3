"""Stop strings (OpenAI's `stop`): the answer ends before the earliest occurrence of any of them.

Checked for the whole-answer cut (`apply_stop`, batch and non-streamed replies) and the streamed
one (`StopFilter`, fed in random pieces, where the answer ends with the piece that completes a stop
string) against a brute-force reference, on answers where several stop strings match at different
places (fresh random texts; the seed is printed).
"""

from __future__ import annotations

import os
import random

import pytest

from smallfour.completion import GenerationResult
from smallfour.openai import StopFilter, apply_stop


def reference_cut(text: str, stop: tuple[str, ...]) -> int | None:
    """The first position at which any stop string starts, by trying every position."""
    return next((i for i in range(len(text)) if any(text.startswith(s, i) for s in stop)), None)


def cut_whole(text: str, stop: tuple[str, ...]) -> GenerationResult:
    result = GenerationResult(content=text, finish_reason="length")
    apply_stop(result, stop)
    return result


def pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)]) if b > a]


def streamed(chunks: list[str], stop: tuple[str, ...]) -> tuple[str, bool]:
    """What StopFilter lets through when the answer arrives in these pieces, and whether it stopped."""
    flt = StopFilter(stop)
    out = [flt.feed(chunk) for chunk in chunks]
    out.append(flt.flush())
    return "".join(out), flt.hit


def streamed_reference(chunks: list[str], stop: tuple[str, ...]) -> tuple[str, bool]:
    """Generation stops with the first piece after which a stop string has appeared; what was
    generated up to there is cut before the earliest stop string in it."""
    generated = ""
    for chunk in chunks:
        generated += chunk
        cut = reference_cut(generated, stop)
        if cut is not None:
            return generated[:cut], True
    return generated, False


@pytest.mark.parametrize(("text", "stop", "expected"), [
    ("one two three", ("three", "two"), "one "),  # both match: the earlier one in the text wins
    ("one two three", ("two", "three"), "one "),  # whatever their order in the list
    ("abcdef", ("cd", "bcde"), "a"),  # overlapping matches, the longer one starting first
    ("a¿b€c", ("€", "¿"), "a"),  # characters, not bytes
    ("x STOP y END", ("END", "STOP", "absent"), "x "),
    ("no match here", ("zzz",), "no match here"),
])
def test_the_earliest_stop_string_cuts(text, stop, expected):
    result = cut_whole(text, stop)
    assert result.content == expected
    assert result.finish_reason == ("stop" if expected != text else "length")
    assert streamed([text], stop) == (expected, expected != text)  # the whole answer in one piece


def test_streaming_stops_at_the_first_stop_string_completed():
    # "cd" is complete after "abcd"; "bcde" starts earlier but the answer has ended before it completes.
    assert streamed(list("abcdef"), ("cd", "bcde")) == ("ab", True)
    assert streamed(["ab", "cde", "f"], ("cd", "bcde")) == ("a", True)  # both complete in one piece


def test_random_answers_with_several_matching_stop_strings():
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    several = 0
    for _ in range(500):
        # A two-letter alphabet: stop strings match often, and often several of them.
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 30)))
        stop = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3)))
        cut = reference_cut(text, stop)
        expected = text if cut is None else text[:cut]
        several += sum(s in text for s in stop) > 1
        result = cut_whole(text, stop)
        assert (result.content, result.finish_reason) == (expected, "length" if cut is None else "stop"), \
            f"seed {seed}: {text!r} {stop!r}"
        chunks = pieces(text, rng)
        assert streamed(chunks, stop) == streamed_reference(chunks, stop), f"seed {seed}: {chunks!r} {stop!r}"
    assert several > 100, f"seed {seed}: only {several} answers matched several stop strings"
