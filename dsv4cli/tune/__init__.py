"""`dsv4 tune`: the load settings chosen by measuring this machine instead of by rule.

Modules, by job: `settings` (what is tuned and the candidates for each), `bench` (one measurement: the engine
build's `llama-bench` with JSON output, bounded by a timeout), `search` (coordinate descent from the plan's
defaults inside the time budget), `check` (a setting that changes results is kept only when greedy output stays
the same), `cache` (results per model, machine, engine and devices, read by `dsv4 plan`, `chat` and `serve`) and
`run` (`tune_model`, the steps in order). `dsv4cli.plan.tuning` applies a cached result to a plan.
"""
