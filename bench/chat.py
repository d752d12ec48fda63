"""Benchmark `dsv4 chat` against bare llama-cpp-python on the same GGUF and settings.

1. Decode tok/s of `dsv4 chat MODEL -p ... --json` vs a bare `Llama.generate` loop (goal >= 0.98x).
2. Time to first token of a short second turn after a ~1,500-token first turn, vs the first turn (goal <= 0.2x),
   with the same second turn from an empty cache as a reference.

Usage: .venv/bin/python bench/chat.py [--gguf PATH] [--tokens 1000] [--repeats 5]
(default GGUF: the built-in tiny model, prepared on first use like `dsv4 chat`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BARE_LOOP = """
import json, sys, time
from llama_cpp import Llama
from dsv4cli.system.llama_lib import apply_to_llama_class
apply_to_llama_class()  # the repacking choice dsv4 makes (off on AMX CPUs)
path, prompt, n, n_ctx, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = Llama(path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
            use_mmap=False, flash_attn=False, swa_full=False, verbose=False)
tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
count, first = 0, 0.0
for token in llm.generate(tokens, temp=0.0):
    if token == llm.token_eos():
        break
    count += 1
    if count == 1:
        first = time.perf_counter()
    if count >= n:
        break
print(json.dumps({"generated": count, "decode_tps": (count - 1) / (time.perf_counter() - first)}))
"""

BOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
PROMPT = "Go on"  # the tiny model's greedy answer to this runs past 3,000 tokens without an end token


def run_json(argv: list[str]) -> dict:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(argv)}\n{result.stderr}")
    return json.loads(result.stdout)


def decode_speed(gguf: Path, *, tokens: int, repeats: int, n_ctx: int, threads: int) -> dict:
    """Median decode tok/s of both paths over `repeats` alternating runs (alternating evens out machine load)."""
    cli = [sys.executable, "-m", "dsv4cli", "chat", str(gguf), "-p", PROMPT, "--json", "--temp", "0"]
    cli += ["--max-tokens", str(tokens), "--ctx", str(n_ctx)]
    prompt = f"{BOS}{USER}{PROMPT}{ASSISTANT}</think>"
    reference = [sys.executable, "-c", BARE_LOOP, str(gguf), prompt, str(tokens), str(n_ctx), str(threads)]
    chat, bare = [], []
    for _ in range(repeats):
        data = run_json(cli)
        chat.append(data["stats"]["decode_tps"])
        bare.append(run_json(reference)["decode_tps"])
    return {
        "generated": data["stats"]["generated_tokens"],
        "chat_tps": statistics.median(chat),
        "bare_tps": statistics.median(bare),
        "ratio": statistics.median(chat) / statistics.median(bare),
    }


def second_turn_latency(gguf: Path, *, n_ctx: int, first_tokens: int = 1500) -> dict:
    """TTFT of turn 1 (~1,500 prompt tokens), of a short turn 2 on the same session, and of turn 2 from scratch."""
    from dsv4cli.chat.session import ChatSession
    from dsv4cli.engine import LoadParams, SampleOptions
    from dsv4cli.engine.inprocess import LlamaEngine
    from dsv4cli.load.prepared import prompt_renderer

    renderer = prompt_renderer(gguf)
    params = LoadParams(n_ctx=n_ctx, use_mmap=False)
    options = SampleOptions(max_tokens=16, temp=0)

    def warmed_engine() -> LlamaEngine:
        engine = LlamaEngine(gguf, params)
        list(ChatSession(engine, renderer, options=options).send("warm up"))  # first-call allocations
        engine.reset()
        return engine

    engine = warmed_engine()
    words = "the sea was calm and the ships sailed home "
    long_text = words * (first_tokens // max(1, len(engine.tokenize(words))) + 1)
    session = ChatSession(engine, renderer, options=options)
    list(session.send(long_text))
    first = session.last.stats
    list(session.send("Thanks, and then?"))
    second = session.last.stats
    scratch = ChatSession(warmed_engine(), renderer, options=options, history=list(session.history[:2]))
    list(scratch.send("Thanks, and then?"))
    return {
        "turn1_prompt_tokens": first.prompt_tokens,
        "turn1_ttft_s": first.ttft_s,
        "turn2_prompt_tokens": second.prompt_tokens,
        "turn2_prefilled_tokens": second.prefill_tokens,
        "turn2_ttft_s": second.ttft_s,
        "turn2_from_scratch_ttft_s": scratch.last.stats.ttft_s,
        "ratio": second.ttft_s / first.ttft_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="GGUF to run (default: the built-in tiny model)")
    parser.add_argument("--tokens", type=int, default=1000, help="tokens generated per decode run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ctx", type=int, default=4096)
    args = parser.parse_args()
    from dsv4cli.load.resolve import resolve_gguf
    from dsv4cli.system.hardware import cpu_threads

    gguf = args.gguf or resolve_gguf(None, note=lambda m: print(m, file=sys.stderr))
    decode = decode_speed(gguf, tokens=args.tokens, repeats=args.repeats, n_ctx=args.ctx, threads=cpu_threads())
    print(
        f"decode: dsv4 chat -p {decode['chat_tps']:.1f} tok/s vs bare llama-cpp-python {decode['bare_tps']:.1f} tok/s "
        f"({decode['generated']} tokens, median of {args.repeats}) -> {decode['ratio']:.3f}x (goal >= 0.98x)"
    )
    ttft = second_turn_latency(gguf, n_ctx=args.ctx)
    print(
        f"time to first token: turn 1 ({ttft['turn1_prompt_tokens']} prompt tokens) "
        f"{ttft['turn1_ttft_s'] * 1000:.1f} ms, "
        f"turn 2 ({ttft['turn2_prompt_tokens']} tokens, {ttft['turn2_prefilled_tokens']} prefilled) "
        f"{ttft['turn2_ttft_s'] * 1000:.1f} ms -> {ttft['ratio']:.3f}x (goal <= 0.2x); "
        f"turn 2 from an empty cache {ttft['turn2_from_scratch_ttft_s'] * 1000:.1f} ms"
    )
    print(json.dumps({"gguf": str(gguf), "decode": decode, "ttft": ttft}))


if __name__ == "__main__":
    main()
