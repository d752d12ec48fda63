"""MODEL resolved once (`dsv4cli.models.ref`), load parameters as a plan file and as llama.cpp flags, recipes
checked at parse time, and the recipe recorded in a GGUF read back by plan and chat."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import gguf
import pytest

from dsv4cli.engine import LoadParams
from dsv4cli.errors import UnknownModelError, UsageError
from dsv4cli.models.ref import resolve_model
from tests.test_chat_gguf_check import rewrite


def test_each_form_of_model(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"")
    (tmp_path / "ckpt").mkdir()
    cases = {
        str(tmp_path / "m.gguf"): ("gguf", None, None),
        str(tmp_path / "ckpt"): ("checkpoint", None, None),
        str(tmp_path / "absent.gguf"): ("gguf", None, None),
        "./absent": ("gguf", None, None),
        "tiny": ("registry", None, None),
        "deepseek-ai/DeepSeek-V4-Pro": ("registry", None, None),
        "someone/model": ("hub", None, None),
        "someone/model:Q4_K_M": ("hub", "Q4_K_M", None),
        "tiny:q8": ("registry", "q8", None),
        "someone/model/sub/model-q4.gguf": ("hub", None, "sub/model-q4.gguf"),
    }
    for text, (kind, tag, file) in cases.items():
        ref = resolve_model(text)
        assert (ref.kind, ref.tag, ref.file) == (kind, tag, file), text
    assert resolve_model("deepseek-ai/DeepSeek-V4-Pro").spec.name == "deepseek-v4-pro"
    assert resolve_model("someone/model:Q4_K_M").spec.repo == "someone/model"
    with pytest.raises(UnknownModelError, match="unknown model 'tiyn'"):
        resolve_model("tiyn")


def test_load_params_round_trip_and_cli_args() -> None:
    params = LoadParams(
        n_ctx=8192, n_gpu_layers=20, host_tensors=(r"^blk\.(0|1)\.ffn_(gate|up|down)_exps\.",), tensor_split=(0.5, 0.5),
        use_mmap=False, flash_attn=True, kv_type="q8_0", n_threads=1, use_extra_bufts=True,
    )  # fmt: skip
    assert LoadParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params
    args = params.cli_args("m.gguf")
    flags = dict(zip(args[::2], args[1::2], strict=False))
    assert flags["-m"] == "m.gguf" and flags["-ngl"] == "20" and flags["-c"] == "8192" and flags["-t"] == "1"
    assert flags["-ctk"] == flags["-ctv"] == "q8_0" and flags["-fa"] == "on" and flags["-ts"] == "0.5,0.5"
    assert flags["-ot"] == r"^blk\.(0|1)\.ffn_(gate|up|down)_exps\.=CPU" and args[-2:] == ["--load-mode", "none"]
    assert "--no-mmap" not in args  # the pinned llama.cpp rejects it (common/arg.cpp: --load-mode)
    no_repack = dataclasses.replace(params, use_extra_bufts=False)
    assert LoadParams.from_dict(no_repack.to_dict()) == no_repack and no_repack.cli_args("m.gguf")[-1] == "--no-repack"
    assert LoadParams.from_dict({}).use_extra_bufts is None  # decided at load (llama_lib.use_extra_bufts)
    with pytest.raises(UsageError, match="use_extra_bufts"):
        LoadParams.from_dict({"use_extra_bufts": "no"})
    with pytest.raises(UsageError, match=r"type_k and llama\.type_v must be equal"):
        LoadParams.from_dict({"type_k": "f16", "type_v": "q8_0"})
    with pytest.raises(UsageError, match=r"llama\.type_k is q4; expected one of f16, q8_0"):
        LoadParams.from_dict({"type_k": "q4", "type_v": "q4"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("quantize", "tiny", "--experts", "fp2"), "--experts 'fp2': choose one of mxfp4, q4_0, q4_k"),
        (("quantize", "tiny", "--dense", "fp8"), "--dense 'fp8': choose one of q8_0, q4_k, bf16"),
        (("plan", "tiny", "--kv-type", "q4"), "--kv-type 'q4': choose one of f16, q8_0"),
        (("chat", "tiny", "--vram", "24,x"), "--vram '24,x'"),
    ],
)
def test_bad_vocabulary_fails_while_parsing(dsv4, argv: tuple[str, ...], message: str) -> None:
    """The error names the flag and the choices, before any work (a tiny model is never pulled here)."""
    from dsv4cli.home import models_dir

    res = dsv4(*argv)
    assert res.code == 1 and res.stderr.startswith(f"error: {message}") and len(res.stderr.splitlines()) == 1
    assert not models_dir().exists()


def test_help_is_h_everywhere(dsv4) -> None:
    for command in ("pull", "quantize", "plan", "chat", "models"):
        res = dsv4(command, "-h")
        assert res.code == 0 and "--help" in res.stdout, command


def test_plan_and_chat_read_the_recipe_from_the_header(dsv4, tiny_gguf: Path, tmp_path: Path) -> None:
    """A GGUF whose name claims the default recipe but whose header says q4_0 is not taken for the default."""
    from dsv4cli.home import gguf_dir
    from dsv4cli.load.resolve import resolve_gguf

    folder = gguf_dir()
    folder.mkdir(parents=True)
    decoy = rewrite(tiny_gguf, folder / "tiny-mxfp4-q8_0.gguf", set_={"dsv4.experts": "q4_0", "general.file_type": 2})
    real = shutil.copy(tiny_gguf, folder / "tiny-zz.gguf")
    assert resolve_gguf(resolve_model("tiny"), note=print) == Path(real)

    res = dsv4("plan", str(decoy), "--vram", "1", "--ram", "4", "--json")
    source = json.loads(res.stdout)["source"]
    assert source["recipe"] == {"experts": "q4_0", "dense": "q8_0"}
    assert source["checkpoint"] == gguf.GGUFReader(tiny_gguf).get_field("dsv4.source").contents()
    res = dsv4("plan", "tiny", "--vram", "1", "--ram", "4", "--json")
    assert json.loads(res.stdout)["source"]["files"] == [str(real)]
