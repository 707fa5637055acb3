"""Constrained decoding: a `Constraint` as the GBNF grammar llama.cpp's grammar sampler enforces.

JSON schemas become grammar rules through llama-cpp-python's own converter (the one
llama.cpp's `json_schema_to_grammar` mirrors), all visited by one converter so shared rules
(`space`, `string`, …) are written once. Mistral's control tokens are matched by id
(`<[id]>`, llama.cpp's token syntax), so a tool call is `[TOOL_CALLS]name[ARGS]{json}` with
the name and the arguments' schema enforced, and, for requests that think, a thought
`[THINK]…[/THINK]` may precede whatever the turn must be. The sampler only lets the turn end where the grammar is complete,
so a JSON answer cut short can only be one that ran out of `max_tokens`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from smallfour.completion import Constraint
from smallfour.errors import SmallfourError

ANY_OBJECT = '{"type": "object"}'
# The converter's string character lets raw control characters through, which JSON forbids;
# llama.cpp's own converter excludes them, as here.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def _converter():
    from llama_cpp.llama_grammar import SchemaConverter

    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _visit(converter, schema_text: str, name: str) -> str:
    """The rule name for `schema_text` (rules it needs are added to `converter`)."""
    schema = converter.resolve_refs(json.loads(schema_text), name)
    return converter.visit(schema, name)


def check_schema(schema: Any, where: str) -> str:
    """`schema` as compact JSON text, once the converter accepts it; SmallfourError naming `where` if not."""
    if not isinstance(schema, dict):
        raise SmallfourError(f"{where} must be a JSON schema object")
    text = json.dumps(schema, ensure_ascii=False)
    try:
        _visit(_converter(), text, "check")
    except Exception as exc:  # noqa: BLE001 — the converter raises plain exceptions of several kinds
        raise SmallfourError(f"{where} cannot be enforced: {exc}") from None
    return text


def _token(control: Mapping[str, int], text: str) -> str:
    if text not in control:
        raise SmallfourError(f"the model has no {text} token, which this request's constraint needs")
    return f"<[{control[text]}]>"


def grammar_text(constraint: Constraint, control: Mapping[str, int]) -> str:
    """GBNF (root rule `root`) for `constraint`, with control tokens as ids from `control`."""
    converter = _converter()
    lines: list[str] = []
    calls = ""
    if constraint.tools:
        alternatives = []
        for index, (name, schema) in enumerate(constraint.tools):
            arguments = _visit(converter, schema or ANY_OBJECT, f"arguments-{index}")
            alternatives.append(f"{converter._format_literal(name)} {_token(control, '[ARGS]')} {arguments}")
        lines.append(f"call ::= {_token(control, '[TOOL_CALLS]')} ( {' | '.join(alternatives)} )")
        calls = "call+" if constraint.many_calls else "call"
    if constraint.answer == "json":
        answer = _visit(converter, constraint.schema or ANY_OBJECT, "answer")
        body = f"{answer} | {calls}" if calls else answer
    elif constraint.answer == "none":
        if not calls:
            raise SmallfourError("internal error: a constraint that allows neither an answer nor a tool call")
        body = calls
    else:
        lines.append(f"text ::= (!{_token(control, '[TOOL_CALLS]')})*")
        body = f"text {'call*' if constraint.many_calls else 'call?'}" if calls else "text"
    think = ""
    if constraint.think:
        close = _token(control, "[/THINK]")
        lines.append(f"think ::= {_token(control, '[THINK]')} (!{close})* {close}")
        think = "think? "
    lines.append(f"root ::= {think}( {body} )")
    rules = converter.format_grammar().replace(_LOOSE_CHAR, _JSON_CHAR).rstrip("\n")
    return rules + "\n" + "\n".join(lines) + "\n"


__all__ = ["ANY_OBJECT", "check_schema", "grammar_text"]
