"""What a GGUF holds: architecture, hyper-parameters, tokenizer, tensors by role."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from convert.mistral4 import ROLES, role_of_gguf_name
from quant.recipes import stored_nbytes
from smallfour.plan import read_gguf_header
from smallfour.runtime import check_gguf


def describe(path: Path) -> dict:
    path = Path(path)
    check_gguf(path)
    # The header alone (arrays such as the 131k-token vocabulary summarized by their length).
    fields, table = read_gguf_header(path)
    arch = fields.get("general.architecture")
    hyper = {name.removeprefix(f"{arch}."): v for name, v in fields.items() if name.startswith(f"{arch}.")}
    tokenizer = {name.removeprefix("tokenizer.ggml."): v for name, v in fields.items()
                 if name.startswith("tokenizer.ggml.")}
    groups: dict[tuple[str, str], dict] = defaultdict(lambda: {"count": 0, "parameters": 0, "bytes": 0})
    for name, dims, type_id in table:
        qtype = GGMLQuantizationType(type_id)
        shape = tuple(reversed(dims))
        group = groups[(role_of_gguf_name(name), qtype.name)]
        group["count"] += 1
        group["parameters"] += int(np.prod(shape, dtype=np.int64))
        group["bytes"] += stored_nbytes(shape, qtype)
    layers: dict[int, dict] = {}
    for name, dims, type_id in table:
        if name.startswith("blk."):
            layer = layers.setdefault(int(name.split(".")[1]), {"types": {}, "parameters": 0, "bytes": 0})
            shape, qtype = tuple(reversed(dims)), GGMLQuantizationType(type_id)
            layer["types"][name.split(".")[2]] = qtype.name
            layer["parameters"] += int(np.prod(shape, dtype=np.int64))
            layer["bytes"] += stored_nbytes(shape, qtype)
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
        "name": fields.get("general.name"),
        "hyperparameters": hyper,
        "tokenizer": tokenizer,
        "chat_template": "tokenizer.chat_template" in fields,
        "tensors": {"count": len(table), "parameters": total_params, "bytes": total_bytes,
                    "bits_per_weight": round(8 * total_bytes / max(total_params, 1), 3)},
        "roles": roles,
        # The quantization recipe that wrote the file (smallfour metadata), and the types it gave each layer.
        "recipe": {"name": fields.get("smallfour.recipe"),
                   "description": fields.get("smallfour.recipe_description"),
                   "imatrix": fields.get("smallfour.imatrix")},
        "layers": [{"layer": i, **g, "bits_per_weight": round(8 * g["bytes"] / max(g["parameters"], 1), 3)}
                   for i, g in sorted(layers.items())],
    }
