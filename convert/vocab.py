"""The Tekken tokenizer and the chat template, read once per conversion and written into the GGUF.

Tokens, merges and special tokens come from the checkpoint's `tekken.json` via gguf-py's
`MistralVocab` (which reads it with mistral-common), so llama.cpp tokenizes exactly as
Mistral does. The file is loaded once: the vocabulary, the template probes and the template
mistral-common derives all use that one tokenizer.

The chat template is the one the checkpoint ships (`chat_template.jinja`, else `chat_template`
in `tokenizer_config.json`) when it renders a few probe conversations to exactly the token ids
mistral-common encodes for them; otherwise, or when none ships, the template mistral-common
derives for the tokenizer's version, the format's ground truth (and the convert output says so).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf.vocab import MistralTokenizerType, MistralVocab
from jinja2 import TemplateError
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokens
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from convert.chat_template import compiled, control_pattern
from convert.errors import ConversionError

# A tool for the probes: mistral-common renders its schema, the template must render the same.
_PROBE_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@dataclass(frozen=True)
class Vocabulary:
    """What `add_vocabulary` writes, computed once per conversion (a `fit:` recipe writes the header twice)."""

    vocab: MistralVocab
    tokens: list[bytes]
    scores: list[float]
    types: list[gguf.TokenType]
    merges: list[str]
    chat_template: str
    template_note: str | None  # one line when the shipped template was replaced by mistral-common's


def tekken_path(checkpoint_dir: Path) -> Path:
    """The checkpoint's `tekken.json`; a missing tokenizer is refused before any other work."""
    path = checkpoint_dir / "tekken.json"
    if path.is_file():
        return path
    if (checkpoint_dir / "tokenizer.json").is_file():
        raise ConversionError(f"{checkpoint_dir} has no tekken.json: the Tekken tokenizer file is required "
                              "(tokenizer.json alone is not enough)")
    raise ConversionError(f"no tokenizer found in {checkpoint_dir} (neither tekken.json nor tokenizer.json): "
                          "copy the release's tekken.json into it, or pull the release again")


def load_vocabulary(checkpoint_dir: Path) -> Vocabulary:
    """Read `tekken.json` once: tokens, merges and the chat template to write (the shipped one checked)."""
    path = tekken_path(checkpoint_dir)
    try:
        mistral = MistralTokenizer.from_file(path)
    except (MistralCommonException, ValueError, KeyError, TypeError, AssertionError, OSError) as exc:
        raise ConversionError(f"cannot read tekken.json: {_flat(str(exc))}") from None
    if not isinstance(mistral.instruct_tokenizer.tokenizer, Tekkenizer):
        raise ConversionError("cannot read tekken.json: it is not a Tekken tokenizer")
    vocab = _LoadedVocab(path, mistral.instruct_tokenizer.tokenizer)
    tokens, scores, types = zip(*vocab.all_tokens())
    template, note = _chat_template(checkpoint_dir, mistral)
    return Vocabulary(vocab, list(tokens), list(scores), list(types), vocab.extract_vocab_merges_from_model(),
                      template, note)


def add_vocabulary(writer: gguf.GGUFWriter, vocabulary: Vocabulary) -> None:
    vocab = vocabulary.vocab
    writer.add_tokenizer_model(vocab.gguf_tokenizer_model)
    writer.add_tokenizer_pre("tekken")
    writer.add_token_merges(vocabulary.merges)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    writer.add_vocab_size(vocab.vocab_size)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(vocabulary.chat_template)


class _LoadedVocab(MistralVocab):
    """gguf-py's `MistralVocab` over a Tekkenizer already loaded: its own constructor would load the file again.

    Sets the attributes that constructor sets (gguf 0.19) for a Tekken file.
    """

    def __init__(self, path: Path, tokenizer: Tekkenizer):
        self.tokenizer = tokenizer
        self.tokenizer_type = MistralTokenizerType.tekken
        self.vocab_size = tokenizer.n_words
        self.fname_tokenizer = path
        self._name = f"mistral-{self.tokenizer_type.value}-{tokenizer.version.value}"


def derived_chat_template(mistral: MistralTokenizer) -> str:
    """mistral-common's template for this tokenizer: version, images, thinking, model settings.

    What `convert_tokenizer_to_chat_template(tekken.json, use_special_token_variables=False,
    plain_thinking_support=False)` returns, from the tokenizer already loaded (that function
    reads the file again); a test holds the two equal.
    """
    from mistral_common.integrations.chat_templates.chat_templates import generate_chat_template
    from mistral_common.tokens.tokenizers.model_settings_builder import ModelSettingsBuilder

    tokenizer = mistral.instruct_tokenizer.tokenizer
    fields, efforts, default = None, None, None
    try:
        if mistral.version.supports_model_settings:
            builder = tokenizer.model_settings_builder
            if builder is None:
                raise ValueError("Model-settings-capable tokenizer has no model settings builder")
            fields = frozenset(name for name in ModelSettingsBuilder.model_fields if getattr(builder, name) is not None)
            if not fields:
                raise ValueError("Model settings builder must configure at least one field")
            if builder.reasoning_effort is not None:
                efforts = tuple(str(value) for value in builder.reasoning_effort.values)
                default = str(builder.reasoning_effort.default)
        return generate_chat_template(
            spm=False, tokenizer_version=mistral.version,
            image_support=mistral.instruct_tokenizer.image_encoder is not None,
            audio_support=mistral.instruct_tokenizer.audio_encoder is not None,
            thinking_support=tokenizer.is_special(SpecialTokens.begin_think.value)
            and tokenizer.is_special(SpecialTokens.end_think.value),
            default_system_prompt=None, plain_thinking_support=False, use_special_token_variables=False,
            model_settings_fields=fields, reasoning_effort_values=efforts, reasoning_effort_default=default)
    except (ValueError, MistralCommonException) as exc:
        raise ConversionError(f"cannot derive a chat template from tekken.json: {_flat(str(exc))}") from None


def _chat_template(checkpoint_dir: Path, mistral: MistralTokenizer) -> tuple[str, str | None]:
    """The template to write, and a one-line note when the shipped one was replaced."""
    shipped, source = _shipped_template(checkpoint_dir)
    if source is None:
        return derived_chat_template(mistral), None
    disagreement = template_disagreement(shipped, mistral) if isinstance(shipped, str) else shipped.reason
    if disagreement is None:
        return shipped, None
    return derived_chat_template(mistral), (
        f"the checkpoint's {source} disagrees with mistral-common's {mistral.version.value} format "
        f"({disagreement}): the GGUF gets mistral-common's chat template instead")


@dataclass(frozen=True)
class _Unreadable:
    reason: str


def _shipped_template(checkpoint_dir: Path) -> tuple[str | _Unreadable | None, str | None]:
    """The checkpoint's own template and where it comes from (None, None when it ships none)."""
    jinja = checkpoint_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8"), "chat_template.jinja"
        except (OSError, UnicodeDecodeError) as exc:
            return _Unreadable(f"it cannot be read: {_one_line(exc)}"), "chat_template.jinja"
    try:
        config = json.loads((checkpoint_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None  # no tokenizer_config.json (or not JSON): no template shipped there
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: the default one is the chat template
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str):
        return None, None
    return template, "tokenizer_config.json chat_template"


def _probes(mistral: MistralTokenizer) -> dict[str, dict[str, Any]]:
    """OpenAI-style requests covering what the tokenizer supports: system, multi-turn, effort, thinking, tools."""
    probes: dict[str, dict[str, Any]] = {
        "system + user": {"messages": [{"role": "system", "content": "You are terse.\nAnswer in French."},
                                       {"role": "user", "content": "What is the capital of Japan? 日本"}]},
        "multi-turn": {"messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Name a prime."},
                                    {"role": "assistant", "content": "7"},
                                    {"role": "user", "content": "Another one, please."}]},
        "tools": {"tools": [_PROBE_TOOL], "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call00001", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
            {"role": "tool", "tool_call_id": "call00001", "content": "18 °C, sunny"},
            {"role": "user", "content": "Thanks."}]},
    }
    tokenizer = mistral.instruct_tokenizer.tokenizer
    builder = tokenizer.model_settings_builder if mistral.version.supports_model_settings else None
    if builder is not None and builder.reasoning_effort is not None:
        # Every effort but the default, which the probes above already render.
        for effort in builder.reasoning_effort.values:
            if str(effort) != str(builder.reasoning_effort.default):
                messages: list[dict[str, Any]] = [{"role": "user", "content": "Prove that √2 is irrational."}]
                if tokenizer.is_special(SpecialTokens.begin_think.value):
                    messages = [{"role": "user", "content": "2+2?"},
                                {"role": "assistant", "content": [{"type": "thinking", "thinking": "Simple sum."},
                                                                  {"type": "text", "text": "4"}]},
                                {"role": "user", "content": "And 3+3?"}]
                probes[f"reasoning_effort {effort}"] = {"messages": messages, "reasoning_effort": str(effort)}
    return probes


def template_disagreement(template: str, mistral: MistralTokenizer) -> str | None:
    """Why `template` does not give mistral-common's token ids for every probe (None when it does).

    The template is rendered as `smallfour run` renders it (sandboxed, trim/lstrip blocks) and
    tokenized as it tokenizes prompts: control tokens where the text names them, the text between
    them as plain text. Token ids are compared, not text, as they are what the model sees.
    """
    tokenizer = mistral.instruct_tokenizer.tokenizer
    control = {tokenizer.id_to_piece(i): i for i in range(tokenizer.num_special_tokens)}
    pattern = control_pattern(tuple(control))
    try:
        renderer = compiled(template)
    except TemplateError as exc:
        return f"it does not parse: {_one_line(exc)}"
    for name, probe in _probes(mistral).items():
        try:
            request = ChatCompletionRequest.from_openai(**copy.deepcopy(probe))
            expected = mistral.encode_chat_completion(request).tokens
        except MistralCommonException:
            continue  # a feature this tokenizer's format lacks: there is nothing to compare
        settings = {key: value for key, value in probe.items() if key != "messages"}
        try:
            text = renderer.render(messages=copy.deepcopy(probe["messages"]), bos_token="<s>", eos_token="</s>",
                                   add_generation_prompt=True, **settings)
        except Exception as exc:  # noqa: BLE001 - a shipped template may fail in any way; that is a disagreement
            return f"probe '{name}' fails to render: {_one_line(exc)}"
        ids: list[int] = []
        position = 0
        for match in pattern.finditer(text):
            ids += tokenizer.encode(text[position:match.start()], bos=False, eos=False)
            ids.append(control[match.group()])
            position = match.end()
        ids += tokenizer.encode(text[position:], bos=False, eos=False)
        if ids != expected:
            first = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected)))
            return f"probe '{name}': token ids differ from position {first}"
    return None


def _one_line(exc: Exception) -> str:
    return _flat(f"{type(exc).__name__}: {exc}")


def _flat(text: str) -> str:
    """Messages from libraries (pydantic's, Jinja's) span lines; an error or a note is one."""
    return " ".join(text.split())
