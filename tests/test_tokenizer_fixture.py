"""The v15 tokenizer fixture must agree with mistral-common, the reference implementation.

Every check compares a file we write against what mistral-common computes, so a wrong id,
a missing merge or a template drift shows up as a concrete mismatch. Random texts use a
fresh seed on every run; it is part of every failure message.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from mistral_common.exceptions import InvalidRequestException
from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion, Tokenized
from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV15
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from PIL import Image
from tokenizers import Tokenizer

from smallfour.fixtures.tokenizer import (
    v15_chat_template,
    write_chat_template,
    write_hf_tokenizer,
    write_tekken_v15,
)

# Written out rather than imported from the module so that a changed id there fails here.
EXPECTED_SPECIAL_IDS = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "[INST]": 3,
    "[/INST]": 4,
    "[AVAILABLE_TOOLS]": 5,
    "[/AVAILABLE_TOOLS]": 6,
    "[TOOL_RESULTS]": 7,
    "[/TOOL_RESULTS]": 8,
    "[TOOL_CALLS]": 9,
    "[IMG]": 10,
    "<pad>": 11,
    "[IMG_BREAK]": 12,
    "[IMG_END]": 13,
    "[PREFIX]": 14,
    "[MIDDLE]": 15,
    "[SUFFIX]": 16,
    "[SYSTEM_PROMPT]": 17,
    "[/SYSTEM_PROMPT]": 18,
    "[TOOL_CONTENT]": 19,
    "<SPECIAL_20>": 20,
    "[ARGS]": 32,
    "[CALL_ID]": 33,
    "[THINK]": 34,
    "[/THINK]": 35,
    "[MODEL_SETTINGS]": 36,
    "[/MODEL_SETTINGS]": 37,
    "<SPECIAL_38>": 38,
    "<SPECIAL_999>": 999,
}

# Ids mistral-common produces on the released Mistral-Small-4-119B-2603 tekken.json
# (bos=True), as recorded by the tekken-rs test-suite; they pin the vocabulary to the release.
RELEASED_IDS = {
    "Hello, world!": [1, 22177, 1044, 4304, 1033],
    "The quick brown fox jumps over the lazy dog.": [
        1, 1784, 7586, 22980, 94137, 72993, 2136, 1278, 42757, 10575, 1046,
    ],
    "función común días 日本語 🎉": [1, 12127, 1963, 35239, 20608, 30367, 15199, 119685, 1142, 1137],
}


@dataclass(frozen=True)
class Built:
    directory: Path
    tekken: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    directory = tmp_path_factory.mktemp("smallfour_tokenizer")
    tekken = directory / "tekken.json"
    write_tekken_v15(tekken)
    write_hf_tokenizer(directory, tekken)
    write_chat_template(directory)
    return Built(directory=directory, tekken=tekken)


@pytest.fixture(scope="module")
def mistral(built: Built) -> MistralTokenizer:
    return MistralTokenizer.from_file(built.tekken)


@pytest.fixture(scope="module")
def tekken(mistral: MistralTokenizer) -> Tekkenizer:
    tokenizer = mistral.instruct_tokenizer.tokenizer
    assert isinstance(tokenizer, Tekkenizer)
    return tokenizer


@pytest.fixture(scope="module")
def hf(built: Built) -> Tokenizer:
    return Tokenizer.from_file(str(built.directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def specials_re(tekken: Tekkenizer) -> re.Pattern[str]:
    specials = [tekken.id_to_piece(i) for i in range(tekken.num_special_tokens)]
    # Longest first, so the alternation is leftmost-longest like tokenizers' added-token matcher.
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


@pytest.fixture
def seeded() -> tuple[int, random.Random]:
    seed = int.from_bytes(os.urandom(8), "little")
    print(f"random seed: {seed}")
    return seed, random.Random(seed)


_PUNCTUATION = [*"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"]
_PUNCTUATION += ["...", "--", "->", "::", "«", "»", "¿", "¡", "—", "“", "”"]
_WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", "\u00a0", "\u3000"]
_ACCENTED = "àáâäãåāçćčèéêëēėęîïíīįìłñńôöòóœøōõßśšûüùúūÿžźżÅÉÎÑÖÜ"
_EMOJI = ["🎉", "😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "❤️", "🚀", "🤖", "🧪", "✨"]


def _random_piece(rng: random.Random) -> str:
    kind = rng.randrange(9)
    if kind == 0:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 12)))
        return rng.choice([word, word.capitalize(), word.upper()])
    if kind == 1:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 9)))
    if kind == 2:
        return "".join(rng.choice(_PUNCTUATION) for _ in range(rng.randint(1, 3)))
    if kind == 3:
        return rng.choice(_WHITESPACE)
    if kind == 4:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz" + _ACCENTED) for _ in range(rng.randint(1, 10)))
    if kind == 5:
        return "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 6)))
    if kind == 6:
        return "".join(rng.choice(_EMOJI) for _ in range(rng.randint(1, 3)))
    if kind == 7:
        # Cyrillic, Greek, Arabic, Devanagari, Hiragana: other scripts the pattern splits on.
        scripts = [(0x0410, 0x044F), (0x03B1, 0x03C9), (0x0627, 0x064A), (0x0905, 0x0939), (0x3041, 0x3096)]
        low, high = rng.choice(scripts)
        return "".join(chr(rng.randint(low, high)) for _ in range(rng.randint(1, 8)))
    return chr(rng.randint(0x20, 0x2FFF))


def _random_text(rng: random.Random, specials_re: re.Pattern[str]) -> str:
    while True:
        pieces = [_random_piece(rng) for _ in range(rng.randint(1, 40))]
        text = "".join(p + (rng.choice(_WHITESPACE) if rng.random() < 0.4 else "") for p in pieces)
        # Tekken never parses special tokens in text while tokenizers always does, so a text
        # that happens to spell "<s>" is not a valid plain-text comparison.
        if not specials_re.search(text):
            return text


def _reference_ids(tekken: Tekkenizer, text: str, specials_re: re.Pattern[str]) -> list[int]:
    """Tekken ids for ``text`` with special-token strings mapped to their ids."""
    ids: list[int] = []
    pos = 0
    for match in specials_re.finditer(text):
        ids += tekken.encode(text[pos : match.start()], bos=False, eos=False)
        ids.append(tekken.get_special_token(match.group()))
        pos = match.end()
    return ids + tekken.encode(text[pos:], bos=False, eos=False)


def _render(template: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """Render like transformers' ``apply_chat_template`` does (sandbox, trim/lstrip blocks)."""

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **options: Any) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **options)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, **kwargs)


def _reference_text(mistral: MistralTokenizer, encoded: Tokenized) -> str:
    """The prompt text mistral-common produced for ``encoded`` (what ``Tokenized.text`` holds)."""
    decoded = mistral.decode(encoded.tokens, special_token_policy=SpecialTokenPolicy.KEEP)
    # Tokenized.text is deprecated in favour of the decode above; while it exists both must agree.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy = getattr(encoded, "text", decoded)
    assert legacy == decoded
    return decoded


def _request(messages: list[dict[str, Any]], reasoning_effort: str | None) -> ChatCompletionRequest:
    extra = {} if reasoning_effort is None else {"reasoning_effort": reasoning_effort}
    # A deep copy, so that CHAT_CASES stays exactly what the template is rendered with.
    return ChatCompletionRequest.from_openai(messages=copy.deepcopy(messages), **extra)


def test_tekken_loads_as_v15(mistral: MistralTokenizer, tekken: Tekkenizer) -> None:
    assert mistral.instruct_tokenizer.tokenizer.version == TokenizerVersion.v15
    assert isinstance(mistral.instruct_tokenizer, InstructTokenizerV15)
    assert tekken.n_words == 131072
    assert tekken.num_special_tokens == 1000
    assert {s: tekken.get_special_token(s) for s in EXPECTED_SPECIAL_IDS} == EXPECTED_SPECIAL_IDS
    assert (tekken.bos_id, tekken.eos_id, tekken.pad_id, tekken.unk_id) == (1, 2, 11, 0)

    image_encoder = mistral.instruct_tokenizer.image_encoder
    assert image_encoder is not None
    config = image_encoder.image_config
    assert (config.image_patch_size, config.max_image_size, config.spatial_merge_size) == (14, 1540, 2)
    ids = image_encoder.special_ids
    assert (ids.img, ids.img_break, ids.img_end) == (10, 12, 13)

    builder = tekken.model_settings_builder
    assert builder is not None and builder.reasoning_effort is not None
    assert [str(v) for v in builder.reasoning_effort.values] == ["none", "high"]
    assert str(builder.reasoning_effort.default) == "none"


def test_vocabulary_matches_released_ids(tekken: Tekkenizer, hf: Tokenizer) -> None:
    for text, ids in RELEASED_IDS.items():
        assert tekken.encode(text, bos=True, eos=False) == ids, text
        assert [1, *hf.encode(text).ids] == ids, text


def test_hf_vocab_and_special_ids(tekken: Tekkenizer, hf: Tokenizer) -> None:
    assert hf.get_vocab_size(with_added_tokens=True) == 131072
    for rank in range(tekken.num_special_tokens):
        piece = tekken.id_to_piece(rank)
        assert hf.token_to_id(piece) == rank, piece
        assert hf.id_to_token(rank) == piece, rank
    added = hf.get_added_tokens_decoder()
    assert len(added) == 1000 and all(token.special for token in added.values())


def test_hf_encodes_random_text_like_tekken(
    tekken: Tekkenizer, hf: Tokenizer, specials_re: re.Pattern[str], seeded: tuple[int, random.Random]
) -> None:
    seed, rng = seeded
    texts = [_random_text(rng, specials_re) for _ in range(400)]
    texts.append("".join(texts))
    for text in texts:
        expected = tekken.encode(text, bos=False, eos=False)
        got = hf.encode(text, add_special_tokens=False).ids
        assert got == expected, f"seed={seed} text={text!r}"
        assert hf.decode(got) == text, f"seed={seed} text={text!r}"
        assert tekken.decode(expected) == text, f"seed={seed} text={text!r}"


def test_special_token_text_parses_to_tekken_ids(
    tekken: Tekkenizer, hf: Tokenizer, specials_re: re.Pattern[str], seeded: tuple[int, random.Random]
) -> None:
    seed, rng = seeded
    named = list(EXPECTED_SPECIAL_IDS)
    every = [tekken.id_to_piece(i) for i in range(tekken.num_special_tokens)]
    fixed = "<s>[SYSTEM_PROMPT]sys[/SYSTEM_PROMPT][INST]Q?[/INST][THINK]hm[/THINK]A.</s>[IMG][IMG_BREAK][IMG_END]"
    texts = [fixed]
    for _ in range(100):
        parts = []
        for _ in range(rng.randint(1, 8)):
            parts.append(rng.choice(named if rng.random() < 0.7 else every))
            if rng.random() < 0.7:
                parts.append(_random_text(rng, specials_re))
        texts.append("".join(parts))
    for text in texts:
        expected = _reference_ids(tekken, text, specials_re)
        got = hf.encode(text, add_special_tokens=False).ids
        assert got == expected, f"seed={seed} text={text!r}"
        assert hf.decode(got, skip_special_tokens=False) == text, f"seed={seed} text={text!r}"
    assert hf.encode(fixed).ids[:2] == [1, 17]


CHAT_CASES: dict[str, tuple[list[dict[str, Any]], str | None]] = {
    "user_only": ([{"role": "user", "content": "Hello there! How are you today?"}], None),
    "system_user": (
        [
            {"role": "system", "content": "You are a terse assistant.\nAnswer in French."},
            {"role": "user", "content": "What is the capital of Japan? 日本"},
        ],
        None,
    ),
    "multi_turn": (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Another one, please."},
        ],
        None,
    ),
    "multi_turn_thinking": (
        [
            {"role": "user", "content": "2+2?"},
            {
                "role": "assistant",
                "content": [{"type": "thinking", "thinking": "Simple sum."}, {"type": "text", "text": "4"}],
            },
            {"role": "user", "content": "And 3+3?"},
        ],
        "high",
    ),
    "effort_none": ([{"role": "user", "content": "Quick answer: sky colour?"}], "none"),
    "effort_high": (
        [
            {"role": "system", "content": "Think carefully."},
            {"role": "user", "content": "Prove that √2 is irrational."},
        ],
        "high",
    ),
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_template_matches_mistral_common(case: str, mistral: MistralTokenizer, hf: Tokenizer) -> None:
    messages, effort = CHAT_CASES[case]
    kwargs = {} if effort is None else {"reasoning_effort": effort}
    rendered = _render(v15_chat_template(), messages, **kwargs)
    encoded = mistral.encode_chat_completion(_request(messages, effort))

    assert rendered == _reference_text(mistral, encoded)
    # BOS is literal text in both, and must come out as exactly one id 1.
    assert rendered.startswith("<s>") and encoded.tokens[0] == 1 and encoded.tokens.count(1) == 1
    assert f'[MODEL_SETTINGS]{{"reasoning_effort": "{effort or "none"}"}}[/MODEL_SETTINGS]' in rendered
    assert hf.encode(rendered, add_special_tokens=False).ids == encoded.tokens


def test_chat_template_rejects_unsupported_effort(mistral: MistralTokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TemplateError, match="reasoning_effort"):
        _render(v15_chat_template(), messages, reasoning_effort="low")
    with pytest.raises(InvalidRequestException):
        mistral.encode_chat_completion(_request(messages, "low"))


def test_chat_template_is_what_mistral_common_derives_from_the_file(built: Built) -> None:
    assert v15_chat_template() == convert_tokenizer_to_chat_template(built.tekken, use_special_token_variables=False)
    assert (built.directory / "chat_template.jinja").read_text(encoding="utf-8") == v15_chat_template()


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_image_chunk_encodes_and_template_marks_it(mistral: MistralTokenizer) -> None:
    image = Image.new("RGB", (84, 56), "red")  # 3 x 2 tokens of 28 px (14 px patches, 2x2 merge)
    request = ChatCompletionRequest.from_openai(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe:"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _png_base64(image)}},
                ],
            }
        ]
    )
    encoded = mistral.encode_chat_completion(request)
    start = encoded.tokens.index(10)
    assert encoded.tokens[start : start + 8] == [10, 10, 10, 12, 10, 10, 10, 13]
    assert len(encoded.images) == 1 and encoded.images[0].shape == (3, 56, 84)
    # mistral-common's real OpenCV path: a plain red image stays plain red, normalized per channel.
    red = (np.array([1.0, 0.0, 0.0]) - (0.48145466, 0.4578275, 0.40821073)) / (0.26862954, 0.26130258, 0.27577711)
    np.testing.assert_allclose(encoded.images[0], np.broadcast_to(red[:, None, None], (3, 56, 84)), atol=1e-5)

    rendered = _render(v15_chat_template(), request.to_openai()["messages"])
    # The template marks an image with one [IMG]; the processor expands it into the grid.
    text = _reference_text(mistral, encoded)
    collapsed = text.replace("[IMG]", "").replace("[IMG_BREAK]", "").replace("[IMG_END]", "[IMG]")
    assert rendered == collapsed


def test_transformers_loads_the_directory(built: Built, mistral: MistralTokenizer) -> None:
    from transformers import AutoTokenizer

    config = json.loads((built.directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    assert specials == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    # llama.cpp's converter reads these flags; the template already starts with "<s>".
    assert (config["add_bos_token"], config["add_eos_token"]) == (False, False)

    tokenizer = AutoTokenizer.from_pretrained(built.directory)
    assert len(tokenizer) == 131072
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    assert ids == (1, 2, 11, 0)
    # Like Tekkenizer.encode(bos=False): no BOS/EOS on plain encode.
    assert tokenizer("Hello, world!")["input_ids"] == RELEASED_IDS["Hello, world!"][1:]

    messages, effort = CHAT_CASES["multi_turn_thinking"]
    encoded = mistral.encode_chat_completion(_request(messages, effort))
    text = tokenizer.apply_chat_template(messages, tokenize=False, reasoning_effort=effort)
    assert text == _reference_text(mistral, encoded)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == encoded.tokens
