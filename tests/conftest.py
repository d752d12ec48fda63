"""Shared fixtures: every test gets its own DSV4_HOME/HF_HOME and stable terminal output.

The tiny checkpoint and its GGUF are written once per session (both are deterministic) and copied
or read by the tests that need them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GGUF_REPO = "test-org/tiny-GGUF"  # the tiny model published as a pre-quantized GGUF repo (gguf_repo_dir)
GGUF_TAG = "UD-Q2_K_XL"
# The test tiers (README, "Tests"): `make test-fast` deselects these, `make test` runs everything.
MARKERS = {
    "slow": "converts several GGUFs or loads models in llama.cpp subprocesses (seconds each)",
    "fuzz": "hundreds of generated hostile inputs",
    "server": "runs the engine build's programs (llama-server, rpc-server, llama-perplexity): every test using the "
    "`engine` fixture, and test_eval",
    "engine_build": "builds (or checks the cached build of) the llama.cpp engine",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, why in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {why}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the engine build, however indirectly, is in the server tier."""
    for item in items:
        if "engine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dsv4-home"
    monkeypatch.setenv("DSV4_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("DSV4_DEBUG", raising=False)
    return home


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def dsv4(capsys: pytest.CaptureFixture[str]):
    """Run the real `dsv4` entry point in-process (error handling included) and capture its output."""
    from dsv4cli.cli import main

    def run(*argv: str) -> CliResult:
        capsys.readouterr()
        try:
            main(list(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def python() -> str:
    """The interpreter to run subprocesses with (the one running the tests)."""
    return sys.executable


def _write_builtin_checkpoint(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """Write a built-in tiny checkpoint once per session; the registry is read with an empty home so a
    user's own models.toml cannot change the built-in entry."""
    from dsv4cli.models.registry import get_model
    from dsv4cli.models.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp(f"{name}-checkpoint")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSV4_HOME", str(root / "empty-home"))
        spec = get_model(name)
    write_tiny_checkpoint(spec, root / name)
    return root / name


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the `tiny` checkpoint (V4-Flash layout, FP4 experts); read-only for tests."""
    return _write_builtin_checkpoint(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the `tiny-base` checkpoint (V4-Flash-Base layout, FP8 experts); read-only for tests."""
    return _write_builtin_checkpoint(tmp_path_factory, "tiny-base")


@pytest.fixture(scope="session")
def tiny_v41_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the `tiny-v41` checkpoint (V4.1-Flash layout with Engram tables); read-only for tests."""
    return _write_builtin_checkpoint(tmp_path_factory, "tiny-v41")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """The default-recipe GGUF (MXFP4 experts, Q8_0 dense) of `tiny`, with its report beside it; read-only."""
    from quant.convert import QuantOptions, quantize_checkpoint

    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny-mxfp4-q8_0.gguf"
    quantize_checkpoint(tiny_checkpoint, out, QuantOptions())
    return out


@pytest.fixture(scope="session")
def tiny_imatrix(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Path:
    """`dsv4 imatrix` of the tiny GGUF (two chunks of the built-in text), run in a subprocess; read-only."""
    home = tmp_path_factory.mktemp("imatrix-home")
    env = {**os.environ, "DSV4_HOME": str(home)}
    argv = [sys.executable, "-m", "dsv4cli", "imatrix", str(tiny_gguf), "--chunks", "2", "--chunk", "128", "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Path(json.loads(proc.stdout)["file"])


@pytest.fixture(scope="session")
def mtp_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """`tiny` quantized with `--mtp`: the default recipe plus the MTP block as one more layer; read-only."""
    from quant.convert import QuantOptions, quantize_checkpoint

    out = tmp_path_factory.mktemp("tiny-mtp") / "tiny-mtp.gguf"
    quantize_checkpoint(tiny_checkpoint, out, QuantOptions(mtp=True))
    return out


@pytest.fixture(scope="session")
def engine():
    """The CPU engine build (llama-server, rpc-server) from the engine cache: built once if missing (`make setup`
    builds it; about 10 minutes on 2 cores), then shared by every test that starts a server."""
    from dsv4cli.toolchain.build import build_engine

    return build_engine("cpu").engine


@pytest.fixture
def fake_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Put a stand-in command (e.g. `nvidia-smi`, `rocm-smi`) printing fixed output first on PATH.

    PATH keeps only the system folders after it, so a real GPU tool on the test machine cannot answer instead.
    """
    folder = tmp_path / "fake-bin"

    def install(name: str, output: str) -> Path:
        folder.mkdir(exist_ok=True)
        script = folder / name
        script.write_text(f"#!/bin/sh\ncat <<'END'\n{output}\nEND\n")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
        return script

    return install


@pytest.fixture(scope="session")
def gguf_repo_dir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_gguf: Path) -> Path:
    """The tiny model as a pre-quantized GGUF repo: a split set in a tag folder (unsloth's layout), a Q8_0 file."""
    from quant.convert import QuantOptions, quantize_checkpoint

    root = tmp_path_factory.mktemp("gguf-repo")
    (root / GGUF_TAG).mkdir()
    report = quantize_checkpoint(
        tiny_checkpoint, root / GGUF_TAG / f"tiny-{GGUF_TAG}.gguf", QuantOptions(split_max_size=3 << 20)
    )
    assert len(report.outputs) > 2
    shutil.copy(tiny_gguf, root / "tiny-Q8_0.gguf")
    (root / "README.md").write_text("tiny GGUFs\n")
    return root


@pytest.fixture
def gguf_hub(gguf_repo_dir: Path, monkeypatch: pytest.MonkeyPatch):
    from tests.hub_server import published

    with published(gguf_repo_dir, GGUF_REPO, monkeypatch) as server:
        yield server
