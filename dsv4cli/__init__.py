"""dsv4: run DeepSeek V4-family MoE models on one consumer GPU plus host RAM."""

__version__ = "0.1.0"
