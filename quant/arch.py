"""The architecture names dsv4 knows, declared once: GGUF `general.architecture` values and the
Hugging Face `architectures` class names they come from.

`deepseek4` is what llama.cpp loads; `deepseek41` (V4.1, with Engram tables) is converted and planned,
but no llama.cpp that dsv4 can install loads it yet.
"""

from __future__ import annotations

V4 = "deepseek4"
V41 = "deepseek41"
ARCHES = (V4, V41)

HF_CLASS = {V4: "DeepseekV4ForCausalLM", V41: "DeepseekV41ForCausalLM"}
