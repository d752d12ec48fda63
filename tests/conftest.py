"""Shared fixtures: every test gets its own DSV4_HOME/HF_HOME and stable terminal output.

The tiny checkpoint and its GGUF are written once per session (both are deterministic) and copied
or read by the tests that need them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
