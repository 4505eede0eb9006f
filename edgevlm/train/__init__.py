"""Training: synthetic data, LLaVA-format reader, tokenizer for small presets, the two-stage recipe."""
