"""The safetensors reader validates every header before touching data; the writer is deterministic and atomic."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from quant.errors import CheckpointError
from quant.safetensors import Checkpoint, read_header, write_safetensors


def handmade(path: Path, header: dict, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors file built byte by byte, independently of write_safetensors."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def sample_tensors() -> dict[str, tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        "embed.weight": ("BF16", rng.integers(0, 2**16, size=(4, 8), dtype=np.uint16)),
        "layers.0.attn.attn_sink": ("F32", rng.normal(size=(4,)).astype(np.float32)),
        "layers.0.ffn.gate.tid2eid": ("I64", rng.integers(0, 16, size=(5, 2))),
        "layers.0.ffn.experts.0.w1.weight": ("I8", rng.integers(0, 256, size=(3, 16), dtype=np.uint8)),
        "layers.0.attn.wkv.weight": ("F8_E4M3", rng.integers(0, 256, size=(3, 5), dtype=np.uint8)),
        "layers.0.attn.wkv.scale": ("F8_E8M0", np.array([[127]], dtype=np.uint8)),
        "hc_head_scale": ("F32", np.float32(1.5)),
        "f16": ("F16", np.arange(3, dtype=np.float16)),
        "f64": ("F64", np.arange(3, dtype=np.float64)),
        "i16": ("I16", np.arange(3, dtype=np.int16)),
        "i32": ("I32", np.arange(3, dtype=np.int32)),
        "u8": ("U8", np.arange(3, dtype=np.uint8)),
        "empty": ("F32", np.zeros((0, 4), dtype=np.float32)),
    }


def test_round_trip_reads_back_every_tensor_by_rows(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    payload = write_safetensors(path, tensors)
    assert payload == sum(a.nbytes for _, a in tensors.values())
    (tmp_path / "config.json").write_text("{}")
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.names() == list(tensors)
        for name, (dtype, array) in tensors.items():
            info = ckpt.info(name)
            assert (info.dtype, info.shape, info.nbytes) == (dtype, array.shape, array.nbytes)
            assert ckpt.raw(name).shape == array.shape
            assert ckpt.raw(name).tobytes() == np.ascontiguousarray(array).tobytes()
        rows = ckpt.read("embed.weight", 1, 3)
        assert rows.tobytes() == tensors["embed.weight"][1][1:3].tobytes()
        assert ckpt.read("f16").shape == (1, 3)  # 1-D tensors are one row
        assert ckpt.raw("embed.weight").dtype == np.uint16
        assert ckpt.raw("layers.0.ffn.experts.0.w1.weight").dtype == np.int8
        assert ckpt.raw("layers.0.ffn.gate.tid2eid").dtype == np.int64


def test_writer_is_deterministic_padded_and_leaves_no_temp_files(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_safetensors(a, sample_tensors())
    write_safetensors(b, sample_tensors())
    assert a.read_bytes() == b.read_bytes()
    header_len = struct.unpack("<Q", a.read_bytes()[:8])[0]
    assert header_len % 8 == 0
    header = json.loads(a.read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"] == {"format": "pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, sample_tensors())
    before = path.read_bytes()
    with pytest.raises(ValueError, match="'bad'"):
        write_safetensors(path, {"ok": ("F32", np.ones(2, np.float32)), "bad": ("BF16", np.ones(2, np.float32))})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_truncated_file_names_file_and_tensor(tmp_path):
    path = tmp_path / "model-00002-of-00007.safetensors"
    write_safetensors(path, sample_tensors())
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00007\.safetensors: tensor 'i16'.*outside") as err:
        read_header(path)
    assert "dsv4 pull" in err.value.hint


@pytest.mark.parametrize(
    ("header", "data", "length", "expected"),
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**6, "header length"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "tensor 'w'.*outside"),
        ({"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "tensor 'w'.*Q4_K"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "tensor 'w'.*non-negative"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 12, None, "tensor 'w'.*expected 12"),
        ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "tensor 'w'.*data_offsets"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "tensor 'w'"),
        ([1, 2], b"", None, "not a JSON object"),
    ],
)
def test_bad_headers_are_rejected_before_data_is_read(tmp_path, header, data, length, expected):
    path = handmade(tmp_path / "model-00001-of-00001.safetensors", header, data, length=length)
    with pytest.raises(CheckpointError, match=expected) as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_overlapping_offsets_name_both_tensors(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    path = handmade(tmp_path / "x.safetensors", header, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"tensor 'b'.*overlaps tensor 'a'"):
        read_header(path)


def test_invalid_json_and_tiny_files(tmp_path):
    bad_json = tmp_path / "bad.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(bad_json)
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        read_header(stub)


def test_checkpoint_reads_the_tiny_model(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint)
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    assert ckpt.names() == list(index["weight_map"])
    assert ckpt.config["model_type"] == "deepseek_v4"
    info = ckpt.info("layers.0.ffn.gate.tid2eid")
    assert info.dtype == "I64" and ckpt.raw("layers.0.ffn.gate.tid2eid").shape == info.shape
    assert ckpt.folder == tiny_checkpoint


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def test_missing_shard_names_the_shard_and_says_to_pull(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    (folder / "model-00004-of-00007.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00004-of-00007\.safetensors.*missing.*layers\.2\.") as err:
        Checkpoint(folder)
    assert "dsv4 pull" in err.value.hint


def test_index_entry_absent_from_its_shard_is_named(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["layers.0.attn.wq_c.weight"] = "model-00002-of-00007.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00007\.safetensors: tensor 'layers\.0\.attn\.wq_c"):
        Checkpoint(folder)


def test_truncated_shard_in_checkpoint_is_reported_at_open(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    shard = folder / "model-00003-of-00007.safetensors"
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"model-00003-of-00007\.safetensors: tensor 'layers\.1\..*outside"):
        Checkpoint(folder)


def test_missing_config_and_single_file_checkpoints(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", sample_tensors())
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v4"}')
    ckpt = Checkpoint(tmp_path)
    assert ckpt.names() == list(sample_tensors())
    assert ckpt.raw("hc_head_scale") == np.float32(1.5)


def test_hostile_names_and_values_stay_on_one_short_line(tmp_path):
    name = "evil\nname" + "x" * 10_000
    header = {name: {"dtype": "F32", "shape": [1] * 3 + [10**6], "data_offsets": [0, 8]}}
    path = handmade(tmp_path / "x.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError) as err:
        read_header(path)
    message = str(err.value)
    assert "\n" not in message and len(message) < 500 and "evil\\nname" in message


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_non_regular_files_are_refused_without_reading(tmp_path, kind):
    import os

    path = tmp_path / "model.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_header(path)
