"""Checkpoint reading, FP8/FP4 decoding, per-expert quantization and GGUF writing (numpy only)."""
