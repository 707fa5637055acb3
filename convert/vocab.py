"""The Tekken tokenizer and the v15 chat template, written into the GGUF.

Tokens, merges and special tokens come from the checkpoint's `tekken.json` via
gguf-py's `MistralVocab` (which reads it with mistral-common), so llama.cpp
tokenizes exactly as Mistral does. The chat template is the checkpoint's own
`chat_template.jinja` when it ships one, else the one mistral-common generates
for the tokenizer's version.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
from gguf.vocab import MistralTokenizerType, MistralVocab

from convert.errors import ConversionError


def add_vocabulary(writer: gguf.GGUFWriter, checkpoint_dir: Path) -> MistralVocab:
    if not (checkpoint_dir / "tekken.json").is_file():
        raise ConversionError(f"{checkpoint_dir} has no tekken.json: the Tekken tokenizer file is required")
    # MistralVocab logs every file it considers at INFO; that is noise in a CLI.
    logging.getLogger("gguf.vocab").setLevel(logging.WARNING)
    try:
        vocab = MistralVocab(checkpoint_dir)
    except (ValueError, KeyError, OSError) as exc:
        raise ConversionError(f"cannot read tekken.json: {exc}") from None
    tokens, scores, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model(vocab.gguf_tokenizer_model)
    if vocab.tokenizer_type == MistralTokenizerType.tekken:
        writer.add_tokenizer_pre("tekken")
        writer.add_token_merges(vocab.extract_vocab_merges_from_model())
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    writer.add_vocab_size(vocab.vocab_size)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template(checkpoint_dir))
    return vocab


def chat_template(checkpoint_dir: Path, vocab: MistralVocab | None = None) -> str:
    shipped = checkpoint_dir / "chat_template.jinja"
    if shipped.is_file():
        return shipped.read_text(encoding="utf-8")
    return generated_chat_template(checkpoint_dir / "tekken.json")


def generated_chat_template(tekken_path: Path) -> str:
    """mistral-common's template for this tokenizer: its version, images, thinking, model settings."""
    from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template

    try:
        return convert_tokenizer_to_chat_template(tekken_path, use_special_token_variables=False,
                                                  plain_thinking_support=False)
    except ValueError as exc:
        raise ConversionError(f"cannot derive a chat template from {tekken_path.name}: {exc}") from None
