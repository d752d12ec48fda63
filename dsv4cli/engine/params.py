"""`LoadParams`: how llama.cpp loads and runs a model, in one typed value.

A plan produces it (`Plan.load_params()`), a plan file stores it as its "llama" section (`to_dict`/`from_dict`,
keys as llama-cpp-python names them), the in-process engine applies it, and `cli_args` renders it as the
llama.cpp command-line flags (`llama-server`, `llama-cli`) for an external server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsv4cli import llama_lib
from dsv4cli.errors import UsageError
from dsv4cli.hardware import cpu_threads
from dsv4cli.kvcache import DEFAULT_KV_TYPE, KV_TYPES

HOST_BUFFER = "CPU"  # the only buffer type a tensor override may name: keep the tensor in host RAM


@dataclass(frozen=True)
class LoadParams:
    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_gpu_layers: int = 0
    host_tensors: tuple[str, ...] = ()  # regexes of tensors kept in host RAM (`-ot REGEX=CPU`)
    tensor_split: tuple[float, ...] = ()  # share of the GPU layers per GPU (several GPUs only)
    use_mmap: bool = True
    use_mlock: bool = False
    flash_attn: bool = False
    kv_type: str = DEFAULT_KV_TYPE  # K and V alike: deepseek4 keeps one K-only cache (docs/formats.md §KV cache)
    n_threads: int = field(default_factory=cpu_threads)
    # Recurrent-state snapshots for rollback (docs/formats.md §KV cache). They reach back only inside the last
    # llama_decode call (one token after generation) and are copied on every decode: 1 snapshot measured 9%
    # slower decode on the tiny model. Turns extend the cache by text and thinking turns resume from a saved
    # state, neither of which needs rollback, so the default is none.
    n_rs_seq: int = 0
    # Weight repacking into ggml-cpu's extra buffer types (llama-server --repack/--no-repack); None: decided
    # when used, by `llama_lib.use_extra_bufts` (off on AMX builds, $DSV4_REPACK). `repack()` is the answer.
    use_extra_bufts: bool | None = None

    def __post_init__(self) -> None:
        if self.kv_type not in KV_TYPES:
            raise UsageError(f"KV cache type {self.kv_type!r} is not one of {', '.join(KV_TYPES)}")

    def repack(self) -> bool:
        """Whether the load may repack weights: the one answer the in-process engine and `cli_args` both use."""
        return llama_lib.use_extra_bufts(self.use_extra_bufts)

    def load_mode(self) -> str | None:
        """llama.cpp's `--load-mode` for use_mmap/use_mlock (common/arg.cpp; the old `--no-mmap` is gone), None for
        its default (mmap)."""
        if not self.use_mmap:
            return "mlock" if self.use_mlock else "none"
        return "mmap+mlock" if self.use_mlock else None

    def to_dict(self) -> dict[str, Any]:
        """The plan file's "llama" section."""
        return {
            "n_gpu_layers": self.n_gpu_layers,
            "override_tensor": [{"pattern": p, "buffer": HOST_BUFFER} for p in self.host_tensors],
            "n_ctx": self.n_ctx,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "use_mmap": self.use_mmap,
            "use_mlock": self.use_mlock,
            "swa_full": False,
            "type_k": self.kv_type,
            "type_v": self.kv_type,
            "flash_attn": self.flash_attn,
            "n_threads": self.n_threads,
            "tensor_split": list(self.tensor_split) or None,
            "use_extra_bufts": self.use_extra_bufts,
        }

    @classmethod
    def from_dict(cls, llama: dict[str, Any]) -> LoadParams:
        """Parameters from a plan file's "llama" section; missing keys take the defaults."""
        if llama.get("type_k", DEFAULT_KV_TYPE) != llama.get("type_v", DEFAULT_KV_TYPE):
            raise UsageError("plan: type_k and type_v must be equal for deepseek4", hint="re-run `dsv4 plan`")
        host = []
        for entry in llama.get("override_tensor", []):
            if entry.get("buffer", HOST_BUFFER) != HOST_BUFFER:
                raise UsageError(f"plan: buffer {entry.get('buffer')!r} is not supported; only CPU overrides are")
            host.append(entry["pattern"])
        repack = llama.get("use_extra_bufts")
        if repack is not None and not isinstance(repack, bool):
            raise UsageError(f"plan: use_extra_bufts is {repack!r}, expected true, false or null")
        return cls(
            n_ctx=int(llama.get("n_ctx", cls.n_ctx)),
            n_batch=int(llama.get("n_batch", cls.n_batch)),
            n_ubatch=int(llama.get("n_ubatch", cls.n_ubatch)),
            n_gpu_layers=int(llama.get("n_gpu_layers", 0)),
            host_tensors=tuple(host),
            tensor_split=tuple(llama.get("tensor_split") or ()),
            use_mmap=bool(llama.get("use_mmap", True)),
            use_mlock=bool(llama.get("use_mlock", False)),
            flash_attn=bool(llama.get("flash_attn", False)),
            kv_type=str(llama.get("type_k", DEFAULT_KV_TYPE)),
            n_threads=int(llama.get("n_threads") or cpu_threads()),
            use_extra_bufts=repack,
        )

    def cli_args(self, model: str) -> list[str]:
        """The same settings as llama.cpp command-line flags (`llama-server -m MODEL ...`), without the binary."""
        args = ["-m", model, "-ngl", str(self.n_gpu_layers), "-c", str(self.n_ctx), "-b", str(self.n_batch)]
        args += ["-ub", str(self.n_ubatch), "-ctk", self.kv_type, "-ctv", self.kv_type, "-t", str(self.n_threads)]
        args += ["-fa", "on" if self.flash_attn else "off"]
        for pattern in self.host_tensors:
            args += ["-ot", f"{pattern}={HOST_BUFFER}"]
        if self.tensor_split:
            args += ["-ts", ",".join(f"{x:g}" for x in self.tensor_split)]
        if mode := self.load_mode():
            args += ["--load-mode", mode]
        if not self.repack():
            args.append("--no-repack")
        return args
