"""smallfour: a quantized local runner for Mistral Small 4 on llama.cpp.

`import smallfour` is cheap; the API (`smallfour.load`, `generate`, `stream_generate`,
`convert`, `quantize`, `plan`, see `smallfour.api`) is imported on first use.
"""

__version__ = "0.1.0"

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
