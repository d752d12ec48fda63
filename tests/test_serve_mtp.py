"""MTP speculative decoding: a GGUF quantized with the nextn block is served with `--spec-type draft-mtp`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dsv4cli.models.ref import resolve_model

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def sibling_plan(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plan of the same model without the MTP block: it places the MTP file alike (the block is skipped,
    tests/test_plan.py), and `--plan FILE` naming another GGUF checks that serve re-points its `-m`."""
    from dsv4cli.plan import PlanInputs, make_plan, save_plan

    path = tmp_path_factory.mktemp("mtp-plan") / "plan.json"
    save_plan(make_plan(str(tiny_gguf), PlanInputs(ctx=2048)), path)
    return path


@pytest.fixture(scope="module")
def mtp_server(engine, mtp_gguf: Path, sibling_plan: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from dsv4cli.load.placement import Placement
    from dsv4cli.server.launch import ServeOptions, start_server

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSV4_HOME", str(tmp_path_factory.mktemp("serve-mtp-home")))
        opts = ServeOptions(port=0, alias="tiny-mtp", health_timeout=120)
        running = start_server(
            resolve_model(str(mtp_gguf)), Placement(plan_file=sibling_plan), opts, engine, note=lambda _: None
        )
        try:
            yield running
        finally:
            running.stop()


def test_nextn_block_is_detected(mtp_gguf: Path, tiny_gguf: Path, sibling_plan: Path) -> None:
    from dsv4cli.load.placement import Placement
    from dsv4cli.load.prepared import prepare_model

    planned = prepare_model(resolve_model(str(mtp_gguf)), Placement(plan_file=sibling_plan), note=lambda _: None)
    assert planned.has_mtp and planned.llama_args[:2] == ["-m", str(mtp_gguf)]
    assert not prepare_model(resolve_model(str(tiny_gguf)), Placement(ctx=1024), note=lambda _: None).has_mtp


def test_no_mtp_flag_turns_drafting_off(mtp_gguf: Path, sibling_plan: Path) -> None:
    from dsv4cli.load.placement import Placement
    from dsv4cli.load.prepared import prepare_model
    from dsv4cli.server.launch import ServeOptions, server_argv
    from dsv4cli.toolchain.build import ServerBinary

    planned = prepare_model(resolve_model(str(mtp_gguf)), Placement(plan_file=sibling_plan), note=lambda _: None)
    engine = ServerBinary(server=Path("llama-server"), version="test", gpu="cpu")
    on = server_argv(engine, planned, ServeOptions(), alias="m", port=1)
    off = server_argv(engine, planned, ServeOptions(mtp=False), alias="m", port=1)
    assert on[on.index("--spec-type") + 1] == "draft-mtp"
    assert "--spec-type" not in off


def test_mtp_server_answers_even_where_drafting_cannot_start(mtp_server) -> None:
    # On `tiny`, llama.cpp (0.3.36's vendored tree) dies with SIGFPE creating the MTP draft context:
    # llama_kv_cache forces the indexer's Hadamard rotation when head_dim == index_head_dim (64 in tiny; 512 vs
    # 128 in the real models) and the draft context's cache has no head size to divide by
    # (src/llama-kv-cache.cpp build_input_k_rot). serve then starts the server again without drafting.
    client = openai.OpenAI(base_url=f"{mtp_server.base_url}/v1", api_key="none", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model="tiny-mtp",
        messages=[{"role": "user", "content": "Go on"}],
        max_tokens=32,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage.completion_tokens == 32
    drafting = reply.model_extra["timings"].get("draft_n", 0) > 0
    assert drafting == mtp_server.info()["mtp"]
    assert not drafting  # flips when the upstream bug is fixed: then check the acceptance rate here
