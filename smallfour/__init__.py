"""smallfour: a quantized local runner for Mistral Small 4 on llama.cpp."""

__version__ = "0.1.0"
