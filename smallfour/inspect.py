"""What a GGUF holds: architecture, hyper-parameters, tokenizer, tensors by role."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType

from convert.mistral4 import ROLES, role_of_gguf_name
from smallfour.errors import SmallfourError
from smallfour.runtime import check_gguf


def _value(field):
    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        return len(field.data)  # arrays (token lists, merges) are summarized by their length
    value = field.contents()
    return value


def describe(path: Path) -> dict:
    path = Path(path)
    check_gguf(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise SmallfourError(f"cannot read {path.name} as GGUF: {exc}") from None
    fields = {name: field for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    hyper = {name.removeprefix(f"{arch}."): _value(f) for name, f in fields.items() if name.startswith(f"{arch}.")}
    tokenizer = {name.removeprefix("tokenizer.ggml."): _value(f) for name, f in fields.items()
                 if name.startswith("tokenizer.ggml.")}
    groups: dict[tuple[str, str], dict] = defaultdict(lambda: {"count": 0, "parameters": 0, "bytes": 0})
    for tensor in reader.tensors:
        group = groups[(role_of_gguf_name(tensor.name), tensor.tensor_type.name)]
        group["count"] += 1
        group["parameters"] += int(np.prod(tensor.shape, dtype=np.int64))
        group["bytes"] += int(tensor.n_bytes)
    order = {role: i for i, role in enumerate(ROLES)}
    roles = [
        {"role": role, "type": qtype, **g, "bits_per_weight": round(8 * g["bytes"] / g["parameters"], 3)}
        for (role, qtype), g in sorted(groups.items(), key=lambda item: (order.get(item[0][0], 99), item[0][1]))
    ]
    total_params = sum(g["parameters"] for g in roles)
    total_bytes = sum(g["bytes"] for g in roles)
    return {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "architecture": arch,
        "name": fields["general.name"].contents() if "general.name" in fields else None,
        "hyperparameters": hyper,
        "tokenizer": tokenizer,
        "chat_template": "tokenizer.chat_template" in fields,
        "tensors": {"count": len(reader.tensors), "parameters": total_params, "bytes": total_bytes,
                    "bits_per_weight": round(8 * total_bytes / max(total_params, 1), 3)},
        "roles": roles,
    }
