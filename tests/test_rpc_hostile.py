"""Hostile RPC peers: workers that stall, drip bytes, announce absurd device counts or speak another version
(against `plan --rpc` and `serve --rpc`'s probe), and clients that try to get past `dsv4 worker --mem`'s budget or
crash its ggml-rpc-server (against the real relay and server from the engine build)."""

from __future__ import annotations

import time

import pytest

from dsv4cli.rpc.protocol import RpcError, parse_endpoints, probe
from tests.fake_worker import Script, fake_worker

DEADLINE = "1"


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSV4_RPC_TIMEOUT", DEADLINE)


@pytest.mark.parametrize(
    "script",
    [Script(drip_s=0.1), Script(memory_delay_s=5), Script(silent=True), Script(devices=3, drip_s=0.02)],
    ids=["drip", "slow-memory", "silent", "slow-devices"],
)
def test_a_stalling_worker_is_refused_at_the_deadline(short_deadline, script: Script) -> None:
    with fake_worker(script) as address:
        start = time.monotonic()
        with pytest.raises(RpcError, match=rf"RPC worker {address} did not answer within 1 s") as e:
            probe(parse_endpoints(address)[0])
        assert time.monotonic() - start < 2.5
        assert "DSV4_RPC_TIMEOUT" in (e.value.hint or "")


def test_a_worker_announcing_four_billion_devices_is_refused_at_once(short_deadline) -> None:
    with fake_worker(Script(devices=2**32 - 1)) as address:
        start = time.monotonic()
        with pytest.raises(RpcError, match=r"announces 4294967295 devices \(at most 64 accepted\)"):
            probe(parse_endpoints(address)[0])
        assert time.monotonic() - start < 1


def test_a_version_mismatch_keeps_its_message_and_hint() -> None:
    with fake_worker(Script(version=(8, 1, 0))) as address, pytest.raises(RpcError) as e:
        probe(parse_endpoints(address)[0])
    assert str(e.value) == f"RPC worker {address} speaks RPC protocol 8.1.0; this llama.cpp speaks 7.0.x"
    assert "same dsv4/llama-cpp-python version" in (e.value.hint or "")


@pytest.mark.parametrize("script", [Script(drip_s=0.1), Script(devices=2**32 - 1)], ids=["drip", "devices"])
def test_plan_rpc_against_a_hostile_worker_is_one_line_within_the_deadline(
    dsv4, tiny_gguf, short_deadline, script: Script
) -> None:
    with fake_worker(script) as address:
        start = time.monotonic()
        result = dsv4("plan", str(tiny_gguf), "--rpc", address)
        assert time.monotonic() - start < 5
    assert result.code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"RPC worker {address}" in result.stderr


def test_serve_rpc_check_refuses_a_dripping_worker_within_the_deadline(short_deadline) -> None:
    from dsv4cli.rpc.health import check_workers

    with fake_worker(Script(drip_s=0.1)) as address:
        start = time.monotonic()
        with pytest.raises(RpcError, match="did not answer within 1 s"):
            check_workers(address)
        assert time.monotonic() - start < 2.5


def test_a_bad_timeout_setting_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv4cli.errors import UsageError
    from dsv4cli.rpc.protocol import rpc_timeout

    for bad in ("0", "-1", "nan", "soon", "inf"):
        monkeypatch.setenv("DSV4_RPC_TIMEOUT", bad)
        with pytest.raises(UsageError, match="DSV4_RPC_TIMEOUT"):
            rpc_timeout()
