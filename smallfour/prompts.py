"""Chat prompts rendered from the template stored in the GGUF, tokenized the way Mistral does.

We render with our own Jinja environment (`convert/chat_template.py`: the one Hugging
Face uses) rather than llama-cpp-python's formatter so that model settings such as
`reasoning_effort` reach the template.

Tokenizing the rendered text with special-token parsing would let a user's
message that contains the text `[INST]` or `[/THINK]` inject control tokens.
mistral-common never does that: control tokens come only from the format, and
text between them, user text included, is tokenized as plain text. We do the
same: message text is rendered as opaque markers, control tokens are recognized
only in what the template itself wrote, and each run of text between control
tokens (template text and message text together) is tokenized as plain text.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from convert.chat_template import compiled, control_pattern
from smallfour.errors import SmallfourError

Message = dict[str, Any]

# Marker for the i-th message text: characters no tokenizer input or template contains.
_MARKER = "\ue000{}\ue001"
_MARKER_RE = re.compile("\ue000(\\d+)\ue001")


def user_turn(prompt: str) -> list[Message]:
    return [{"role": "user", "content": prompt}]


@dataclass(frozen=True)
class Segment:
    text: str
    from_template: bool


def render_segments(template: str, messages: list[Message], **settings: Any) -> list[Segment]:
    """The rendered prompt as alternating template-written and message-text segments."""
    texts: list[str] = []

    def mark(text: Any) -> Any:
        if not isinstance(text, str) or text == "":
            return text
        texts.append(text)
        return _MARKER.format(len(texts) - 1)

    marked = copy.deepcopy(messages)
    for message in marked:
        for key in ("content", "reasoning_content", "reasoning"):
            if isinstance(message.get(key), str):
                message[key] = mark(message[key])
        if isinstance(message.get("content"), list):
            for block in message["content"]:
                for key in ("text", "thinking"):
                    if isinstance(block, dict) and key in block:
                        block[key] = mark(block[key])
    try:
        rendered = compiled(template).render(
            messages=marked, bos_token="<s>", eos_token="</s>", add_generation_prompt=True, **settings
        )
    except TemplateError as exc:
        raise SmallfourError(f"cannot render the chat template: {exc}") from None
    segments, position = [], 0
    for match in _MARKER_RE.finditer(rendered):
        segments.append(Segment(rendered[position:match.start()], True))
        segments.append(Segment(texts[int(match.group(1))], False))
        position = match.end()
    segments.append(Segment(rendered[position:], True))
    return [s for s in segments if s.text]


def render_chat(template: str, messages: list[Message], **settings: Any) -> str:
    return "".join(s.text for s in render_segments(template, messages, **settings))


def split_on_control_tokens(segments: list[Segment], control: dict[str, int]) -> list[int | str]:
    """Control-token ids found in template-written text, and the plain text runs between them."""
    pattern = control_pattern(tuple(control))
    pieces: list[int | str] = []
    pending = ""
    for segment in segments:
        if not segment.from_template:
            pending += segment.text
            continue
        position = 0
        for match in pattern.finditer(segment.text):
            pending += segment.text[position:match.start()]
            if pending:
                pieces.append(pending)
                pending = ""
            pieces.append(control[match.group()])
            position = match.end()
        pending += segment.text[position:]
    if pending:
        pieces.append(pending)
    return pieces
