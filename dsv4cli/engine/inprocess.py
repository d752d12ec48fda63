"""The in-process engine: llama.cpp through llama-cpp-python, loading a deepseek4 GGUF with `LoadParams`.

This and `dsv4cli.system.llama_lib` (what the build can do, process-wide settings) are the only modules that import
`llama_cpp`. This one uses the low-level C API rather than the `Llama` class, because that class cannot pass
what a DeepSeek V4 chat needs (docs/formats.md §Running in llama.cpp): tensor buffer overrides that keep experts
in host RAM (`tensor_buft_overrides`, declared `void *` in the bindings, filled here through ctypes) and context
fields such as `n_rs_seq`. Prefix reuse works by extending the KV cache: when the new prompt starts with the text
already in the cache, only the new suffix is tokenized and prefilled, so turn N costs its own tokens, not the
history. Extending needs no partial removal, which the deepseek4 cache cannot do (docs/formats.md §KV cache).
"""

from __future__ import annotations

import codecs
import ctypes
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv4cli.engine.base import SampleOptions, TurnStats, TurnStream
from dsv4cli.engine.kvcache import KV_TYPES
from dsv4cli.engine.params import LoadParams
from dsv4cli.engine.stack import check_runs, on_big_stack
from dsv4cli.errors import RuntimeLoadError, UsageError
from dsv4cli.system import llama_lib


class _LogSink:
    """Receives llama.cpp's log: echoes it to stderr when verbose, keeps the tail for error messages."""

    def __init__(self, llama_cpp: Any, *, verbose: bool) -> None:
        self.verbose = verbose
        self.tail: deque[str] = deque(maxlen=50)

        def callback(level: int, text: bytes, user_data: Any) -> None:
            line = text.decode("utf-8", errors="replace")
            self.tail.append(line)
            if self.verbose:
                sys.stderr.write(line)

        self._callback = llama_cpp.llama_log_callback(callback)  # keep a reference: C holds only the pointer
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def last_error(self) -> str:
        text = "".join(self.tail)
        errors = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
        return errors[-1] if errors else ""


class _BuftOverride(ctypes.Structure):
    """C `struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }`."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def build_overrides(patterns: tuple[str, ...]) -> ctypes.Array[_BuftOverride]:
    """NULL-terminated override array mapping each regex to the CPU buffer type (first match wins in llama.cpp)."""
    buft = llama_lib.cpu_buffer_type()
    array = (_BuftOverride * (len(patterns) + 1))()
    for slot, pattern in zip(array, patterns, strict=False):
        slot.pattern = pattern.encode()
        slot.buft = buft
    return array


@dataclass
class _Fork:
    """Cache state saved at a point where the next turn's prompt will diverge (e.g. dropped reasoning)."""

    text: str
    tokens: list[int]
    state: ctypes.Array[ctypes.c_uint8]


class LlamaEngine:
    """One loaded model and context; `stream()` generates from a rendered prompt, reusing the cached prefix."""

    def __init__(self, path: Path, params: LoadParams, *, verbose: bool = False) -> None:
        llama_lib.prepare_load(path, n_gpu_layers=params.n_gpu_layers, rpc=params.rpc)
        import llama_cpp

        self._lib = llama_cpp
        self._log = _LogSink(llama_cpp, verbose=verbose)
        llama_cpp.llama_backend_init()
        self.params = params
        self.verbose = verbose
        self._model = self._load_model(path, params)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._ctx = self._new_context(path, params)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._cached: list[int] = []  # tokens whose K/V are in the cache, in order
        self._cached_text = ""  # their text (special tokens rendered), to extend the cache by text
        self._last_decode = 0  # size of the last llama_decode call: how far llama.cpp can roll back
        self._fork: _Fork | None = None
        self._pieces: dict[int, bytes] = {}

    def _load_model(self, path: Path, s: LoadParams) -> Any:
        lib = self._lib
        params = lib.llama_model_default_params()
        params.n_gpu_layers = s.n_gpu_layers
        params.use_extra_bufts = s.repack()
        params.load_mode = {
            (True, True): lib.LLAMA_LOAD_MODE_MMAP_MLOCK,
            (True, False): lib.LLAMA_LOAD_MODE_MMAP,
            (False, True): lib.LLAMA_LOAD_MODE_MLOCK,
            (False, False): lib.LLAMA_LOAD_MODE_NONE,
        }[(s.use_mmap, s.use_mlock)]
        if s.host_tensors:
            if len(s.host_tensors) > lib.llama_max_tensor_buft_overrides():
                raise UsageError(f"too many tensor overrides ({len(s.host_tensors)})")
            self._overrides = build_overrides(s.host_tensors)  # must outlive the load
            params.tensor_buft_overrides = ctypes.addressof(self._overrides)
        if s.tensor_split:
            self._split = (ctypes.c_float * lib.llama_max_devices())(*s.tensor_split)  # must outlive the load
            params.tensor_split = self._split
        model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise RuntimeLoadError(f"llama.cpp could not load {path}: {self._log.last_error() or 'unknown error'}")
        return model

    def _new_context(self, path: Path, s: LoadParams) -> Any:
        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = s.n_ctx
        params.n_batch = s.n_batch
        params.n_ubatch = min(s.n_ubatch, s.n_batch)
        params.n_threads = params.n_threads_batch = s.n_threads
        params.flash_attn_type = (
            lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.type_k = params.type_v = KV_TYPES[s.kv_type].ggml_type
        params.swa_full = False
        params.n_rs_seq = s.n_rs_seq
        ctx = lib.llama_init_from_model(self._model, params)
        if not ctx:
            lib.llama_model_free(self._model)
            raise RuntimeLoadError(
                f"llama.cpp could not create a context for {path}: {self._log.last_error() or 'unknown error'}",
                hint="lower --ctx or free memory",
            )
        return ctx

    def close(self) -> None:
        if self._ctx:
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens whose K/V are in the cache, oldest first."""
        return list(self._cached)

    # -- tokens -------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Tokens of `text` with special tokens parsed and no BOS added (the chat template writes it), on a thread
        with the stack llama.cpp's tokenizer needs (`dsv4cli.engine.stack`)."""
        check_runs(text)
        data = text.encode()
        buf = (self._lib.llama_token * (len(data) + 8))()
        n = on_big_stack(lambda: self._lib.llama_tokenize(self._vocab, data, len(data), buf, len(buf), False, True))
        if n < 0:
            raise RuntimeLoadError(f"tokenizer failed on a {len(data)}-byte prompt")
        return buf[:n]

    def _piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens rendered), cached: the vocabulary never changes."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._token_bytes(token)
        return piece

    def _token_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(128)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def reset(self) -> None:
        """Forget the cached prefix (e.g. after `/reset`)."""
        self._lib.llama_memory_clear(self._mem, True)
        self._cached, self._cached_text, self._last_decode, self._fork = [], "", 0, None

    # -- generation ---------------------------------------------------------------------------------

    def _decode(self, tokens: list[int]) -> None:
        lib = self._lib
        for start in range(0, len(tokens), self.params.n_batch):
            chunk = tokens[start : start + self.params.n_batch]
            array = (lib.llama_token * len(chunk))(*chunk)
            rc = lib.llama_decode(self._ctx, lib.llama_batch_get_one(array, len(chunk)))
            if rc != 0:
                self.reset()
                raise RuntimeLoadError(
                    f"llama_decode failed (code {rc}) after {len(self._cached)} tokens",
                    hint="the context is full: /reset, or raise --ctx",
                )
            self._cached.extend(chunk)
            self._last_decode = len(chunk)

    def _prompt_tokens(self, prompt: str) -> list[int]:
        """Tokens of `prompt`, re-using the cached tokens (or the saved fork) when the prompt extends their text.

        Extending by text keeps the cache valid even where tokenizing the whole history would split the
        model's own output differently.
        """
        if not self._extends_cache(prompt) and self._fork and prompt.startswith(self._fork.text):
            self._restore(self._fork)
        if self._extends_cache(prompt):  # asked again: a restore replaces the cache
            return self._cached + self.tokenize(prompt[len(self._cached_text) :])
        return self.tokenize(prompt)

    def _extends_cache(self, prompt: str) -> bool:
        return bool(self._cached_text) and prompt.startswith(self._cached_text)

    def _save_fork(self, text: str) -> None:
        lib = self._lib
        size = lib.llama_state_seq_get_size(self._ctx, 0)
        state = (ctypes.c_uint8 * size)()
        if lib.llama_state_seq_get_data(self._ctx, state, size, 0) == size:
            self._fork = _Fork(text=text, tokens=list(self._cached), state=state)

    def _restore(self, fork: _Fork) -> None:
        lib = self._lib
        lib.llama_memory_clear(self._mem, True)
        if lib.llama_state_seq_set_data(self._ctx, fork.state, len(fork.state), 0) != len(fork.state):
            self.reset()
            return
        self._cached, self._cached_text, self._last_decode = list(fork.tokens), fork.text, 0

    def _reuse(self, tokens: list[int], *, limit: int) -> int:
        """Keep the longest cached prefix llama.cpp can keep; return how many tokens stay cached."""
        if self._lib.llama_memory_seq_pos_max(self._mem, 0) + 1 != len(self._cached):
            self.reset()  # an interrupt landed between a decode and our bookkeeping
        keep = 0
        for a, b in zip(self._cached, tokens, strict=False):
            if a != b:
                break
            keep += 1
        keep = min(keep, limit)
        # The deepseek4 cache can only roll back inside the last decode call, with snapshots (docs/formats.md).
        rollback = len(self._cached) - keep
        if rollback and (
            rollback > min(self._last_decode, self.params.n_rs_seq)
            or keep == 0
            or not self._lib.llama_memory_seq_rm(self._mem, 0, keep, -1)
        ):
            self.reset()
            return 0
        del self._cached[keep:]
        self._last_decode = 0
        return keep

    def _sampler(self, options: SampleOptions) -> Any:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if options.temp <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            seed = lib.LLAMA_DEFAULT_SEED if options.seed is None else options.seed
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(options.top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(options.temp))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    def stream(self, prompt: str, options: SampleOptions, *, fork_at: int | None = None) -> TurnStream:
        """Yield the answer's text as it is generated, then the turn's TurnStats (see `dsv4cli.engine.base`)."""
        stats = TurnStats(stopped="interrupted")
        try:
            yield from self._generate(prompt, options, fork_at, stats)
        except KeyboardInterrupt:
            stats.stopped = "interrupted"  # every decoded token stays in the cache
        yield stats

    def _generate(self, prompt: str, options: SampleOptions, fork_at: int | None, stats: TurnStats) -> Iterator[str]:
        """The answer's text pieces; fills `stats` as it goes.

        `fork_at` is a character offset in `prompt` where the next turn's prompt will differ (the thinking
        opener, whose reasoning the template drops from history): the cache state there is saved so the next
        turn resumes from it instead of re-reading the whole conversation. Closing the iterator early
        (Ctrl-C) keeps every decoded token in the cache.
        """
        lib = self._lib
        start = time.perf_counter()
        head = self._prompt_tokens(prompt[:fork_at] if fork_at else prompt)
        tokens = head + (self.tokenize(prompt[fork_at:]) if fork_at else [])
        if len(tokens) >= self.params.n_ctx:
            raise UsageError(
                f"the conversation has {len(tokens)} tokens, the context holds {self.params.n_ctx}",
                hint="/reset, or raise --ctx",
            )
        stats.prompt_tokens = len(tokens)
        # At least one token must be decoded to get logits; a fork must be taken before its tail is decoded.
        stats.reused_tokens = self._reuse(tokens, limit=len(head) if fork_at else len(tokens) - 1)
        if self.verbose:
            new = len(tokens) - stats.reused_tokens
            sys.stderr.write(f"dsv4 chat: prefix-match hit, {stats.reused_tokens} tokens reused, {new} to prefill\n")
        lib.llama_synchronize(self._ctx)
        lib.llama_perf_context_reset(self._ctx)
        self._cached_text = ""  # unknown until the prefill completes (Ctrl-C may stop it half way)
        self._decode(tokens[stats.reused_tokens : len(head)])
        if fork_at:
            lib.llama_synchronize(self._ctx)
            self._save_fork(prompt[:fork_at])
            self._decode(tokens[len(head) :])
        lib.llama_synchronize(self._ctx)  # llama.cpp adds the prompt-eval counters at synchronization
        prefilled = time.perf_counter()
        stats.prefill_tokens = len(tokens) - stats.reused_tokens
        stats.prefill_tps = stats.prefill_tokens / max(prefilled - start, 1e-9)
        self._cached_text = prompt
        sampler = self._sampler(options)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        generated: list[str] = []  # joined onto the cached text once, at the end: `+=` per token copies it all
        first = 0.0
        try:
            while stats.generated_tokens < options.max_tokens:
                if len(self._cached) >= self.params.n_ctx:
                    stats.stopped = "length"
                    break
                token = lib.llama_sampler_sample(sampler, self._ctx, -1)
                if lib.llama_vocab_is_eog(self._vocab, token):
                    stats.stopped = "eos"
                    break
                if not first:
                    first = time.perf_counter()
                    stats.ttft_s = first - start
                self._decode([token])
                stats.generated_tokens += 1
                text = decoder.decode(self._piece(token))
                if text:
                    generated.append(text)
                    yield text
            else:
                stats.stopped = "length"
        finally:
            tail = decoder.decode(b"", final=True)
            if self._cached_text:  # else a failed decode has reset the cache
                self._cached_text += "".join(generated) + tail
            lib.llama_sampler_free(sampler)
            if self.verbose:
                lib.llama_synchronize(self._ctx)
                lib.llama_perf_context_print(self._ctx)  # llama.cpp's own prompt-eval / eval counters
            if first:
                stats.decode_tps = stats.generated_tokens / max(time.perf_counter() - first, 1e-9)
        if tail:
            yield tail


def count_tokens(path: Path, text: str) -> int:
    """How many tokens `text` is for the model in `path`, as llama-perplexity tokenizes it (BOS added, special
    tokens as plain text). Loads the vocabulary only: no weights are read."""
    llama_lib.install_abort_handler(path)
    import llama_cpp

    sink = _LogSink(llama_cpp, verbose=False)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise RuntimeLoadError(f"llama.cpp could not read the vocabulary of {path}: {sink.last_error() or 'unknown'}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), True, False)
        if n < 0:
            raise RuntimeLoadError(f"the tokenizer of {path} failed on a {len(data)}-byte text")
        return n
    finally:
        llama_cpp.llama_model_free(model)
