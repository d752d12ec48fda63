"""The llama.cpp binaries dsv4 runs beside the in-process engine: `build` builds and finds `llama-server`,
`ggml-rpc-server`, `llama-bench` and `llama-perplexity` from the llama.cpp llama-cpp-python vendors
(`dsv4 engine build`); `logs` reads their logs for one-line errors. The `Engine` protocol is `dsv4cli.engine`.
"""
