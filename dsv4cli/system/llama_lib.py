"""The llama.cpp that llama-cpp-python loaded: what this build can do, and the process-wide settings dsv4 gives it.

Everything here goes through the shared libraries already in the process (libllama, libggml, libggml-base from
llama-cpp-python's `lib` folder), so the answers describe the build that will actually run the model:

- capabilities: GPU offload, RPC, the ggml backends compiled in, the CPU features and extra buffer types;
- a one-line abort: ggml calls `abort()` after GGML_ASSERT/GGML_ABORT and, without a callback, first forks gdb for
  a backtrace (ggml/src/ggml.c `ggml_abort`); the callback set here prints one line and exits 1 instead;
- whether a load may use ggml-cpu's extra buffer types (weight repacking), see `use_extra_bufts`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsv4cli.errors import RuntimeLoadError, UsageError

_CPU_DEVICE = 0  # GGML_BACKEND_DEVICE_TYPE_CPU
REPACK_ENV = "DSV4_REPACK"  # auto | on | off, like llama-server's --repack / --no-repack (LLAMA_ARG_REPACK)

# The pip command that replaces the CPU-only wheel with a GPU build; `make setup GPU=...` runs the same.
GPU_BUILD_FLAGS = {
    "cuda": "-DGGML_CUDA=on",
    "rocm": "-DGGML_HIP=on",
    "vulkan": "-DGGML_VULKAN=on",
    "metal": "-DGGML_METAL=on",
}


def gpu_kind(source: str = "") -> str:
    """Which GPU build fits this machine: Metal on macOS, ROCm where rocm-smi found the GPU, else CUDA."""
    if sys.platform == "darwin":
        return "metal"
    return "rocm" if source == "rocm-smi" else "cuda"


def gpu_build_command(gpu: str = "cuda") -> str:
    """The command that installs a llama-cpp-python build able to offload to `gpu` (see README, GPU builds)."""
    import llama_cpp

    return (
        f'CMAKE_ARGS="{GPU_BUILD_FLAGS[gpu]}" pip install --force-reinstall --no-cache-dir --no-deps '
        f"llama-cpp-python=={llama_cpp.__version__}"
    )


@functools.cache
def _libs() -> tuple[Any, ctypes.CDLL, ctypes.CDLL]:
    """(llama_cpp module, libggml, libggml-base): the copies libllama already loaded, not second ones.

    A second copy would have its own backend registry and buffer-type pointers, so the libraries are opened by
    their path in llama_cpp's lib folder, which the dynamic loader resolves to the already-loaded objects.
    """
    if not os.environ.get("DSV4_DEBUG"):  # read by ggml at load (std::terminate handler) and in ggml_print_backtrace
        os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    found: dict[str, ctypes.CDLL] = {}
    for stem in ("libggml-base", "libggml"):
        candidates = [p for p in sorted(folder.glob(f"{stem}.*")) if p.suffix in (".so", ".dylib", ".dll")]
        candidates += sorted(folder.glob(f"{stem}.so.*"))
        try:
            found[stem] = ctypes.CDLL(str(candidates[0]), mode=ctypes.RTLD_GLOBAL)
        except (IndexError, OSError) as e:
            raise RuntimeLoadError(
                f"cannot open {stem} in {folder} ({e or 'not found'})",
                hint="reinstall llama-cpp-python: `make setup`",
            ) from e
    ggml, base = found["libggml"], found["libggml-base"]
    for lib, name, restype, argtypes in (
        (ggml, "ggml_backend_dev_by_type", ctypes.c_void_p, [ctypes.c_int]),
        (ggml, "ggml_backend_reg_count", ctypes.c_size_t, []),
        (ggml, "ggml_backend_reg_get", ctypes.c_void_p, [ctypes.c_size_t]),
        (ggml, "ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
        (base, "ggml_backend_reg_name", ctypes.c_char_p, [ctypes.c_void_p]),
        (base, "ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
        (base, "ggml_backend_dev_backend_reg", ctypes.c_void_p, [ctypes.c_void_p]),
        (base, "ggml_backend_dev_buffer_type", ctypes.c_void_p, [ctypes.c_void_p]),
        (base, "ggml_backend_buft_name", ctypes.c_char_p, [ctypes.c_void_p]),
        (base, "ggml_set_abort_callback", ctypes.c_void_p, [ctypes.c_void_p]),
        (base, "ggml_version", ctypes.c_char_p, []),
        (base, "ggml_commit", ctypes.c_char_p, []),
    ):
        getattr(lib, name).restype = restype
        getattr(lib, name).argtypes = argtypes
    llama_cpp.llama_backend_init()  # loads the backends (a no-op for the ones already loaded)
    return llama_cpp, ggml, base


def ggml() -> ctypes.CDLL:
    """libggml as loaded by llama-cpp-python (backend registry, devices)."""
    return _libs()[1]


def ggml_base() -> ctypes.CDLL:
    """libggml-base as loaded by llama-cpp-python (tensors, op names, backend tensor reads)."""
    return _libs()[2]


def _cpu_device() -> int:
    device = ggml().ggml_backend_dev_by_type(_CPU_DEVICE)
    if not device:
        raise RuntimeLoadError("llama.cpp has no CPU backend device", hint="reinstall llama-cpp-python: `make setup`")
    return device


def cpu_buffer_type() -> int:
    """The CPU buffer type; llama.cpp still picks an extra (repacking) type for tensors overridden to it."""
    return _libs()[2].ggml_backend_dev_buffer_type(_cpu_device())


def backends() -> tuple[str, ...]:
    """Names of the ggml backends in this build's registry: CPU, CUDA, ROCm, Vulkan, Metal, RPC, BLAS, ..."""
    _, lib, base = _libs()
    regs = (lib.ggml_backend_reg_get(i) for i in range(lib.ggml_backend_reg_count()))
    return tuple(base.ggml_backend_reg_name(reg).decode() for reg in regs)


def extra_buffer_types() -> tuple[str, ...]:
    """The CPU device's extra buffer types (e.g. AMX, CPU_REPACK, KleidiAI): where weights get repacked.

    Read through the CPU registry's `ggml_backend_dev_get_extra_bufts` (ggml-backend.h), the list llama.cpp
    itself puts ahead of the plain CPU buffer type when `use_extra_bufts` is on.
    """
    _, _, base = _libs()
    device = _cpu_device()
    reg = base.ggml_backend_dev_backend_reg(device)
    address = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return ()
    get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
    array = get(device)
    names = []
    for i in range(64):
        if not array or not array[i]:
            break
        names.append(base.ggml_backend_buft_name(array[i]).decode())
    return tuple(names)


def use_extra_bufts(setting: bool | None = None) -> bool:
    """Whether a model load may repack weights into the extra buffer types; None = `$DSV4_REPACK`, else automatic.

    Automatic keeps them except where this build has the AMX buffer type. AMX accepts `blk.N.attn_output_a`
    (the grouped output projection, a 3-D Q8_0/Q4 weight) at load, because llama.cpp tests it with a contiguous
    activation (src/llama-model-loader.cpp `weight_buft_supported`), but the deepseek4 graph multiplies it by a
    permuted one (src/models/deepseek4.cpp, `attn_wo_a`) and AMX's `supports_op` requires a contiguous src1
    (ggml/src/ggml-cpu/amx/amx.cpp). The CPU backend then reports the op unsupported — for a weight in an extra
    buffer it answers only what that buffer type answers (ggml/src/ggml-cpu/ggml-cpu.cpp
    `ggml_backend_cpu_device_supports_op`) — so no backend can run the node and the scheduler aborts
    (`GGML_ASSERT(*cur_backend_id != -1)`, ggml/src/ggml-backend.cpp). An override cannot steer that one
    tensor away from AMX: overriding to the CPU buffer type re-selects among the extra types.
    """
    if setting is not None:
        return setting
    choice = os.environ.get(REPACK_ENV, "auto").strip().lower()
    if choice in ("on", "1", "true", "yes"):
        return True
    if choice in ("off", "0", "false", "no"):
        return False
    if choice != "auto":
        raise UsageError(f"{REPACK_ENV}={choice!r}: expected auto, on or off")
    return "AMX" not in extra_buffer_types()


def apply_to_llama_class() -> None:
    """Make llama-cpp-python's high-level `Llama` class load with the same repacking choice as dsv4.

    `Llama(...)` has no `use_extra_bufts` argument and starts from `llama_model_default_params()`, so scripts
    that load a GGUF through it (reference runs in tests, benchmarks) would still abort on AMX CPUs; this wraps
    that function in `llama_cpp.llama_cpp`, the module the class calls it from.
    """
    import llama_cpp.llama_cpp as raw

    original = raw.llama_model_default_params
    if getattr(original, "dsv4_repack", False):
        return

    def defaults() -> Any:
        params = original()
        params.use_extra_bufts = use_extra_bufts()
        return params

    defaults.dsv4_repack = True  # type: ignore[attr-defined]
    raw.llama_model_default_params = defaults


def gpu_offload() -> bool:
    """True when this llama.cpp can put layers on a GPU (a CUDA, ROCm, Vulkan, Metal, ... build)."""
    return bool(_libs()[0].llama_supports_gpu_offload())


def prepare_load(model: Path, *, n_gpu_layers: int, rpc: tuple[str, ...] = ()) -> None:
    """Before llama.cpp sees `model`: one-line aborts that name it, no silent CPU run of a GPU placement, and no
    in-process load of a placement on RPC workers (dsv4 never attaches workers to the in-process llama.cpp)."""
    if rpc:
        raise RuntimeLoadError(
            f"this placement puts layers on RPC workers ({', '.join(rpc)}); the in-process engine does not load "
            "across machines",
            hint=f"serve it with llama-server: `dsv4 serve {model} --rpc {','.join(rpc)}` (or --plan FILE)",
        )
    install_abort_handler(model)
    require_gpu_offload(n_gpu_layers)


def offload_warning(n_gpu_layers: int, source: str) -> str | None:
    """The plan's warning when it puts layers on a GPU that this build cannot use; `source` found the GPU."""
    if n_gpu_layers <= 0 or gpu_offload():
        return None
    kind = gpu_kind(source)
    return (
        f"this llama-cpp-python build is CPU-only, so chat would refuse this GPU placement: install a GPU build "
        f"with `make setup GPU={kind}` or `{gpu_build_command(kind)}` (or chat --cpu)"
    )


def require_gpu_offload(n_gpu_layers: int) -> None:
    """Refuse a GPU placement that a CPU-only build would silently run on the CPU."""
    if n_gpu_layers > 0 and not gpu_offload():
        from dsv4cli.system.hardware import detect_gpus

        kind = gpu_kind(detect_gpus().source)
        raise RuntimeLoadError(
            f"the placement puts {n_gpu_layers} layers on a GPU but this llama-cpp-python build is CPU-only",
            hint=f"install a GPU build: `{gpu_build_command(kind)}` (or `make setup GPU={kind}`), "
            "or pass --cpu to run on the CPU",
        )


@dataclass(frozen=True)
class BuildInfo:
    """What the loaded llama.cpp build can do (`dsv4 doctor`)."""

    version: str  # llama-cpp-python's version, which pins the vendored llama.cpp
    ggml_version: str
    ggml_commit: str  # the llama.cpp commit the build recorded ("unknown" where it had none)
    backends: tuple[str, ...]
    gpu_offload: bool
    rpc: bool
    cpu_features: tuple[str, ...]  # the `X = 1` entries of llama_print_system_info
    extra_buffer_types: tuple[str, ...]
    repack: bool  # what a load will use (`use_extra_bufts`)
    system_info: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_system_info(text: str) -> tuple[str, ...]:
    """Feature names enabled in llama_print_system_info ("CPU : SSE3 = 1 | AVX2 = 1 | ... | REPACK = 1 |")."""
    features = []
    for part in text.replace(";", "|").split("|"):
        name, _, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if name and value.strip() == "1":
            features.append(name)
    return tuple(dict.fromkeys(features))


def build_info() -> BuildInfo:
    llama_cpp, _, base = _libs()
    text = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()
    return BuildInfo(
        version=llama_cpp.__version__,
        ggml_version=base.ggml_version().decode(),
        ggml_commit=base.ggml_commit().decode(),
        backends=backends(),
        gpu_offload=gpu_offload(),
        rpc=bool(llama_cpp.llama_supports_rpc()),
        cpu_features=parse_system_info(text),
        extra_buffer_types=extra_buffer_types(),
        repack=use_extra_bufts(),
        system_info=text,
    )


# ---- one-line aborts ----------------------------------------------------------------------------------------

_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_abort_state: dict[str, Any] = {"model": None, "callback": None}


def abort_message(message: str, model: Path | None) -> str:
    """The line a llama.cpp abort becomes: what failed, on which file, what to try."""
    where = f" while running {model}" if model else ""
    return (
        f"error: llama.cpp aborted{where}: {' '.join(message.split())} "
        f"(run `dsv4 doctor`; try {REPACK_ENV}=off, or --verbose for llama.cpp's log; "
        "report it with that log if it persists)"
    )


def _on_abort(message: bytes | None) -> None:
    line = abort_message((message or b"").decode("utf-8", errors="replace"), _abort_state["model"])
    try:
        sys.stdout.flush()
    finally:
        os.write(2, (line + "\n").encode())
        os._exit(1)  # the callback must not return: ggml calls abort() right after it


def install_abort_handler(model: Path | None = None) -> None:
    """Route GGML_ASSERT / GGML_ABORT to one line on stderr and exit status 1 (no gdb backtrace, no core).

    `model` names the file in the message. With DSV4_DEBUG set, ggml's own message and backtrace are kept.
    """
    if os.environ.get("DSV4_DEBUG"):
        return
    _abort_state["model"] = model
    if _abort_state["callback"] is None:
        _abort_state["callback"] = _ABORT_CALLBACK(_on_abort)  # kept alive: C holds only the pointer
        _libs()[2].ggml_set_abort_callback(ctypes.cast(_abort_state["callback"], ctypes.c_void_p))
