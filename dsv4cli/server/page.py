"""The chat page `dsv4 serve` shows at `/`: `webui/index.html` with the model's name and placement filled in.

llama-server built without its own web UI serves a folder given with `--path`, and lets `/` through without a key,
so serve writes the page into a folder of its own per port (`$DSV4_HOME/run/webui-<port>/`) and hands that over;
the page itself asks for the key (sent as a Bearer token) when the server has one.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

from dsv4cli.atomic import write_text_atomic
from dsv4cli.server.records import run_dir

PAGE = Path(__file__).with_name("webui") / "index.html"
INFO_SLOT = '<script id="dsv4-info" type="application/json">{}</script>'


def placement_summary(llama_args: list[str]) -> str:
    """A short line from llama-server's placement flags: GPU layers, experts in RAM, context, RPC workers."""
    values = {flag: value for flag, value in itertools.pairwise(llama_args) if flag.startswith("-")}
    layers = int(values.get("-ngl", "0"))
    parts = [f"{layers} layers on GPU" if layers else "CPU only"]
    if "-ot" in llama_args:
        parts.append("experts in host RAM")
    if "--rpc" in values:
        parts.append(f"RPC workers {values['--rpc']}")
    parts.append(f"context {values.get('-c', '?')}")
    return ", ".join(parts)


def write_page(port: int, info: dict[str, object]) -> Path:
    """The folder to give llama-server as `--path`, holding the page with `info` (model, gguf, placement, mtp)."""
    folder = run_dir() / f"webui-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    data = json.dumps(info).replace("<", "\\u003c")  # nothing in it can close the script element
    page = PAGE.read_text(encoding="utf-8").replace(INFO_SLOT, INFO_SLOT.replace("{}", data))
    write_text_atomic(folder / "index.html", page)
    return folder


def remove_page(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
