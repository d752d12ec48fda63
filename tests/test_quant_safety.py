"""Writes that stay whole: one writer per output, split sets that never mix, full disks, ordered GGUF writes.

Conversions here use `--dense bf16` on the FP4 `tiny` model: every tensor is a lossless repack or copy, so the
runs are quick and need no ggml.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from quant.convert import QuantOptions, quantize_checkpoint
from quant.errors import OutputError
from quant.gguf_out import StreamingGGUF, temp_dir_for
from quant.gguf_set import SET_ID_KEY, complete_split_set
from quant.mapping import TensorSpec
from tests.mounts import tmpfs

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = QuantOptions(dense="bf16")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def assert_complete_gguf(path: Path) -> None:
    """Every tensor's data lies inside the file: nothing truncated, nothing half-written."""
    reader = GGUFReader(path)
    assert reader.tensors
    end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    assert end <= path.stat().st_size


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks")
def test_two_runs_on_one_output(tiny_checkpoint: Path, tmp_path: Path, python: str) -> None:
    out = tmp_path / "o.gguf"
    argv = [python, "-m", "dsv4cli", "quantize", str(tiny_checkpoint), "-o", str(out), "--dense", "bf16"]
    first = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not temp_dir_for(out).exists() and first.poll() is None:  # the first run holds the lock by now
        assert time.monotonic() < deadline
        time.sleep(0.002)
    second = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=120)
    _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr
    assert f"pid {first.pid}" in lines[0] or "already exists" in lines[0], lines[0]
    assert_complete_gguf(out)
    assert not temp_dir_for(out).exists()


def test_lock_names_the_holder(tiny_checkpoint: Path, tmp_path: Path, python: str) -> None:
    out = tmp_path / "o.gguf"
    holder = subprocess.Popen(
        [python, "-c", "import sys, time; from quant.outlock import output_lock\n"
         "from pathlib import Path\nwith output_lock(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(60)",
         str(out)],
        env=env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f"another dsv4 quantize \\(pid {holder.pid}\\)"):
            quantize_checkpoint(tiny_checkpoint, out, OPTIONS)
        assert not out.exists() and not temp_dir_for(out).exists()
    finally:
        holder.kill()
        holder.wait()
    quantize_checkpoint(tiny_checkpoint, out, OPTIONS)  # the kernel released the dead holder's lock
    assert_complete_gguf(out)


KILL_AFTER_FIRST_MOVE = """
import os, signal, sys
from pathlib import Path
import quant.gguf_out as gguf_out
from quant.convert import QuantOptions, quantize_checkpoint
real = os.replace
def replace_then_die(src, dst):
    real(src, dst)
    if str(dst).endswith(".gguf") and ".partial" not in str(dst):  # the first move under a final name
        os.kill(os.getpid(), signal.SIGKILL)
gguf_out.os.replace = replace_then_die
quantize_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), QuantOptions(dense="bf16", split_max_size=3_000_000))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_kill_during_split_commit_never_leaves_a_mixed_set(tiny_checkpoint: Path, tmp_path: Path, python: str) -> None:
    out = tmp_path / "o.gguf"
    old = quantize_checkpoint(tiny_checkpoint, out, QuantOptions(dense="bf16", split_max_size=3_000_000))
    shards = [Path(p) for p in old.outputs]
    assert len(shards) > 2 and complete_split_set(shards[0]) == shards
    old_id = GGUFReader(shards[1]).get_field(SET_ID_KEY).contents()
    renamed = tmp_path / "renamed"  # same tensors and sizes, another name in the metadata: another set id
    renamed.mkdir()
    for item in tiny_checkpoint.iterdir():
        (renamed / item.name).symlink_to(item)
    proc = subprocess.run([python, "-c", KILL_AFTER_FIRST_MOVE, str(renamed), str(out)], env=env(), timeout=120)
    assert proc.returncode == -9
    ids = {GGUFReader(s).get_field(SET_ID_KEY).contents() for s in shards if s.exists()}
    assert len(ids) == 2 and old_id in ids  # one shard of the new set is in place, next to old ones ...
    with pytest.raises(OutputError, match="missing"):  # ... but the set cannot be opened: no first shard
        complete_split_set(shards[0])
    new = quantize_checkpoint(renamed, out, QuantOptions(dense="bf16", split_max_size=3_000_000))
    assert complete_split_set(Path(new.outputs[0])) == shards


def test_mixed_split_set_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for item in tiny_checkpoint.iterdir():
        (renamed / item.name).symlink_to(item)
    first = quantize_checkpoint(tiny_checkpoint, a, QuantOptions(dense="bf16", split_max_size=3_000_000))
    second = quantize_checkpoint(renamed, b, QuantOptions(dense="bf16", split_max_size=3_000_000))
    os.replace(second.outputs[-1], first.outputs[-1])
    with pytest.raises(OutputError, match="mixed"):
        complete_split_set(Path(first.outputs[0]))
    with pytest.raises(OutputError, match="first shard"):
        complete_split_set(Path(first.outputs[1]))


@pytest.mark.skipif(sys.platform == "win32", reason="tmpfs")
def test_disk_full_mid_write_removes_everything(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", 4 << 20) as small:
        out = small / "o.gguf"
        with pytest.raises(OutputError, match="disk full") as err:
            quantize_checkpoint(tiny_checkpoint, out, OPTIONS)  # the library call skips the CLI's size check
        assert "removed" in str(err.value) and "kept" not in str(err.value)
        assert list(small.iterdir()) == []


def test_read_only_folder_is_one_line(dsv4, tiny_checkpoint: Path, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        folder = tmp_path / "ro"
        if os.geteuid() == 0:  # root ignores permission bits: only a read-only mount stops its writes
            stack.enter_context(tmpfs(folder, 1 << 20, read_only=True))
        else:
            folder.mkdir(mode=0o555)
        result = dsv4("quantize", str(tiny_checkpoint), "-o", str(folder / "o.gguf"), "--dense", "bf16")
        lines = result.stderr.strip().splitlines()
        assert result.code == 1 and len(lines) == 1 and "cannot write" in lines[0] and str(folder) in lines[0]


def test_writer_rejects_out_of_order_and_short_tensors(tmp_path: Path) -> None:
    specs = [TensorSpec("a.weight", (4,), 0, 16), TensorSpec("b.weight", (4,), 0, 16)]
    kv = [("general.architecture", "deepseek4", None, None)]
    with (
        pytest.raises(ValueError, match="out of the declared order"),
        StreamingGGUF(tmp_path / "x.gguf", "t", kv, specs) as w,
    ):
        w.begin("b.weight")
    with pytest.raises(ValueError, match="expected 16"), StreamingGGUF(tmp_path / "x.gguf", "t", kv, specs) as w:
        w.begin("a.weight")
        w.append(np.zeros(2, np.float32))
        w.begin("b.weight")
    with pytest.raises(ValueError, match="never written"), StreamingGGUF(tmp_path / "x.gguf", "t", kv, specs) as w:
        w.begin("a.weight")
        w.append(np.zeros(4, np.float32))
        w.commit()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_experts_falling_back_to_a_type_without_search(dsv4, tmp_path: Path) -> None:
    """Expert rows that fit no Q4_K block (192 wide) fall back to Q8_0, which has no per-expert search."""
    from dsv4cli.models.registry import ModelSpec, get_model
    from dsv4cli.models.tiny import write_tiny_checkpoint

    config = {**get_model("tiny-base").config, "moe_intermediate_size": 192}
    folder = tmp_path / "odd"
    write_tiny_checkpoint(ModelSpec(name="odd", builtin=True, expert_dtype="fp8", config=config), folder)
    out = tmp_path / "odd.gguf"
    result = dsv4("quantize", str(folder), "-o", str(out), "--experts", "q4_k", "--dense", "bf16")
    assert result.code == 0, result.stderr
    assert "ffn_down_exps.weight stored as Q8_0" in result.stderr
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == "Q8_0" and types["blk.0.ffn_gate_exps.weight"] == "Q4_K"
