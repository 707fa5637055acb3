"""smallfour: a quantized local runner for Mistral Small 4 on llama.cpp.

`import smallfour` loads llama-cpp-python first (see below); the API (`smallfour.load`, `generate`,
`stream_generate`, `convert`, `quantize`, `plan`, see `smallfour.api`) is imported on first use.
"""

__version__ = "0.1.0"

# llama.cpp's shared libraries load before numpy does (smallfour's modules import numpy at their top): with
# numpy's loaded first, a CUDA build of llama.cpp 0.3.36 (GCC 13, CUDA 13, Ubuntu 24.04; seen on an H200)
# crashed compiling its tokenizer's std::regex in every model load. An import that fails is left for the
# first real use (and `smallfour doctor`) to report.
try:
    import llama_cpp  # noqa: F401
except (ImportError, OSError, RuntimeError):
    pass

_API = ("ChatRequest", "Event", "GenerationResult", "Model", "Placement", "SmallfourError", "convert", "generate",
        "load", "plan", "quantize", "stream_generate")


def __getattr__(name: str):
    if name == "SmallfourError":
        from smallfour.errors import SmallfourError

        return SmallfourError
    if name in _API:
        from smallfour import api

        return getattr(api, name)
    raise AttributeError(f"module 'smallfour' has no attribute {name!r}")


__all__ = ["__version__", *_API]
