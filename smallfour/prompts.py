"""Chat prompts rendered from the template stored in the GGUF.

We render with our own Jinja environment (the one Hugging Face uses: sandboxed,
`trim_blocks`, `lstrip_blocks`) rather than llama-cpp-python's formatter so that
later model settings such as `reasoning_effort` can be passed to the template.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from smallfour.errors import SmallfourError

Message = dict[str, Any]


def _raise(message: str) -> None:
    raise TemplateError(message)


def render_chat(template: str, messages: list[Message], **settings: Any) -> str:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise
    try:
        return environment.from_string(template).render(
            messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True, **settings
        )
    except TemplateError as exc:
        raise SmallfourError(f"cannot render the chat template: {exc}") from None


def user_turn(prompt: str) -> list[Message]:
    return [{"role": "user", "content": prompt}]
