"""The engine build pipeline (cache, lock, progress, failure message) on a tiny stand-in for the llama.cpp sdist.

A real cmake + ninja build of a few-line C project stands in for llama.cpp so the pipeline runs in seconds;
the real llama-server build is exercised by `make setup` and `tests/test_serve.py`.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from dsv4cli.toolchain import build

pytestmark = pytest.mark.engine_build

FAKE_SERVER = r"""
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--version") == 0) { printf("version: 42 (fake)\nbuilt with cc\n"); return 0; }
    return 1;
}
"""


def _sdist(folder: Path, cmake: str) -> Path:
    """A `llama_cpp_python-<pinned>.tar.gz` whose vendor/llama.cpp is the given CMake project."""
    name = f"llama_cpp_python-{build.llama_cpp_python_version()}"
    path = folder / f"{name}.tar.gz"
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for rel, text in (("CMakeLists.txt", cmake), ("main.c", FAKE_SERVER)):
            data = text.encode()
            info = tarfile.TarInfo(f"{name}/vendor/llama.cpp/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DSV4_ENGINE_CACHE", str(tmp_path / "engines"))
    monkeypatch.delenv("DSV4_ENGINE_BIN", raising=False)
    return tmp_path / "engines"


def test_build_is_cached_and_atomic(cache: Path) -> None:
    targets = "\n".join(f"add_executable({t} main.c)" for t in build.TARGETS)
    bin_dir = "set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)"  # as llama.cpp's CMakeLists does
    _sdist(cache / "sdist", f"cmake_minimum_required(VERSION 3.14)\nproject(fake C)\n{bin_dir}\n{targets}\n")
    steps: list[tuple[int, int]] = []
    first = build.build_engine("cpu", jobs=2, on_step=lambda done, total: steps.append((done, total)))
    assert not first.cached
    assert first.engine.version == "42 (fake)" and first.engine.gpu == "cpu"
    assert steps and steps[-1][0] == steps[-1][1]  # ninja's [n/N] lines reached the callback as they came
    manifest = json.loads((first.path / "engine.json").read_text())
    assert manifest["targets"] == list(build.TARGETS)
    assert all((first.path / "bin" / t).is_file() for t in build.TARGETS)
    assert not (cache / "build" / build.build_key("cpu")).exists()  # the cmake tree is dropped once installed
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temporary folders left
    second = build.build_engine("cpu")
    assert second.cached and second.path == first.path
    assert build.find_engine().server == first.engine.server


def test_failed_build_names_the_log_and_its_tail(cache: Path) -> None:
    _sdist(
        cache / "sdist", 'cmake_minimum_required(VERSION 3.14)\nproject(fake C)\nmessage(FATAL_ERROR "no compiler")\n'
    )
    with pytest.raises(build.EngineError) as failure:
        build.build_engine("cpu")
    message = str(failure.value)
    assert "cmake configure failed" in message and "no compiler" in message
    assert str(cache / "logs") in message
    assert not (cache / build.build_key("cpu")).exists()


def test_keys_differ_by_backend_and_are_stable() -> None:
    keys = {gpu: build.build_key(gpu) for gpu in build.GPU_FLAGS}
    assert len(set(keys.values())) == len(keys)
    assert build.build_key("cpu") == keys["cpu"]
    with pytest.raises(build.EngineError, match="--gpu"):
        build.build_key("tpu")


def test_missing_engine_says_how_to_build(dsv4, cache: Path) -> None:
    result = dsv4("engine", "check")
    assert result.code == 1 and "not built yet" in result.stderr and "dsv4 engine build" in result.stderr


def test_user_binary_must_answer_version(dsv4, cache: Path, tmp_path: Path) -> None:
    result = dsv4("engine", "check", "--engine-bin", "/bin/true")
    assert result.code == 1 and "does not look like llama-server" in result.stderr
    result = dsv4("engine", "check", "--engine-bin", str(tmp_path / "missing"))
    assert result.code == 1 and "not an executable file" in result.stderr
