"""Bad GGUFs get a one-line error before llama.cpp sees them (several of these would abort the process).

Each bad file is the tiny GGUF copied with one key changed or one tensor dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest

from dsv4cli.errors import RuntimeLoadError
from dsv4cli.gguf_io.check import check_gguf

A = "deepseek4."


def rewrite(
    src: Path, dst: Path, *, arch: str = "deepseek4", set_: dict[str, Any] | None = None, drop: str = ""
) -> Path:
    """Copy `src` with keys replaced (same value type unless a (value, type[, sub_type]) tuple) and a tensor dropped."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch)
    changes = dict(set_ or {})
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = changes.pop(field.name, field.contents())
        if isinstance(value, tuple):
            value, vtype, *rest = value
            sub = rest[0] if rest else sub
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for key, (value, vtype, *rest) in changes.items():
        writer.add_key_value(key, value, vtype, sub_type=rest[0] if rest else None)
    tensors = [t for t in reader.tensors if t.name != drop]
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return dst


def test_unchanged_copy_passes(tiny_gguf: Path, tmp_path: Path) -> None:
    assert check_gguf(rewrite(tiny_gguf, tmp_path / "copy.gguf")).arch == "deepseek4"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match=r"GGUF file not found: .*nope\.gguf"):
        check_gguf(tmp_path / "nope.gguf")


def test_corrupt_file(tiny_gguf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:200])
    with pytest.raises(RuntimeLoadError, match="is not a readable GGUF file"):
        check_gguf(bad)
    (tmp_path / "text.gguf").write_text("not a gguf at all")
    with pytest.raises(RuntimeLoadError, match="is not a readable GGUF file"):
        check_gguf(tmp_path / "text.gguf")


def test_wrong_architecture(tiny_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match="has architecture 'llama', not 'deepseek4'"):
        check_gguf(rewrite(tiny_gguf, tmp_path / "llama.gguf", arch="llama"))


def test_v41_gets_its_own_message(tiny_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match=r"has no deepseek41 architecture yet; V4\.1 GGUFs can be quantized"):
        check_gguf(rewrite(tiny_gguf, tmp_path / "v41.gguf", arch="deepseek41"))


U32, I32, F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32, gguf.GGUFValueType.FLOAT32
ARR = gguf.GGUFValueType.ARRAY


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # Each of these aborts llama.cpp (GGML_ASSERT / SIGFPE) or fails its load (docs/formats.md §Hard constraints).
        ({A + "hyper_connection.count": 3}, "hyper_connection.count must be 4"),
        ({A + "expert_gating_func": 2}, "expert_gating_func must be 4"),
        ({A + "attention.head_count_kv": 4}, "head_count_kv must be present and 1"),
        ({A + "attention.indexer.key_length": 32}, "indexer.key_length 32 is not a multiple of 64"),
        ({A + "attention.compress_ratios": [0, 0, 128, 128, 0]}, "has no ratio-4 layer"),
        ({A + "attention.compress_ratios": [0, 0, 4, 64, 0]}, r"contains \[64\]"),
        ({A + "attention.compress_ratios": [0, 0, 4]}, "at least block_count = 4"),
        ({A + "swiglu_clamp_exp": ([10.0] * 5, ARR, F32)}, "swiglu_clamp_exp has 5 entries; expected block_count = 4"),
    ],
)
def test_hard_constraints(tiny_gguf: Path, tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(RuntimeLoadError, match=message):
        check_gguf(rewrite(tiny_gguf, tmp_path / "bad.gguf", set_=changes))


def test_duplicate_token_strings(tiny_gguf: Path, tmp_path: Path) -> None:
    tokens = gguf.GGUFReader(tiny_gguf).get_field("tokenizer.ggml.tokens").contents()
    tokens[5] = tokens[4]
    bad = rewrite(tiny_gguf, tmp_path / "dup.gguf", set_={"tokenizer.ggml.tokens": tokens})
    with pytest.raises(RuntimeLoadError, match="duplicate token string"):
        check_gguf(bad)


def test_missing_tensor(tiny_gguf: Path, tmp_path: Path) -> None:
    bad = rewrite(tiny_gguf, tmp_path / "short.gguf", drop="blk.2.indexer.proj.weight")
    with pytest.raises(RuntimeLoadError, match=r"tensor blk\.2\.indexer\.proj\.weight is missing"):
        check_gguf(bad)


def test_cli_reports_bad_files_on_one_line(dsv4, tiny_gguf: Path, tmp_path: Path) -> None:
    """The checks run before llama.cpp is touched, so the real CLI can run in-process here."""
    v41 = rewrite(tiny_gguf, tmp_path / "v41.gguf", arch="deepseek41")
    for target, expected in [
        (str(tmp_path / "missing.gguf"), "error: GGUF file not found"),
        (str(v41), "has no deepseek41 architecture yet"),
    ]:
        result = dsv4("chat", target, "-p", "hi")
        assert result.code == 1
        assert result.stderr.startswith("error: ") and expected in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_split_gguf_is_checked_across_its_shards(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from quant.convert import QuantOptions, quantize_checkpoint

    report = quantize_checkpoint(tiny_checkpoint, tmp_path / "tiny.gguf", QuantOptions(split_max_size=4_000_000))
    shards = sorted(Path(p) for p in report.outputs)
    assert len(shards) > 1 and shards[0].name.endswith(f"-00001-of-{len(shards):05d}.gguf")
    assert check_gguf(shards[0]).block_count == 4
    shards[-1].unlink()
    with pytest.raises(RuntimeLoadError, match=f"split GGUF is missing {shards[-1].name}"):
        check_gguf(shards[0])
    with pytest.raises(RuntimeLoadError, match="not the first shard"):
        check_gguf(shards[1])
