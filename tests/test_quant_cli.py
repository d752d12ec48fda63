"""`dsv4 quantize` end to end: registry names, refusing to overwrite, bad input and interruption.

Every failure must be one `error:` line naming the file (and tensor), exit non-zero, and leave nothing under the
output name (no file, no shard, no leftover temporary folder).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from quant.gguf_out import temp_dir_for
from tests.mounts import tmpfs


@pytest.fixture
def ckpt(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint to damage."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def shard_holding(folder: Path, tensor: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][tensor]


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def assert_clean_failure(result, out: Path, *needles: str) -> None:
    assert result.code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and not temp_dir_for(out).exists()
    assert not list(out.parent.glob(f"{out.stem}*"))


def test_quantize_folder_then_refuse_overwrite(dsv4, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "tiny.gguf"
    first = dsv4("quantize", str(ckpt), "-o", str(out))
    assert first.code == 0, first.stderr
    assert f"wrote {out}" in first.stdout and "lossless FP4 repack" in first.stdout
    again = dsv4("quantize", str(ckpt), "-o", str(out))
    assert again.code == 1 and "already exists" in again.stderr and "--force" in again.stderr
    forced = dsv4("quantize", str(ckpt), "-o", str(out), "--force", "--json")
    data = json.loads(forced.stdout)
    assert data["outputs"] == [str(out)] and data["summary"]["method"] == "lossless FP4 repack"


def test_registry_name_needs_complete_pull(dsv4, isolated_env: Path) -> None:
    missing = dsv4("quantize", "tiny")
    assert missing.code == 1 and "dsv4 pull tiny" in missing.stderr
    assert dsv4("pull", "tiny").code == 0
    done = dsv4("quantize", "tiny", "--json")
    assert done.code == 0, done.stderr
    out = Path(json.loads(done.stdout)["outputs"][0])
    assert out == isolated_env / "gguf" / "tiny-mxfp4-q8_0.gguf" and out.is_file()


def test_missing_shard(dsv4, ckpt: Path, tmp_path: Path) -> None:
    shard = shard_holding(ckpt, "layers.1.attn.wq_a.weight")
    shard.unlink()
    out = tmp_path / "o.gguf"
    assert_clean_failure(dsv4("quantize", str(ckpt), "-o", str(out)), out, str(shard), "missing")


def test_truncated_shard(dsv4, ckpt: Path, tmp_path: Path) -> None:
    shard = shard_holding(ckpt, "layers.2.attn.wq_a.weight")
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 4096)
    out = tmp_path / "o.gguf"
    assert_clean_failure(dsv4("quantize", str(ckpt), "-o", str(out)), out, str(shard), "tensor '")


def test_header_pointing_past_the_end(dsv4, ckpt: Path, tmp_path: Path) -> None:
    name = "layers.0.attn.wkv.weight"
    shard = shard_holding(ckpt, name)
    rewrite_header(shard, lambda h: h[name].update(data_offsets=[h[name]["data_offsets"][0], 10**9]))
    out = tmp_path / "o.gguf"
    assert_clean_failure(dsv4("quantize", str(ckpt), "-o", str(out)), out, str(shard), name)


def test_unknown_dtype(dsv4, ckpt: Path, tmp_path: Path) -> None:
    name = "layers.3.attn.attn_sink"
    shard = shard_holding(ckpt, name)
    rewrite_header(shard, lambda h: h[name].update(dtype="F6_E3M2"))
    out = tmp_path / "o.gguf"
    assert_clean_failure(dsv4("quantize", str(ckpt), "-o", str(out)), out, str(shard), name, "F6_E3M2")


@pytest.mark.parametrize(
    ("name", "reshape"),
    [
        ("embed.weight", lambda s: s[::-1]),  # transposed: right element count, silently wrong without a check
        ("layers.0.ffn.gate.tid2eid", lambda s: s[::-1]),
        ("layers.2.attn.compressor.ape", lambda s: [s[0] * s[1]]),
        ("layers.1.ffn.experts.3.w2.weight", lambda s: s[::-1]),
        ("layers.1.ffn.experts.3.w1.scale", lambda s: s[::-1]),
        ("layers.1.attn.wq_a.scale", lambda s: s[::-1]),
    ],
)
def test_wrong_shapes_with_the_right_byte_count(dsv4, ckpt: Path, tmp_path: Path, name: str, reshape) -> None:
    shard = shard_holding(ckpt, name)
    rewrite_header(shard, lambda h: h[name].update(shape=reshape(h[name]["shape"])))
    out = tmp_path / "o.gguf"
    assert_clean_failure(dsv4("quantize", str(ckpt), "-o", str(out)), out, str(shard), name)


def test_unexpected_tensor(dsv4, ckpt: Path, tmp_path: Path) -> None:
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = shard_holding(ckpt, "layers.0.attn.attn_sink")
    rewrite_header(shard, lambda h: h.update({"layers.0.attn.extra": h["layers.0.attn.attn_sink"]}))
    index["weight_map"]["layers.0.attn.extra"] = shard.name
    index_path.write_text(json.dumps(index))
    out = tmp_path / "o.gguf"
    result = dsv4("quantize", str(ckpt), "-o", str(out))
    assert result.code != 0 and "layers.0.attn" in result.stderr
    assert not out.exists() and not temp_dir_for(out).exists()


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda c: c.pop("hc_eps"), "missing key 'hc_eps'"),
        (lambda c: c.update(architectures=["LlamaForCausalLM"]), "LlamaForCausalLM"),
        (lambda c: c.update(hidden_size=512), "expected"),
    ],
    ids=["missing-key", "unsupported-arch", "shape-mismatch"],
)
def test_bad_config(dsv4, ckpt: Path, tmp_path: Path, edit: Callable[[dict], object], needle: str) -> None:
    config_path = ckpt / "config.json"
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config))
    out = tmp_path / "o.gguf"
    result = dsv4("quantize", str(ckpt), "-o", str(out))
    assert_clean_failure(result, out, needle)
    assert str(ckpt) in result.stderr


def test_not_enough_disk(dsv4, ckpt: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", 1 << 20) as small:
        out = small / "o.gguf"
        assert_clean_failure(dsv4("quantize", str(ckpt), "-o", str(out)), out, "not enough free disk", str(small))


def run_until_writing(python: str, source: Path, out: Path, *extra: str, at_least: int = 1 << 20) -> subprocess.Popen:
    """Start a conversion in a subprocess and return once it has written `at_least` bytes of the output."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    argv = [python, "-m", "dsv4cli", "quantize", str(source), "-o", str(out), *extra]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > at_least for p in temp_dir_for(out).glob("*.gguf")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return proc


def run_quantize(python: str, source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    argv = [python, "-m", "dsv4cli", "quantize", str(source), "-o", str(out), *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_killed_and_interrupted_runs_leave_no_final_file(
    python: str, tiny_base_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o.gguf"
    proc = run_until_writing(python, tiny_base_checkpoint, out)
    proc.kill()
    proc.wait()
    assert not out.exists() and not out.with_name(out.name + ".report.json").exists()
    assert temp_dir_for(out).exists()  # what a killed run leaves: only the hidden temporary folder

    rerun = run_quantize(python, tiny_base_checkpoint, out)
    assert rerun.returncode == 0, rerun.stderr
    assert out.is_file() and not temp_dir_for(out).exists()

    other = tmp_path / "interrupted.gguf"
    proc = run_until_writing(python, tiny_base_checkpoint, other)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert b"run the same command again to resume" in stderr
    assert not other.exists() and temp_dir_for(other).exists()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_interrupted_runs_resume_to_a_byte_identical_file(
    python: str, tiny_base_checkpoint: Path, tmp_path: Path
) -> None:
    """kill -9, then Ctrl-C, then a damaged journaled tensor: the resumed file equals an uninterrupted run's."""
    extra = ("--dense", "bf16", "--split-max-size", "4M")
    clean = tmp_path / "clean" / "m.gguf"
    first = run_quantize(python, tiny_base_checkpoint, clean, *extra)
    assert first.returncode == 0, first.stderr

    out = tmp_path / "resumed" / "m.gguf"
    proc = run_until_writing(python, tiny_base_checkpoint, out, *extra, at_least=1 << 20)
    proc.kill()
    proc.wait()
    journal = temp_dir_for(out) / "journal.jsonl"
    done = len(journal.read_text().splitlines()) - 1
    assert done > 0
    proc = run_until_writing(python, tiny_base_checkpoint, out, *extra, at_least=3 << 20)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    entries = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    assert len(entries) > done
    victim = entries[len(entries) // 2]  # damage a journaled tensor: it and everything after are redone
    shard = sorted(temp_dir_for(out).glob("*.gguf"))[victim["shard"]]
    with shard.open("r+b") as f:
        f.seek(victim["start"])
        byte = f.read(1)
        f.seek(victim["start"])
        f.write(bytes([byte[0] ^ 0xFF]))

    final = run_quantize(python, tiny_base_checkpoint, out, *extra)
    assert final.returncode == 0, final.stderr
    assert f"resumed after {len(entries) // 2} tensors" in final.stdout
    clean_files = sorted(clean.parent.glob("*.gguf"))
    resumed_files = sorted(out.parent.glob("*.gguf"))
    assert len(clean_files) == len(resumed_files) > 1
    for a, b in zip(clean_files, resumed_files, strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()
    assert not temp_dir_for(out).exists()
