"""OpenAI-style chat messages, checked once for every way a conversation comes in.

`run --messages`, chat's `/load` and each line of a batch job hand over a list of
`{"role", "content"}` messages; `check_messages` says, in one line naming the place
(`body.messages[2].content[0]`), what is wrong with one before it reaches the chat
template. Content is a string, or a list of `text` and image parts (`image_url`, or
`image` as some clients write it); only user messages take images; an assistant
message may have no content (a tool call).

A user or system message must say something: content that is empty, only whitespace, or
parts with no image and only blank text is refused like missing content, rather than run
as an empty turn (OpenAI accepts it; the model would answer a question nobody asked). A
tool result may be empty (a function that returns nothing), and an assistant message's
content is the chat template's to judge (a tool call or a thought may stand without text).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smallfour.errors import SmallfourError

ROLES = ("system", "user", "assistant", "tool")
IMAGE_PARTS = ("image_url", "image")
SAYS_SOMETHING = ("system", "user")  # roles whose content may not be empty


class MessageError(SmallfourError):
    """A conversation that is not a list of chat messages we can render, explained in one line."""


def check_messages(messages: Any, where: str = "messages") -> list[dict]:
    """`messages` itself, once every message in it is well formed; MessageError naming `where` otherwise."""
    if not isinstance(messages, list) or not messages:
        raise MessageError(f"{where} must be a non-empty list of messages")
    for i, message in enumerate(messages):
        _check_message(message, f"{where}[{i}]")
    return messages


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise MessageError(f"{where} must be an object with role and content")
    role = message.get("role")
    if role not in ROLES:
        raise MessageError(f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}")
    content = message.get("content")
    if content is None:
        if role != "assistant":
            raise MessageError(f"{where} ({role}) has no content")
    elif isinstance(content, list):
        for j, part in enumerate(content):
            _check_part(part, role, f"{where}.content[{j}]")
        if role in SAYS_SOMETHING and not any(part["type"] in IMAGE_PARTS or part["text"].strip() for part in content):
            what = "no parts" if not content else "no image and no text but whitespace"
            raise MessageError(f"{where} ({role}) has empty content: {what}")
    elif not isinstance(content, str):
        raise MessageError(f"{where}.content must be a string or a list of text and image parts")
    elif role in SAYS_SOMETHING and not content.strip():
        raise MessageError(f"{where} ({role}) has empty content" + (": only whitespace" if content else ""))


def _check_part(part: Any, role: str, where: str) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in IMAGE_PARTS:
        if role != "user":
            raise MessageError(f"{where}: only user messages take images")
        if image_url(part) is None:
            raise MessageError(f"{where} must be {{\"type\": \"image_url\", \"image_url\": {{\"url\": PATH or "
                               "data: URL}}")
    elif kind in ("input_image", "input_audio"):
        raise MessageError(f"{where} is an {kind}: messages take text and image_url parts")
    elif kind != "text" or not isinstance(part.get("text"), str):
        raise MessageError(f"{where} must be {{\"type\": \"text\", \"text\": …}}")


def image_url(part: dict) -> str | None:
    """The path or data: URL an image part points at (`image_url.url`, or `image`/`url`/`path`), else None."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
    else:
        url = part.get("image", part.get("url", part.get("path")))
    return url if isinstance(url, str) and url else None


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file the user named (messages, tools); one-line errors for unreadable or invalid ones."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SmallfourError(f"cannot read {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SmallfourError(f"{what} file {path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise SmallfourError(f"{what} file {path} is not valid JSON: {exc}") from None


def load_messages(path: Path) -> list[dict]:
    """A conversation file: a JSON list of messages, or an object with a `messages` list (which may be empty)."""
    data = read_json_file(path, "messages")
    if isinstance(data, dict):
        data = data.get("messages")
    if not isinstance(data, list):
        raise MessageError(f"{path}: expected a JSON list of {{\"role\", \"content\"}} messages")
    if data:
        check_messages(data, f"{path}: messages")
    return data
