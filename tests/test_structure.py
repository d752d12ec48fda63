"""The shape of the source tree: no import circles, no module over 500 lines, a light `dsv4 --help`.

Circles are found on the module-level imports (what runs when a module is imported: not imports inside functions,
not `if TYPE_CHECKING:` blocks), read from the source with `ast`, so a circle fails here by name before it fails
at import time in some order of imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dsv4cli", "quant")
MAX_LINES = 500
HEAVY = ("numpy", "gguf", "llama_cpp", "jinja2")


def modules() -> dict[str, Path]:
    """Every module of our packages by dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run at import time, descending into try/if (except `if TYPE_CHECKING`), not into defs."""
    out = []
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out += _module_level(node.orelse)
        elif isinstance(node, (ast.If, ast.Try)):
            out += _module_level(node.body) + _module_level(node.orelse)
            out += [s for h in getattr(node, "handlers", []) for s in _module_level(h.body)]
            out += _module_level(getattr(node, "finalbody", []))
        else:
            out.append(node)
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules `name` imports at module level (`from pkg import sub` counts as importing pkg.sub)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _module_level(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up node.level - 1 packages from this one
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles() -> None:
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert graph["dsv4cli.load.prepared"] >= {"dsv4cli.load.model_file", "dsv4cli.engine.params"}  # the reader works
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_module_over_500_lines() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (lines): {long}"


def test_help_imports_nothing_heavy() -> None:
    """`dsv4 --help` (and a command's) loads no numpy, gguf, llama_cpp or jinja2: they are half of start-up."""
    for argv in (["--help"], ["chat", "--help"], ["plan", "--help"]):
        code = (
            "import sys, runpy; sys.argv = ['dsv4', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('dsv4cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print(sorted(set({HEAVY!r}) & set(sys.modules)), file=sys.stderr)"
        )
        run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
        assert run.stderr.strip().splitlines()[-1] == "[]", (argv, run.stderr[-500:])
