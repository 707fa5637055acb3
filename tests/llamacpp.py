"""llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize` runs), via ctypes.

An independent reference for tests and benchmarks (bench/ puts tests/ on its path): it reads
a GGUF, chooses types with its own rules (or the one type forced here) and quantizes with
its own threads.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from quant.errors import SmallfourError


def llama_quantize(source: Path, output: Path, qtype: GGMLQuantizationType | None = None, *,
                   ftype: LlamaFileType = LlamaFileType.MOSTLY_Q8_0,
                   importance: dict[str, np.ndarray] | None = None, threads: int = 0,
                   embeddings_type: GGMLQuantizationType | None = None,
                   output_type: GGMLQuantizationType | None = None) -> None:
    """Quantize `source` to `output` with llama.cpp.

    With `qtype`, every quantizable tensor is forced to it (a `.*` tensor-type override,
    `pure`); otherwise llama.cpp's mixture for `ftype` applies. `importance` maps tensor
    names to 1-D (or per-expert 2-D) importance, as llama.cpp's imatrix holds them.
    """
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = int(ftype)
    params.pure = qtype is not None
    keep = []  # ctypes buffers that must outlive the call
    if embeddings_type is not None:
        params.token_embedding_type = int(embeddings_type)
    if output_type is not None:
        params.output_tensor_type = int(output_type)
    if qtype is not None:
        overrides = (llama_cpp.llama_model_tensor_override * 2)()
        pattern = ctypes.create_string_buffer(b".*")
        keep.append(pattern)
        overrides[0].pattern = ctypes.cast(pattern, ctypes.c_char_p)
        overrides[0].type = int(qtype)
        overrides[1].pattern = None
        params.tt_overrides = overrides
        keep.append(overrides)
    if importance:
        entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
        for i, (name, values) in enumerate(importance.items()):
            data = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
            name_buf = ctypes.create_string_buffer(name.encode())
            keep += [data, name_buf]
            entries[i].name = ctypes.cast(name_buf, ctypes.c_char_p)
            entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = data.size
        entries[len(importance)].name = None
        params.imatrix = entries
        keep.append(entries)
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(output).encode(), ctypes.byref(params))
    if rc != 0:
        raise SmallfourError(f"llama_model_quantize failed ({rc}) on {source}")
