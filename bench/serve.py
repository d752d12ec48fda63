"""Benchmark `dsv4 serve` (llama-server through the OpenAI API) against in-process `dsv4 chat` on the same GGUF.

1. Decode tok/s of a streamed API answer vs the in-process chat runtime, same model, plan and context, alternating
   runs in one process (goal >= 0.95x). The API figure is measured twice: by the client, (tokens - 1) / (last
   chunk - first chunk), so HTTP and JSON costs are included, and by the server (its `timings.predicted_per_second`);
   where the client figure is the lower one, the client (or the streaming) is the bottleneck, not the engine.
   The machine's load average is printed with the figures: on a shared machine they move with it.
2. Time to first token of turn N of a growing conversation vs turn 1 (~1,500 prompt tokens): llama-server's prompt
   cache should prefill only the new tokens (goal: turn N well under turn 1).
3. With `--mtp`: the same decode through a GGUF quantized with the MTP block, drafting on vs off, and the draft
   acceptance rate the server reports. On the tiny model's random weights acceptance means nothing about real
   models; the figure only shows the path works and what drafting costs.

Usage: .venv/bin/python bench/serve.py [--gguf PATH | --tiny] [--tokens 500] [--repeats 3] [--turns 6] [--mtp]
(default GGUF: a generated model at V4-Flash's real widths, `bench_models.REAL_CONFIG`, converted once into
`--models`; `--tiny`: the built-in tiny model).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench_models import REAL_CONFIG, make_gguf

PROMPT = "Go on"  # the tiny model's greedy answer to this runs past 3,000 tokens without an end token


def api_decode(client, alias: str, tokens: int) -> dict:
    """One streamed greedy answer; client-side decode tok/s and the server's own timings."""
    stream = client.chat.completions.create(
        model=alias,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"timings_per_token": False},  # no ignore_eos: greedy, both paths decode the same tokens
    )
    first = last = 0.0
    usage = timings = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        usage = chunk.usage or usage
        timings = getattr(chunk, "timings", None) or (chunk.model_extra or {}).get("timings") or timings
    n = usage.completion_tokens
    return {"tokens": n, "tps": (n - 1) / (last - first), "timings": timings or {}}


def chat_decode(engine, renderer, tokens: int) -> tuple[float, int]:
    from dsv4cli.chat.session import ChatSession
    from dsv4cli.engine import SampleOptions

    engine.reset()
    session = ChatSession(engine, renderer, options=SampleOptions(max_tokens=tokens, temp=0))
    list(session.send(PROMPT))
    return session.last.stats.decode_tps, session.last.stats.generated_tokens


def ttft(client, alias: str, messages: list[dict], max_tokens: int = 8) -> tuple[float, str, int, int]:
    """Seconds to the first answer chunk, the answer, prompt tokens and cached prompt tokens."""
    start = time.perf_counter()
    first = 0.0
    text, usage = [], None
    stream = client.chat.completions.create(
        model=alias,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return first - start, "".join(text), usage.prompt_tokens, cached or 0


def growing_conversation(client, alias: str, turns: int, first_tokens: int = 1500) -> list[dict]:
    words = "the sea was calm and the ships sailed home "
    messages = [{"role": "user", "content": words * (first_tokens // 10)}]
    rows = []
    for turn in range(1, turns + 1):
        seconds, answer, prompt, cached = ttft(client, alias, messages)
        rows.append({"turn": turn, "ttft_s": seconds, "prompt_tokens": prompt, "cached_tokens": cached})
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"And then? ({turn})"}]
    return rows


def serve(gguf: Path, placement, *, mtp: bool = True):
    from dsv4cli.models.ref import resolve_model
    from dsv4cli.server.launch import ServeOptions, start_server
    from dsv4cli.toolchain.build import build_engine

    engine = build_engine("cpu").engine
    opts = ServeOptions(port=0, alias="bench", mtp=mtp)
    return start_server(resolve_model(str(gguf)), placement, opts, engine, note=lambda m: print(m, file=sys.stderr))


def bench_decode(gguf: Path, args: argparse.Namespace) -> None:
    import openai

    from dsv4cli.load.engines import open_engine
    from dsv4cli.load.placement import Placement
    from dsv4cli.load.prepared import prepare_model

    server = serve(gguf, Placement(ctx=args.ctx))
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="bench", max_retries=0, timeout=600)
        prepared = prepare_model(gguf, Placement(ctx=args.ctx), note=lambda m: None)
        engine = open_engine("inprocess", prepared, note=lambda m: None)
        api_decode(client, "bench", 16)  # warm-up both paths
        chat_decode(engine, prepared.renderer, 16)
        api, chat = [], []
        load = os.getloadavg()[0]
        for _ in range(args.repeats):
            api.append(api_decode(client, "bench", args.tokens))
            chat.append(chat_decode(engine, prepared.renderer, args.tokens))
        engine.close()
        client_tps = statistics.median(r["tps"] for r in api)
        server_tps = statistics.median(r["timings"].get("predicted_per_second", 0.0) for r in api)
        chat_tps = statistics.median(tps for tps, _ in chat)
        print(f"model {gguf.name}, {args.tokens} tokens per run, median of {args.repeats}, alternating")
        print(
            f"decode: dsv4 serve (OpenAI API, streamed) {client_tps:.1f} tok/s at the client, {server_tps:.1f} tok/s "
            f"by the server's timings; in-process dsv4 chat {chat_tps:.1f} tok/s "
            f"(tokens: API {sorted(r['tokens'] for r in api)}, in-process {sorted(n for _, n in chat)})"
        )
        print(
            f"  API / in-process: {client_tps / chat_tps:.3f}x client-side, {server_tps / chat_tps:.3f}x server-side "
            f"(goal >= 0.95x); load average {load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        rows = growing_conversation(client, "bench", args.turns)
    finally:
        server.stop()
    for row in rows:
        print(
            f"  turn {row['turn']}: TTFT {row['ttft_s'] * 1000:.0f} ms, prompt {row['prompt_tokens']} tokens, "
            f"{row['cached_tokens']} from the cache"
        )
    print(
        f"TTFT turn {rows[-1]['turn']} / turn 1: {rows[-1]['ttft_s'] / rows[0]['ttft_s']:.3f}x "
        f"({rows[-1]['prompt_tokens']} vs {rows[0]['prompt_tokens']} prompt tokens)"
    )


def bench_mtp(args: argparse.Namespace) -> None:
    """Drafting on vs off on `tiny` quantized with `--mtp`, placed with the plain tiny model's plan."""
    import openai

    from dsv4cli.home import models_dir
    from dsv4cli.load.placement import Placement
    from dsv4cli.load.resolve import resolve_gguf
    from dsv4cli.models.ref import resolve_model
    from dsv4cli.plan import PlanInputs, make_plan, save_plan
    from quant.convert import QuantOptions, quantize_checkpoint

    tiny = resolve_gguf(resolve_model("tiny"), note=lambda m: None)
    mtp_gguf = tiny.with_name("tiny-mtp-bench.gguf")
    if not mtp_gguf.exists():
        quantize_checkpoint(models_dir() / "tiny", mtp_gguf, QuantOptions(mtp=True))
    plan = tiny.with_name("tiny-mtp-bench.plan.json")
    save_plan(make_plan(str(tiny), PlanInputs(ctx=args.ctx)), plan)
    results = {}
    for drafting in (False, True):
        server = serve(mtp_gguf, Placement(plan_file=plan), mtp=drafting)
        try:
            if drafting and not server.info()["mtp"]:
                print(f"MTP: llama-server could not start with drafting on this model; see {server.process.log}")
                return
            client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="bench", max_retries=0, timeout=600)
            api_decode(client, "bench", 16)
            results[drafting] = [api_decode(client, "bench", args.tokens) for _ in range(args.repeats)]
        finally:
            server.stop()
    off = statistics.median(r["tps"] for r in results[False])
    on = statistics.median(r["tps"] for r in results[True])
    drafted = sum(r["timings"].get("draft_n", 0) for r in results[True])
    accepted = sum(r["timings"].get("draft_n_accepted", 0) for r in results[True])
    rate = f"{accepted / drafted:.1%} of {drafted} drafted tokens accepted" if drafted else "no draft timings reported"
    print(f"MTP (tiny, random weights): drafting on {on:.1f} tok/s vs off {off:.1f} tok/s -> {on / off:.3f}x; {rate}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="GGUF to serve (default: the real-width generated model)")
    parser.add_argument("--tiny", action="store_true", help="serve the built-in tiny model instead")
    parser.add_argument("--models", type=Path, help="where the generated model is kept (default: DSV4_HOME/bench)")
    parser.add_argument("--tokens", type=int, default=500, help="tokens generated per decode run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--mtp", action="store_true", help="also measure MTP drafting on a tiny GGUF with the block")
    args = parser.parse_args()
    from dsv4cli.home import dsv4_home
    from dsv4cli.load.resolve import resolve_gguf

    if args.gguf:
        gguf = args.gguf
    elif args.tiny:
        gguf = resolve_gguf(None, note=lambda m: print(m, file=sys.stderr))
    else:
        gguf = make_gguf(args.models or dsv4_home() / "bench", "bench-real", REAL_CONFIG)
    bench_decode(gguf, args)
    if args.mtp:
        bench_mtp(args)


if __name__ == "__main__":
    main()
