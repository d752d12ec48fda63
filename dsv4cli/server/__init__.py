"""`dsv4 serve` and `dsv4 engine`: llama.cpp's llama-server, built from the pinned llama.cpp and run with the plan.

`build` builds and caches the engine, `model` resolves and plans the model (shared with `dsv4 chat`), `launch`
turns both into a llama-server command line, `process` runs it and stops it without leaving it behind.
"""
