"""Several machines through llama.cpp's RPC backend: the ggml-rpc protocol from Python (`protocol`), the worker's
memory budget (`relay`), `dsv4 worker` (`worker`) and the serving side's checks on its workers (`health`).

dsv4 adds no distribution of its own: `ggml-rpc-server` holds the tensors, llama-server's `--rpc` uses them, and
`dsv4cli.plan` decides which layers go where.
"""
