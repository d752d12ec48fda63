"""`dsv4 eval`: what a quant costs in fidelity, measured with llama.cpp's own `llama-perplexity`.

`run.evaluate` is the entry point: it resolves the model and its reference (`reference`), checks they can be
compared, loads the evaluation text (`text`), computes or reuses the reference's logits (`logits`), runs the
model against them (`perplexity`) and records the result beside the model (`record`).
"""
