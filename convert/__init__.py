"""Mistral Small 4 checkpoints (Hugging Face or Mistral layout, BF16 or FP8) → GGUF."""
