"""`dsv4 serve`: llama.cpp's llama-server (built by `dsv4cli.toolchain.build`) run with the model's plan.

`model` resolves and plans the model (shared with `dsv4 chat`), `launch` turns both into a llama-server command
line, `process` runs it and stops it without leaving it behind, `records` tells `dsv4 rm` what a server holds.
"""
