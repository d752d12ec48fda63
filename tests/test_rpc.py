"""llama.cpp RPC workers: the protocol probe, the worker's budget, plans across workers, serving across them and
losing one mid-answer. Workers are real `ggml-rpc-server`s from the engine build, on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dsv4cli.engine.params import LoadParams
from dsv4cli.errors import RuntimeLoadError, UsageError
from dsv4cli.models.ref import resolve_model
from dsv4cli.rpc.protocol import (
    ALLOC_REPLY,
    ALLOC_REQUEST,
    MEMORY_REPLY,
    U64,
    Cmd,
    Endpoint,
    RpcError,
    hello,
    parse_endpoints,
    probe,
    request,
)
from dsv4cli.units import GIB

# ctx and micro-batch small enough that the weights, not the compute buffer, decide what fits on a worker
CTX, UBATCH = 1024, 64
# Threads of each worker, and of the one process the split is compared with. ggml-cpu's flash attention for a single
# query over 512 or more cached positions splits the positions among the threads and adds their partial sums
# (ggml/src/ggml-cpu/ops.cpp, use_split_kv_path), so decoding depends on the thread count of whichever process holds
# a layer: with other counts, greedy output across workers parts from one process's after a few dozen tokens.
WORKER_THREADS = 1


@pytest.fixture(scope="module")
def start_worker(engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable]:
    from dsv4cli.rpc.worker import WorkerOptions, start_worker

    running = []
    home = tmp_path_factory.mktemp("worker-home")

    def start(mem_gib: float | None = None):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DSV4_HOME", str(home))
            worker = start_worker(WorkerOptions(port=0, mem_gib=mem_gib, threads=WORKER_THREADS), engine)
        running.append(worker)
        return worker

    yield start
    for worker in running:
        worker.stop()


def _endpoint(worker) -> Endpoint:
    return parse_endpoints(worker.address)[0]


def _plan(tiny_gguf: Path, *workers, margin: float = 0.0):
    from dsv4cli.plan import PlanInputs, make_plan
    from dsv4cli.plan.source import read_gguf

    rpc = tuple(_endpoint(w) for w in workers)
    inputs = PlanInputs(ctx=CTX, ubatch=UBATCH, margin_gib=margin, rpc=rpc, vram_gib=())
    return make_plan(read_gguf(tiny_gguf), inputs)


def _budget(tiny_gguf: Path) -> float:
    """GiB for a worker's compute buffer (the CPU one plus a micro-batch of logits), KV and 60% of the tiny model's
    weights: over half of it, so two workers hold it all and one alone does not."""
    from dsv4cli.engine.kvcache import compute_buffer_bytes, kv_cache
    from dsv4cli.plan.source import read_gguf

    source = read_gguf(tiny_gguf)
    dims = source.dims
    compute = compute_buffer_bytes(dims, n_ctx=CTX, n_ubatch=UBATCH) + UBATCH * dims.vocab * 4
    weights = sum(s.nbytes for s in source.tensors)
    return (compute + kv_cache(dims, n_ctx=CTX, n_ubatch=UBATCH).total + 0.6 * weights) / GIB


def test_parse_endpoints() -> None:
    assert parse_endpoints("10.0.0.2:50052, host-b:7000") == (Endpoint("10.0.0.2", 50052), Endpoint("host-b", 7000))
    for bad in ("host", "host:0", "host:99999", ":5", "a:1,a:1"):
        with pytest.raises(UsageError, match="--rpc"):
            parse_endpoints(bad)


def test_probe_reports_version_and_budget(start_worker) -> None:
    worker = start_worker(mem_gib=0.5)
    info = probe(_endpoint(worker))
    assert info.version[:2] == (7, 0)
    assert [d.free for d in info.devices] == [int(0.5 * GIB)]
    assert info.rtt_s > 0 and info.bandwidth_gbs > 0


def test_a_budget_above_what_is_free_is_said_and_never_promised(engine, tmp_path: Path, monkeypatch) -> None:
    from dsv4cli.rpc.worker import WorkerOptions, start_worker

    monkeypatch.setenv("DSV4_HOME", str(tmp_path))
    notes: list[str] = []
    worker = start_worker(WorkerOptions(port=0, mem_gib=100_000, threads=1), engine, note=notes.append)
    try:
        assert any("--mem 100000 GiB is more than" in line for line in notes), notes
        free = int(worker.devices[0]["free_bytes"])
        assert 0 < probe(_endpoint(worker)).devices[0].free <= free * 1.1  # what the server has, not the budget
    finally:
        worker.stop()


def test_relay_enforces_the_budget(start_worker) -> None:
    """Beyond the budget an allocation fails as the server's own failure does (a null buffer); free memory shrinks
    by what was allocated and comes back when it is freed."""
    worker = start_worker(mem_gib=0.01)
    where = _endpoint(worker)
    with socket.create_connection((where.host, where.port), timeout=5) as sock:
        hello(sock, where)
        big = ALLOC_REPLY.unpack(request(sock, Cmd.ALLOC_BUFFER, ALLOC_REQUEST.pack(0, 20 << 20)))
        assert big == (0, 0)
        ptr, size = ALLOC_REPLY.unpack(request(sock, Cmd.ALLOC_BUFFER, ALLOC_REQUEST.pack(0, 4 << 20)))
        assert ptr and size >= 4 << 20
        free, total = MEMORY_REPLY.unpack(request(sock, Cmd.GET_DEVICE_MEMORY, b"\0\0\0\0"))
        assert (free, total) == (int(0.01 * GIB) - size, int(0.01 * GIB))
        request(sock, Cmd.FREE_BUFFER, U64.pack(ptr))
        free, _ = MEMORY_REPLY.unpack(request(sock, Cmd.GET_DEVICE_MEMORY, b"\0\0\0\0"))
        assert free == int(0.01 * GIB)


def test_wrong_protocol_version_is_a_clear_error() -> None:
    """A server answering HELLO with another major version (as an older llama.cpp's worker would) is named."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1 + 8 + 24, socket.MSG_WAITALL)
            conn.sendall(U64.pack(28) + bytes([6, 1, 2, 0]) + bytes(24))
            conn.recv(1)

    threading.Thread(target=serve, daemon=True).start()
    with listener, pytest.raises(RpcError, match=rf"127\.0\.0\.1:{port} speaks RPC protocol 6\.1\.2; .* 7\.0\.x"):
        probe(Endpoint("127.0.0.1", port))


def test_unreachable_worker_is_named(dsv4, tiny_gguf: Path) -> None:
    from dsv4cli.server.process import free_port

    port = free_port()
    result = dsv4("plan", str(tiny_gguf), "--rpc", f"127.0.0.1:{port}")
    assert result.code == 1
    assert f"RPC worker 127.0.0.1:{port} is not reachable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_silent_server_times_out_with_a_bounded_wait() -> None:
    """A listener that never answers (a worker busy with another client looks the same) is an error, not a hang."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        where = Endpoint("127.0.0.1", listener.getsockname()[1])
        start = time.monotonic()
        with pytest.raises(RpcError, match=r"did not answer within 0\.5 s"):
            probe(where, timeout=0.5)
        assert time.monotonic() - start < 3


def test_remote_bind_needs_allow_remote() -> None:
    from dsv4cli.rpc.worker import WorkerOptions, check_worker_options

    with pytest.raises(UsageError, match="unauthenticated, unencrypted") as e:
        check_worker_options(WorkerOptions(host="0.0.0.0"))
    assert "--allow-remote" in (e.value.hint or "")
    check_worker_options(WorkerOptions(host="0.0.0.0", allow_remote=True))
    check_worker_options(WorkerOptions(host="127.0.0.1"))


def test_plan_places_layers_on_both_workers(start_worker, tiny_gguf: Path) -> None:
    budget = _budget(tiny_gguf)
    one = start_worker(mem_gib=budget)
    two = start_worker(mem_gib=budget)
    n_layer = _plan(tiny_gguf).source.dims.n_layer
    alone = _plan(tiny_gguf, one)
    assert alone.n_gpu_layers < n_layer + 1  # the budget is too small for the whole model
    plan = _plan(tiny_gguf, one, two)
    assert plan.n_gpu_layers == n_layer + 1
    assert all(plan.gpu_layer_counts) and len(plan.gpu_layer_counts) == 2
    for tier in plan.tiers[:2]:
        assert tier.kind == "rpc" and tier.budget == int(budget * GIB) and 0 < tier.used <= tier.budget
    args = plan.llama_args()
    assert args[:2] == ["--rpc", f"{one.address},{two.address}"]
    assert args[args.index("-ts") + 1] == ",".join(str(n) for n in plan.gpu_layer_counts)
    data = plan.to_dict()
    assert LoadParams.from_dict(data["llama"]).rpc == (one.address, two.address)  # a plan file keeps its workers
    assert [t["endpoint"] for t in data["tiers"][:2]] == [one.address, two.address]
    est = plan.estimates
    dims = plan.source.dims
    # tiny: layers 0-1 (raw window only) on the first worker, 2-3 (CSA, HCA) and the head on the second; each gets
    # the residual stream and its cache kinds' K rotations, and sends back the stream or the logits
    assert plan.gpu_layer_counts == [2, 3] and dims.compress_ratios == (0, 0, 4, 128)
    stream, rotation = dims.hc * dims.hidden * 4, dims.head_dim**2 * 4
    first = stream + stream + rotation
    second = stream + dims.vocab * 4 + 3 * rotation + dims.index_head_dim**2 * 4
    assert est["decode_bytes_per_token"]["network"] == first + second
    assert est["decode_seconds_per_token"]["network"] > 0
    assert "2 RPC worker(s)" in plan.verdict and "network:" in plan.verdict


def test_chat_refuses_an_rpc_placement(tiny_gguf: Path) -> None:
    from dsv4cli.system import llama_lib

    with pytest.raises(RuntimeLoadError, match="RPC workers") as e:
        llama_lib.prepare_load(tiny_gguf, n_gpu_layers=5, rpc=("127.0.0.1:50052",))
    assert "dsv4 serve" in (e.value.hint or "")


def test_chat_rpc_flag_points_at_serve(dsv4) -> None:
    result = dsv4("chat", "tiny", "-p", "hi", "--rpc", "127.0.0.1:50052")
    assert result.code == 1
    assert "--rpc: chat runs llama.cpp in process" in result.stderr
    assert "dsv4 serve MODEL --rpc 127.0.0.1:50052" in result.stderr


def _serve(engine, tiny_gguf: Path, plan, tmp_path: Path, *, local: bool = False):
    """llama-server with the plan's flags; `local`: the same flags without the workers, on as many threads as a
    worker has (one process)."""
    from dataclasses import replace

    from dsv4cli.load.placement import Placement
    from dsv4cli.server.launch import ServeOptions, start_server

    data = plan.to_dict()
    if local:
        local_params = replace(plan.load_params(), rpc=(), tensor_split=(), n_gpu_layers=0, n_threads=WORKER_THREADS)
        data["llama"] = local_params.to_dict()
    path = tmp_path / f"plan-{'local' if local else 'rpc'}.json"
    path.write_text(json.dumps(data))
    opts = ServeOptions(port=0, mtp=False, parallel=1, health_timeout=60)
    return start_server(resolve_model(str(tiny_gguf)), Placement(plan_file=path), opts, engine, note=lambda _: None)


def _complete(server, n: int = 24, stream: bool = False):
    body = json.dumps({"prompt": "The capital of", "n_predict": n, "temperature": 0, "seed": 7, "stream": stream})
    req = urllib.request.Request(f"{server.base_url}/completion", data=body.encode())
    return urllib.request.urlopen(req, timeout=60)


def test_serve_names_an_unreachable_worker_before_starting(engine, tiny_gguf: Path, tmp_path: Path) -> None:
    from dsv4cli.load.placement import Placement
    from dsv4cli.server.launch import ServeOptions, start_server
    from dsv4cli.server.process import free_port

    dead = f"127.0.0.1:{free_port()}"
    data = _plan(tiny_gguf).to_dict()
    data["llama"]["rpc"] = [dead]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    ref = resolve_model(str(tiny_gguf))
    with pytest.raises(RpcError, match=f"RPC worker {dead} is not reachable"):
        start_server(ref, Placement(plan_file=path), ServeOptions(port=0), engine, note=lambda _: None)


def test_served_across_two_workers_matches_one_process(engine, start_worker, tiny_gguf: Path, tmp_path: Path) -> None:
    budget = _budget(tiny_gguf)
    workers = [start_worker(mem_gib=budget), start_worker(mem_gib=budget)]
    plan = _plan(tiny_gguf, *workers)
    outputs = []
    for local in (True, False):
        server = _serve(engine, tiny_gguf, plan, tmp_path, local=local)
        try:
            assert ("--rpc" in server.argv) is not local
            with _complete(server, n=64) as r:
                reply = json.loads(r.read())
            outputs.append((reply["content"], reply["tokens_predicted"]))
        finally:
            server.process.stop()
    assert outputs[0][1] == 64
    assert outputs[1] == outputs[0]


def test_killing_a_worker_mid_answer_ends_the_request(engine, start_worker, tiny_gguf: Path, tmp_path: Path) -> None:
    from dsv4cli.rpc.health import lost_worker_error, rpc_endpoints

    budget = _budget(tiny_gguf)
    victim, survivor = start_worker(mem_gib=budget), start_worker(mem_gib=budget)
    server = _serve(engine, tiny_gguf, _plan(tiny_gguf, victim, survivor), tmp_path)
    try:
        with _complete(server, n=100_000, stream=True) as stream:
            stream.readline()  # the answer has started
            victim.stop()
            start = time.monotonic()
            with pytest.raises(Exception):  # noqa: B017 - the cut stream surfaces as one of several http errors
                while stream.readline():
                    pass
                raise ConnectionError("stream ended")
        server.process.wait()  # llama-server aborts on a lost worker
        assert time.monotonic() - start < 10
        error = lost_worker_error(server.process.log, rpc_endpoints(server.argv) or "")
        assert error is not None
        assert str(error).startswith(f"RPC worker {victim.address} stopped answering")
        assert survivor.address not in str(error)
    finally:
        server.process.stop()


def test_worker_command_prints_its_address_and_stops_on_ctrl_c(engine, python: str, tmp_path: Path) -> None:
    env = {**os.environ, "DSV4_HOME": str(tmp_path), "DSV4_ENGINE_BIN": str(engine.server)}
    cmd = [python, "-m", "dsv4cli", "worker", "--port", "0", "--mem", "0.25", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert info["budget_bytes"] == int(0.25 * GIB)
        assert info["rpc_arg"] == f"--rpc {info['address']}" and info["address"].startswith("127.0.0.1:")
        assert info["devices"][0]["name"] == "CPU"
        assert probe(parse_endpoints(info["address"])[0]).devices[0].free == int(0.25 * GIB)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(info["pid"], 0)  # the rpc-server child is gone too
    finally:
        proc.kill()
        proc.wait()


def test_eval_through_two_workers_matches_one_process(
    engine, start_worker, tiny_gguf: Path, tmp_path: Path, isolated_env: Path, dsv4
) -> None:
    """`dsv4 eval --plan` across two loopback workers against the same model in one process: the reference logits
    come from the one-process run (cached; the cache is keyed by the reference, not its placement) and the split
    computes the same distribution: KLD 0 within the uint16 steps the reference is stored in, the same top token
    everywhere and the same perplexity. The one process keeps the plan's threads, unlike the serve test: scoring
    evaluates many queries at once, where ggml-cpu's flash attention does not split positions among threads."""
    from dataclasses import replace

    budget = _budget(tiny_gguf)
    plan = _plan(tiny_gguf, start_worker(mem_gib=budget), start_worker(mem_gib=budget))
    assert all(plan.gpu_layer_counts) and len(plan.gpu_layer_counts) == 2  # both workers hold layers
    data = plan.to_dict()
    split, local = tmp_path / "plan-rpc.json", tmp_path / "plan-local.json"
    split.write_text(json.dumps(data))
    data["llama"] = replace(plan.load_params(), rpc=(), tensor_split=(), n_gpu_layers=0).to_dict()
    local.write_text(json.dumps(data))
    args = (str(tiny_gguf), "--ref", str(tiny_gguf), "--ctx", "128", "--chunks", "4", "--json")

    one = dsv4("eval", *args, "--plan", str(local))
    assert one.code == 0, one.stderr
    r = dsv4("eval", *args, "--plan", str(split))
    assert r.code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["cache_reused"]  # the model ran across the workers against the one-process logits
    logs = sorted((isolated_env / "logs").glob("eval-*.log"), key=lambda p: p.stat().st_mtime)
    workers = ",".join(plan.load_params().rpc)
    assert "--rpc" not in logs[0].read_text() and f"--rpc {workers} " in logs[-1].read_text().splitlines()[0]
    assert result["kld_max"] < 1e-5 and result["rms_dp"] == 0.0 and result["top1"] > 0.99
    assert result["ppl"] == json.loads(one.stdout)["ppl"]
