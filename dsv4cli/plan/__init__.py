"""`dsv4 plan`: place every GGUF tensor on a GPU, in host RAM or memory-mapped from disk, and predict speed.

Modules, by job: `source` (the tensor list: a GGUF's header or an estimate; `remote` reads a GGUF repo's headers
over HTTP range requests, before download), `groups` (tensor classes, per-layer sums), `placement` (the tier
steps), `machine` and `calibrate` (this machine's figures), `speed` (the speed model), `verdict` (the one-line
answer and its hints), `make` (`make_plan`, the steps in order), `model` (the types; `Plan.load_params()` is what
an engine loads with) and `schema` (the JSON form).

Inputs are exact (a GGUF's tensor headers; all shards of a split file) or estimated (a registry name or checkpoint
folder run through `quant.mapping.gguf_tensor_specs` for the chosen recipe, so nothing needs downloading).

Placement (issue 4):
1. The GPUs take what every token reads: each layer's attention, norms, router, shared expert and hyper-connection
   weights plus its KV cache, the output head, and one compute buffer per GPU. Layers are offloaded from the top
   down as llama.cpp's `-ngl` does; when VRAM cannot hold them all, the lowest layers stay on the host whole.
2. Routed experts go to host RAM; VRAM left over takes whole expert layers, **highest layer first**, so the
   experts left on the host are layers 0..N-1 — exactly llama.cpp's `--n-cpu-moe N`.
3. `token_embd` stays on the host (llama.cpp reads only the looked-up rows); Engram tables never go to a GPU.
4. Host RAM holds, in order: what must be resident (embedding, host layers, their KV, the host compute buffer),
   routed experts, then Engram tables (their lookups are sparse, so they are the best thing to leave on disk).
   What RAM cannot hold is memory-mapped from disk, with a warning and its cost in the speed estimate; with
   `no_disk` that is an error saying by how much RAM is short.
5. RPC workers (`--rpc`, issue 14) are devices too, first in llama.cpp's device order (src/llama.cpp puts RPC
   servers before local GPUs), each with the memory it reports through the ggml-rpc protocol (`dsv4cli.rpc`).
   With workers, layers are placed whole (experts included) in contiguous blocks, `-ts` gives each device its
   layer count, and the speed model adds a network term per worker (`speed.network_per_token`): the bytes a
   token sends it and reads back over the measured transfer rate, plus one measured round trip.

Speed (`speed`, figures from `machine`): per decoded token, the host layers cost
    token_s + n_host_layers·layer_s + host dense bytes / dense GEMV GB/s + active host expert bytes / expert
    GEMV GB/s (at least host bytes / RAM GB/s for rates not measured at these threads) + disk bytes / disk GB/s
where token_s, layer_s and the two GEMV rates are measured on this machine by `calibrate` (llama.cpp's own
kernels, the model's recipe, the plan's threads; cached), and each GPU adds its bytes / its bandwidth plus an
assumed launch cost per graph node. Per token: every dense byte, k/E of each tier's expert bytes, one embedding
row, Engram rows (a 4 KiB page each from disk). `decode_tok_s` is at the start of a conversation (what
bench/plan.py measures); `decode_tok_s_full_ctx` adds the full cache's reads and attention FLOPs. Prefill per
n_ubatch chunk: dense bytes once, the fraction of experts a chunk touches (1 − (1 − k/E)^ub) once — over PCIe
when a GPU computes the chunk — plus a compute term 2·active_params·ub / FLOPS (typical figures: prefill is not
calibrated).

Verdict (`verdict`): "fits" only when every weight is in RAM or VRAM, with a RAM reserve for the OS kept free;
a plan that memory-maps weights says "streams from disk" first, with hints that name only real options.

`schema.SCHEMA` documents `Plan.to_dict()` (what `--json` prints and `-o` writes).
"""

from dsv4cli.plan.inputs import DEFAULT_CTX, PlanInputs
from dsv4cli.plan.make import make_plan
from dsv4cli.plan.model import Plan, Tier
from dsv4cli.plan.schema import SCHEMA, check_plan_model, load_plan, save_plan
from dsv4cli.plan.source import ModelSource, load_source
from dsv4cli.units import GIB

__all__ = [
    "DEFAULT_CTX",
    "GIB",
    "SCHEMA",
    "ModelSource",
    "Plan",
    "PlanInputs",
    "Tier",
    "check_plan_model",
    "load_plan",
    "load_source",
    "make_plan",
    "save_plan",
]
