"""The Jinja environment chat templates are rendered in, and how control tokens are found in the result.

One definition for both users: the converter's check of a shipped template against
mistral-common (`convert/vocab.py`) and smallfour's prompts (`smallfour/prompts.py`) must
render and split a template the same way, or the check would vouch for a different prompt.
The environment is the one Hugging Face uses: sandboxed, `trim_blocks`, `lstrip_blocks`.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own filter sorts keys and HTML-escapes; chat templates expect plain json.dumps
    # (as Hugging Face's environment provides), which is also what mistral-common writes.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def compiled(template: str) -> Template:
    """`template` compiled (raises jinja2's TemplateError). Compiling Mistral's template takes tens of
    milliseconds, as long as the prefill of a short prompt: once per template, not once per request."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise
    environment.filters["tojson"] = _tojson
    return environment.from_string(template)


@functools.lru_cache(maxsize=8)
def control_pattern(names: tuple[str, ...]) -> re.Pattern:
    """A regex for any of the control tokens `names`, longest first (so `[/THINK]` is not read as a
    shorter token); built once per vocabulary."""
    return re.compile("|".join(re.escape(t) for t in sorted(names, key=len, reverse=True)))
