"""Output types and (later) quantization recipes for GGUF tensors."""
