"""`LoadParams`: how llama.cpp loads and runs a model, in one typed value.

A plan produces it (`Plan.load_params()`), a plan file stores it as its "llama" section (`to_dict`/`from_dict`,
keys as llama-cpp-python names them), the in-process engine applies it, and `cli_args` renders it as the
llama.cpp command-line flags (`llama-server`, `llama-cli`) for an external server.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv4cli.engine.kvcache import DEFAULT_KV_TYPE, KV_TYPES
from dsv4cli.errors import UsageError
from dsv4cli.rpc.protocol import parse_endpoints
from dsv4cli.system import llama_lib
from dsv4cli.system.hardware import cpu_threads
from quant.files import shown

HOST_BUFFER = "CPU"  # the only buffer type a tensor override may name: keep the tensor in host RAM
# What llama.cpp can be given without failing in ways it does not report (a thread pool it cannot start
# segfaults; a huge context or batch is one giant allocation): hard caps, far above any real use.
MAX_CTX = 1 << 24  # tokens (DeepSeek V4 is trained for 1M)
MAX_BATCH = 1 << 16
MAX_GPUS = 16  # LLAMA_MAX_DEVICES
MAX_SEQ = 256  # LLAMA_MAX_SEQ (src/llama-cparams.h): llama-server's --parallel slots at most
MAX_GPU_LAYERS = (1 << 31) - 1  # a C int; anything past the layer count means "all"
GGML_MAX_N_THREADS = 512  # ggml.h
MAX_OVERRIDES = 256
PLAN_HINT = "re-create it with `dsv4 plan MODEL -o FILE`"
# Tensor-override regexes run in llama.cpp's std::regex (backtracking, no time limit) against every tensor name,
# so a plan file may only hold the simple shapes `dsv4 plan` writes and people edit by hand: literals, `\.`,
# anchors, character classes, one level of `(a|b)` groups, `*`/`+`/`?` on a single character, and a
# bound on the backtracking they allow (`_branching`).
_CHAR = r"(?:[A-Za-z0-9_\-]|\\[.\-_]|\.|\[[A-Za-z0-9_\-]+\])"  # one character, may take * + ?
_GROUP = r"\((?:[A-Za-z0-9_\-]|\\\.)+(?:\|(?:[A-Za-z0-9_\-]|\\\.)+)*\)"  # literal choices, never quantified
SAFE_PATTERN = re.compile(rf"^\^?(?:{_CHAR}[*+?]?|{_GROUP})+\$?$")
MAX_PATTERN = 4096
MAX_BRANCHING = 1 << 16


def max_threads() -> int:
    """The most CPU threads worth asking for here: twice the logical CPUs (more only slows llama.cpp down)."""
    return min(GGML_MAX_N_THREADS, 2 * (os.cpu_count() or 1))


def check_override_pattern(pattern: object, where: str) -> str:
    """A tensor-override regex of the safe shape (see SAFE_PATTERN), or UsageError naming `where`."""
    if not isinstance(pattern, str) or not 0 < len(pattern) <= MAX_PATTERN:
        raise UsageError(f"{where}: {shown(pattern)} is not a regex of 1..{MAX_PATTERN} characters", hint=PLAN_HINT)
    if not SAFE_PATTERN.match(pattern) or _branching(pattern) > MAX_BRANCHING:
        raise UsageError(
            f"{where}: regex {shown(pattern)} is not of the supported shape (literals, \\., ^, $, [classes], "
            f"(a|b) groups, * + ? on single characters, at most {MAX_BRANCHING} ways to match at one place)",
            hint=PLAN_HINT,
        )
    return pattern


def _branching(pattern: str) -> int:
    """An upper bound on the ways the regex can match at one place: choices of every group times the tensor-name
    length (64) for every quantifier. std::regex backtracks through at most this many per start position."""
    ways = 64 ** sum(pattern.count(q) for q in "*+?")
    for group in re.findall(r"\(([^()]*)\)", pattern):
        ways *= group.count("|") + 1
    return ways


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
    flash_attn: bool = True  # the plans' default (measured faster on CPUs too); a quantized cache needs it
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
    rpc: tuple[str, ...] = ()  # llama.cpp RPC workers HOST:PORT (`--rpc`); their devices come first in tensor_split

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
            "rpc": list(self.rpc),
        }

    @classmethod
    def from_dict(cls, llama: Any, *, source: str = "plan", note: Callable[[str], None] | None = None) -> LoadParams:
        """Parameters from a plan file's "llama" section (`source` names it in errors); missing keys take the
        defaults, every present one is type- and range-checked. More threads than this machine has (a plan made
        on a bigger one) become its own default, with a note."""
        if not isinstance(llama, dict):
            raise UsageError(f"{source}: the llama section is not an object", hint=PLAN_HINT)
        get = _Checked(llama, source)
        kv_type = get.choice("type_k", tuple(KV_TYPES), DEFAULT_KV_TYPE)
        if get.choice("type_v", tuple(KV_TYPES), DEFAULT_KV_TYPE) != kv_type:
            raise UsageError(f"{source}: llama.type_k and llama.type_v must be equal for deepseek4", hint=PLAN_HINT)
        n_ctx = get.integer("n_ctx", 1, MAX_CTX, cls.n_ctx)
        asked = get.integer("n_threads", 1, GGML_MAX_N_THREADS, None)
        threads = asked if asked is not None and asked <= max_threads() else cpu_threads()
        params = cls(
            n_ctx=n_ctx,
            n_batch=get.integer("n_batch", 1, MAX_BATCH, cls.n_batch),
            n_ubatch=get.integer("n_ubatch", 1, MAX_BATCH, cls.n_ubatch),
            n_gpu_layers=get.integer("n_gpu_layers", -1, MAX_GPU_LAYERS, 0),
            host_tensors=get.overrides(),
            tensor_split=get.split(),
            use_mmap=get.flag("use_mmap", True),
            use_mlock=get.flag("use_mlock", False),
            flash_attn=get.flag("flash_attn", True),
            kv_type=kv_type,
            n_threads=threads,
            use_extra_bufts=get.flag("use_extra_bufts", None),
            rpc=get.endpoints(),
        )
        if note and asked is not None and asked != threads:
            note(
                f"note: {source} asks for {asked} threads; this machine has {os.cpu_count()} logical CPUs, "
                f"using {threads}"
            )
        return params

    def cli_args(self, model: str | Path) -> list[str]:
        """The same settings as llama.cpp command-line flags (`llama-server -m MODEL ...`), without the binary."""
        args = ["--rpc", ",".join(self.rpc)] if self.rpc else []
        args += ["-m", str(model), "-ngl", str(self.n_gpu_layers), "-c", str(self.n_ctx), "-b", str(self.n_batch)]
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


class _Checked:
    """Typed, range-checked reads of a plan file's llama section; errors name the file and the key."""

    def __init__(self, llama: dict[str, Any], source: str) -> None:
        self.llama = llama
        self.source = source

    def fail(self, key: str, value: Any, expected: str) -> UsageError:
        return UsageError(f"{self.source}: llama.{key} is {shown(value, 60)}; expected {expected}", hint=PLAN_HINT)

    def integer(self, key: str, lo: int, hi: int, default: Any) -> Any:
        value = self.llama.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(key, value, f"an integer in {lo}..{hi}")
        return value

    def flag(self, key: str, default: bool | None) -> Any:
        value = self.llama.get(key, default)
        if value is not default and not isinstance(value, bool):
            raise self.fail(key, value, "true or false" + (" or null" if default is None else ""))
        return value

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.llama.get(key, default)
        if value not in allowed:
            raise self.fail(key, value, "one of " + ", ".join(allowed))
        return value

    def overrides(self) -> tuple[str, ...]:
        entries = self.llama.get("override_tensor") or []
        if not isinstance(entries, list) or len(entries) > MAX_OVERRIDES:
            raise self.fail("override_tensor", entries, f"a list of at most {MAX_OVERRIDES} overrides")
        patterns = []
        for i, entry in enumerate(entries):
            where = f"{self.source}: llama.override_tensor[{i}]"
            if not isinstance(entry, dict) or entry.get("buffer", HOST_BUFFER) != HOST_BUFFER:
                raise UsageError(f'{where}: expected {{"pattern": REGEX, "buffer": "CPU"}}', hint=PLAN_HINT)
            patterns.append(check_override_pattern(entry.get("pattern"), where))
        return tuple(patterns)

    def split(self) -> tuple[float, ...]:
        value = self.llama.get("tensor_split") or []
        ok = isinstance(value, list) and len(value) <= MAX_GPUS
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not ok or not all(math.isfinite(v) and 0 <= v <= 1e6 for v in value) or (value and not sum(value)):
            raise self.fail("tensor_split", value, f"null or up to {MAX_GPUS} non-negative shares, not all 0")
        return tuple(float(v) for v in value)

    def endpoints(self) -> tuple[str, ...]:
        value = self.llama.get("rpc") or []
        expected = f"null or a list of up to {MAX_GPUS} HOST:PORT strings"
        if not isinstance(value, list) or len(value) > MAX_GPUS or not all(isinstance(v, str) for v in value):
            raise self.fail("rpc", value, expected)
        try:
            return tuple(str(e) for e in parse_endpoints(",".join(value))) if value else ()
        except UsageError as e:
            raise self.fail("rpc", value, expected) from e
