"""What a GGUF holds: architecture, hyper-parameters, tokenizer, tensors by role."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from gguf import Keys

from quant.gguf_io import read_header
from quant.names import ROLES, layer_of, role_of
from quant.pipeline import METADATA_DESCRIPTION, METADATA_IMATRIX, METADATA_RECIPE

_TOKENIZER_PREFIX = "tokenizer.ggml."


def describe(path: Path) -> dict:
    path = Path(path)
    # The header alone (arrays such as the 131k-token vocabulary summarized by their length).
    header = read_header(path, what="model file")
    header.check_complete()  # a cut-off download must not pass for a model
    fields, arch = header.fields, header.architecture or None
    hyper = {name.removeprefix(f"{arch}."): v for name, v in fields.items() if name.startswith(f"{arch}.")}
    tokenizer = {name.removeprefix(_TOKENIZER_PREFIX): v for name, v in fields.items()
                 if name.startswith(_TOKENIZER_PREFIX)}
    groups: dict[tuple[str, str], dict] = defaultdict(lambda: {"count": 0, "parameters": 0, "bytes": 0})
    layers: dict[int, dict] = {}
    for t in header.tensors:
        parameters = int(np.prod(t.shape, dtype=np.int64))
        group = groups[(role_of(t.name), t.qtype.name)]
        group["count"] += 1
        group["parameters"] += parameters
        group["bytes"] += t.nbytes
        layer = layer_of(t.name)
        if layer is not None:
            totals = layers.setdefault(layer, {"types": {}, "parameters": 0, "bytes": 0})
            totals["types"][t.name.split(".")[2]] = t.qtype.name
            totals["parameters"] += parameters
            totals["bytes"] += t.nbytes
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
        "name": fields.get(Keys.General.NAME),
        "hyperparameters": hyper,
        "tokenizer": tokenizer,
        "chat_template": Keys.Tokenizer.CHAT_TEMPLATE in fields,
        "tensors": {"count": len(header.tensors), "parameters": total_params, "bytes": total_bytes,
                    "bits_per_weight": round(8 * total_bytes / max(total_params, 1), 3)},
        "roles": roles,
        # The quantization recipe that wrote the file (smallfour metadata), and the types it gave each layer.
        "recipe": {"name": fields.get(METADATA_RECIPE),
                   "description": fields.get(METADATA_DESCRIPTION),
                   "imatrix": fields.get(METADATA_IMATRIX)},
        "layers": [{"layer": i, **g, "bits_per_weight": round(8 * g["bytes"] / max(g["parameters"], 1), 3)}
                   for i, g in sorted(layers.items())],
    }
