"""Build llama.cpp's `llama-server` (and its sibling tools) from the llama.cpp that llama-cpp-python vendors.

The engine is the same llama.cpp the in-process runtime uses, so a GGUF that `dsv4 chat` loads is served as is.
Builds land in a cache outside any clone and outside `$DSV4_HOME` (models come and go, the engine stays), keyed by
the llama-cpp-python version and the build flags (and the CPU's feature flags for native builds): a second build
of the same key is instant. The cmake tree is kept until the build succeeds, so an interrupted build resumes;
the finished binaries are copied into a temporary folder and renamed into place, under a lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import pty
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

from dsv4cli.errors import Dsv4Error
from dsv4cli.hub.safe_paths import folder_lock
from dsv4cli.system.hardware import cpu_flags
from dsv4cli.toolchain.logs import log_tail

PACKAGE = "llama-cpp-python"
TARGETS = ("llama-server", "ggml-rpc-server", "llama-bench", "llama-perplexity", "llama-quantize")
SERVER = "llama-server"

# Static binaries (no rpath into the build tree) so the finished folder can be moved into place; no network at
# build time (no curl, no OpenSSL, no prebuilt web UI download); RPC on for the split-machine tools.
COMMON_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DGGML_RPC=ON",
)
GPU_FLAGS: dict[str, tuple[str, ...]] = {
    "cpu": ("-DGGML_NATIVE=ON",),
    "cuda": ("-DGGML_CUDA=ON",),
    "rocm": ("-DGGML_HIP=ON",),
    "vulkan": ("-DGGML_VULKAN=ON",),
    "metal": ("-DGGML_METAL=ON",),
}
# Preferred order when several builds are cached: an accelerator build also runs CPU-only placements.
GPU_PREFERENCE = ("cuda", "rocm", "vulkan", "metal", "cpu")
_STEP = re.compile(r"^\[(\d+)/(\d+)\]")


class EngineError(Dsv4Error, RuntimeError):
    """The llama-server engine is missing, failed to build, or is not a llama-server."""


@dataclass(frozen=True)
class ServerBinary:
    """A usable llama-server: where it is and what it says about itself."""

    server: Path
    version: str
    gpu: str | None  # None for a user-supplied binary (we do not know how it was built)

    def tool(self, name: str) -> Path:
        """A sibling tool of the same build (`llama-bench`, `ggml-rpc-server`, ...)."""
        return self.server.with_name(name)

    def to_json(self) -> dict[str, str | None]:
        return {"server": str(self.server), "version": self.version, "gpu": self.gpu}


def engine_cache() -> Path:
    """`$DSV4_ENGINE_CACHE`, else `$XDG_CACHE_HOME/dsv4/engines` (`~/.cache/dsv4/engines`)."""
    if os.environ.get("DSV4_ENGINE_CACHE"):
        return Path(os.environ["DSV4_ENGINE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "dsv4" / "engines"


def llama_cpp_python_version() -> str:
    """The installed (pinned) llama-cpp-python: its sdist carries the llama.cpp we build."""
    return package_version(PACKAGE)


def cpu_signature() -> str:
    """The CPU's feature flags: a native build uses them, so another CPU needs another build."""
    flags = cpu_flags()
    return " ".join(sorted(flags)) if flags else f"{platform.system()} {platform.machine()} {platform.processor()}"


def cmake_flags(gpu: str) -> list[str]:
    if gpu not in GPU_FLAGS:
        raise EngineError(f"unknown --gpu {gpu!r}", hint=f"use one of {', '.join(GPU_FLAGS)}")
    return [*COMMON_FLAGS, *GPU_FLAGS[gpu]]


def build_key(gpu: str) -> str:
    """The cache folder name: llama-cpp-python version, backend, and a digest of everything that changes the build."""
    parts = [llama_cpp_python_version(), *cmake_flags(gpu), *TARGETS]
    if gpu == "cpu":
        parts.append(cpu_signature())
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    return f"llama.cpp-py{llama_cpp_python_version()}-{gpu}-{digest}"


def installed_engine(gpu: str | None = None) -> ServerBinary | None:
    """The cached build for `gpu` (or the preferred one among those cached), or None when none is built."""
    for name in [gpu] if gpu else GPU_PREFERENCE:
        manifest = engine_cache() / build_key(name) / "engine.json"
        if manifest.is_file():
            info = json.loads(manifest.read_text())
            return ServerBinary(server=manifest.parent / "bin" / SERVER, version=info["version"], gpu=name)
    return None


def check_binary(path: Path) -> ServerBinary:
    """Accept a user-supplied llama-server once `--version` says it is one (a fork or a GPU build they have)."""
    path = path.expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise EngineError(f"engine binary {path} is not an executable file", hint="pass the path of llama-server")
    try:
        proc = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EngineError(f"engine binary {path} did not answer --version: {e}") from e
    text = proc.stdout + proc.stderr
    found = re.search(r"^version: (.+)$", text, re.MULTILINE)
    if proc.returncode != 0 or not found:
        raise EngineError(
            f"{path} does not look like llama-server (`--version` said: {text.strip()[-200:] or 'nothing'})",
            hint="pass a llama.cpp llama-server binary, or unset DSV4_ENGINE_BIN to use `dsv4 engine build`'s",
        )
    return ServerBinary(server=path, version=found.group(1).strip(), gpu=None)


def find_engine(engine_bin: Path | None = None, gpu: str | None = None) -> ServerBinary:
    """The llama-server to run: `--engine-bin`, else `$DSV4_ENGINE_BIN`, else the cached build."""
    explicit = engine_bin or (Path(os.environ["DSV4_ENGINE_BIN"]) if os.environ.get("DSV4_ENGINE_BIN") else None)
    if explicit is not None:
        return check_binary(explicit)
    engine = installed_engine(gpu)
    if engine is None:
        raise EngineError(
            "llama-server is not built yet",
            hint="run `dsv4 engine build` (about 6 minutes on 2 cores) or pass --engine-bin PATH",
        )
    return engine


def _run_checked(cmd: list[str], log: Path, what: str) -> None:
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise _failure(what, log)


def _failure(what: str, log: Path) -> EngineError:
    """The first error in the log and the line after it (cmake and gcc put the reason there), else its tail."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines) if "error" in line.lower()), None)
    reason = " | ".join(lines[first : first + 2]) if first is not None else log_tail(log, 4)
    return EngineError(f"{what} failed (log: {log}): {reason}")


def _clear_stale(folder: Path, pattern: str) -> None:
    """Remove what an interrupted run left half-written (callers hold the lock that guards these names)."""
    for stale in folder.glob(pattern):
        shutil.rmtree(stale, ignore_errors=True)


def fetch_sdist(cache: Path, log: Path) -> Path:
    """The llama-cpp-python sdist, fetched once through pip (its index, proxy and certificates) into the cache."""
    pinned = llama_cpp_python_version()
    folder = cache / "sdist"
    found = sorted(folder.glob(f"llama_cpp_python-{pinned}.tar.gz"))
    if found:
        return found[0]
    _clear_stale(cache, ".sdist-*")
    tmp = cache / f".sdist-{os.getpid()}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", "-d", str(tmp)]
    _run_checked([*cmd, f"{PACKAGE}=={pinned}"], log, f"downloading the {PACKAGE} {pinned} sdist")
    archives = list(tmp.glob("*.tar.gz"))
    if len(archives) != 1:
        raise EngineError(f"pip download left {len(archives)} archives in {tmp}, expected one sdist")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"llama_cpp_python-{pinned}.tar.gz"
    os.replace(archives[0], target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def unpack_sdist(sdist: Path, cache: Path) -> Path:
    """The vendored llama.cpp source tree, unpacked once per sdist (to a temporary name, then renamed)."""
    src = cache / "src" / sdist.name.removesuffix(".tar.gz")
    llama = src / "vendor" / "llama.cpp"
    if (llama / "CMakeLists.txt").is_file():
        return llama
    _clear_stale(cache / "src", ".unpack-*")
    tmp = cache / "src" / f".unpack-{os.getpid()}"
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")  # refuses links and paths that leave the folder
    (top,) = list(tmp.iterdir())
    shutil.rmtree(src, ignore_errors=True)
    os.replace(top, src)
    shutil.rmtree(tmp, ignore_errors=True)
    if not (llama / "CMakeLists.txt").is_file():
        raise EngineError(f"{sdist} has no vendor/llama.cpp", hint="delete it and run `dsv4 engine build` again")
    return llama


def _ninja(cmd: list[str], log: Path, on_step: Callable[[int, int], None]) -> None:
    """Run ninja, teeing its output to the log and reporting its `[n/N]` steps as they happen.

    ninja buffers its status lines when writing to a pipe, so it writes to a pseudo-terminal instead (TERM=dumb:
    one plain line per step, no cursor tricks).
    """
    master, slave = pty.openpty()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env={**os.environ, "TERM": "dumb"}
        )
        os.close(slave)
        pending = b""
        try:
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: ninja exited and closed the terminal
                    break
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace").rstrip("\r")
                    f.write(line + "\n")
                    step = _STEP.match(line)
                    if step:
                        on_step(int(step.group(1)), int(step.group(2)))
            f.write(pending.decode(errors="replace"))
        finally:
            os.close(master)
            code = proc.wait()
    if code != 0:
        raise _failure("building llama.cpp", log)


@dataclass(frozen=True)
class BuildResult:
    engine: ServerBinary
    path: Path
    seconds: float
    cached: bool


def build_engine(
    gpu: str = "cpu",
    *,
    jobs: int | None = None,
    on_step: Callable[[int, int], None] = lambda done, total: None,
    on_stage: Callable[[str], None] = lambda stage: None,
) -> BuildResult:
    """Build (or find cached) llama-server and its tools for `gpu`; returns the engine and where it lives."""
    start = time.monotonic()
    flags = cmake_flags(gpu)
    cache = engine_cache()
    key = build_key(gpu)
    final = cache / key
    (cache / "locks").mkdir(parents=True, exist_ok=True)
    with _locked(cache / "locks", f"{key}.lock", on_stage):
        engine = installed_engine(gpu)
        if engine is not None:
            return BuildResult(engine, final, time.monotonic() - start, cached=True)
        for tool in ("cmake", "ninja"):
            if shutil.which(tool) is None:
                raise EngineError(f"`{tool}` is not installed", hint="install cmake and ninja-build, then run again")
        log = cache / "logs" / f"{key}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        on_stage("fetching the llama-cpp-python sdist")
        with _locked(cache / "locks", "source.lock", on_stage):  # shared by the builds of every backend
            source = unpack_sdist(fetch_sdist(cache, log), cache)
        build = cache / "build" / key
        if not (build / "build.ninja").is_file():
            on_stage("configuring")
            _run_checked(["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", *flags], log, "cmake configure")
        on_stage("compiling")
        _ninja(["ninja", "-C", str(build), f"-j{jobs or os.cpu_count() or 1}", *TARGETS], log, on_step)
        engine = _install(build, final, gpu, flags)
        shutil.rmtree(build, ignore_errors=True)
    return BuildResult(engine, final, time.monotonic() - start, cached=False)


def _locked(folder: Path, name: str, on_stage: Callable[[str], None]) -> AbstractContextManager[None]:
    """Hold folder/name's lock, saying so when another dsv4 process has it (two builds never write one folder)."""
    return folder_lock(folder, name, what="dsv4 engine build", on_wait=on_stage)


def _install(build: Path, final: Path, gpu: str, flags: list[str]) -> ServerBinary:
    """Copy the binaries into a temporary folder, check the server runs, write the manifest, rename into place."""
    _clear_stale(final.parent, f".{final.name}.tmp-*")
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    (tmp / "bin").mkdir(parents=True)
    for name in TARGETS:
        shutil.copy2(build / "bin" / name, tmp / "bin" / name)
    engine = check_binary(tmp / "bin" / SERVER)
    manifest = {
        "version": engine.version,
        "llama_cpp_python": llama_cpp_python_version(),
        "cmake_flags": flags,
        "targets": list(TARGETS),
    }
    (tmp / "engine.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return ServerBinary(server=final / "bin" / SERVER, version=engine.version, gpu=gpu)
