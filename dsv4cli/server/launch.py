"""`dsv4 serve`'s work: llama-server's command line from the plan, the safety checks, and the launch.

What llama-server lacks and dsv4 adds: the model reference and placement (`dsv4cli.load.prepare_model`, the same
loading path as `dsv4 chat`), the engine build, a port and key check before anything starts, the DeepSeek V4 chat
template (byte-equal to DeepSeek's encoder, the one `quantize` embeds) whatever the GGUF carries, a chat page at `/`,
MTP drafting when the file carries the nextn block, and a lifecycle that leaves no process behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from dsv4cli.errors import UsageError
from dsv4cli.home import dsv4_home
from dsv4cli.load.placement import Placement
from dsv4cli.load.prepared import PreparedModel, prepare_model
from dsv4cli.models.ref import ModelRef
from dsv4cli.rpc.health import check_workers
from dsv4cli.server.page import placement_summary, remove_page, write_page
from dsv4cli.server.process import ServerError, ServerProcess, check_port_free, free_port, is_loopback
from dsv4cli.server.records import remove_record, write_record
from dsv4cli.toolchain.build import ServerBinary
from quant.gguf_set import complete_split_set

KEY_FILE_LIMIT = 64 << 10
KEY_FILE_HINT = "pass a file holding the API keys, one per line, as llama-server's --api-key-file reads it"


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port
    api_key: str | None = None
    api_key_file: Path | None = None
    alias: str | None = None  # the model id clients send; default: the name given on the command line
    think: bool = False  # the default per request; clients override with chat_template_kwargs.enable_thinking
    mtp: bool = True  # draft with the nextn block when the GGUF has one
    parallel: int | None = None  # slots; None: llama-server's auto (4, one shared KV pool)
    health_timeout: float = 600.0


@dataclass
class RunningServer:
    process: ServerProcess
    model: PreparedModel
    alias: str
    base_url: str
    argv: list[str]
    record: Path  # what `dsv4 rm` reads to keep this model (`records.py`)
    mtp: bool  # started with MTP drafting
    page: Path  # the chat page's folder (`page.py`)

    def stop(self) -> None:
        """Stop llama-server, then drop the record: the files are free once no process maps them."""
        self.process.stop()
        remove_record(self.record)
        remove_page(self.page)

    def info(self) -> dict[str, object]:
        """What scripts need: where to connect and which process to watch."""
        return {
            "base_url": self.base_url,
            "pid": self.process.pid,
            "model": self.alias,
            "gguf": str(self.model.gguf),
            "log": str(self.process.log),
            "mtp": self.mtp,
        }


def check_access(opts: ServeOptions) -> None:
    """Refuse to listen beyond this machine without a key: anyone on the network could use the model. A key that
    is empty or only whitespace (flag, environment or file) is refused, never taken as "no key"."""
    if opts.api_key is not None and opts.api_key_file is not None:
        raise UsageError("give --api-key (or DSV4_API_KEY) or --api-key-file, not both")
    if opts.api_key is not None and not opts.api_key.strip():
        raise UsageError(
            "the API key from --api-key or DSV4_API_KEY is empty or only whitespace",
            hint="give a real key, or neither (then serve listens on loopback only)",
        )
    if opts.api_key_file is not None:
        check_key_file(opts.api_key_file)
    if not is_loopback(opts.host) and opts.api_key is None and opts.api_key_file is None:
        raise UsageError(
            f"--host {opts.host} is reachable from other machines; refusing to serve without an API key",
            hint="pass --api-key KEY or --api-key-file FILE, or keep the default --host 127.0.0.1",
        )


def check_key_file(path: Path) -> None:
    """An --api-key-file must be a small regular file of keys, one per line, with no empty or blank line (which
    llama-server could take as a key that matches a request carrying none)."""
    from quant.errors import CheckpointError
    from quant.files import read_bounded

    if not path.is_file():
        raise UsageError(f"--api-key-file {path}: no such file (or not a regular file)", hint=KEY_FILE_HINT)
    try:
        text = read_bounded(path, KEY_FILE_LIMIT).decode("utf-8")
    except (CheckpointError, UnicodeDecodeError) as e:
        raise UsageError(f"--api-key-file {path}: not a key file ({e})", hint=KEY_FILE_HINT) from e
    lines = text.splitlines()
    blank = next((n for n, line in enumerate(lines, 1) if not line.strip()), None)
    if not lines or blank is not None:
        where = f"line {blank} is empty or only whitespace" if blank else "it holds no key"
        raise UsageError(f"--api-key-file {path}: {where}", hint=KEY_FILE_HINT)


def server_argv(
    engine: ServerBinary, model: PreparedModel, opts: ServeOptions, *, alias: str, port: int, page: Path | None = None
) -> list[str]:
    """The full llama-server command line: the plan's placement, then serving, chat and drafting flags."""
    from quant.tokenizer import TEMPLATE_PATH  # here: quant.tokenizer loads gguf and numpy, which --help must not

    argv = [str(engine.server), *model.llama_args, "--host", opts.host, "--port", str(port), "--alias", alias]
    if page is not None:
        argv += ["--path", str(page)]  # the chat page at `/`
    argv += ["--jinja", "--reasoning-format", "deepseek", "--reasoning", "on" if opts.think else "off"]
    # llama.cpp's own V4 template keeps past reasoning where DeepSeek's encoder drops it, and GGUFs made elsewhere
    # carry that one; ours matches the encoder (it also names `dsml_token`, which picks llama.cpp's V4 parser).
    argv += ["--chat-template-file", str(TEMPLATE_PATH)]
    if opts.mtp and model.has_mtp:
        argv += ["--spec-type", "draft-mtp"]
    if opts.parallel is not None:
        argv += ["--parallel", str(opts.parallel)]
    if opts.api_key_file is not None:
        argv += ["--api-key-file", str(opts.api_key_file)]
    return argv


def start_server(
    ref: ModelRef, placement: Placement, opts: ServeOptions, engine: ServerBinary, *, note: Callable[[str], None]
) -> RunningServer:
    """Check access and port, prepare the model as chat does, start llama-server and return once it answers."""
    check_access(opts)
    port = opts.port or free_port(opts.host if is_loopback(opts.host) else "0.0.0.0")
    check_port_free(opts.host, port)
    prepared = prepare_model(ref, placement, note=note)
    return serve_prepared(prepared, replace(opts, port=port), engine, alias=opts.alias or ref.text, note=note)


def serve_prepared(
    prepared: PreparedModel, opts: ServeOptions, engine: ServerBinary, *, alias: str, note: Callable[[str], None]
) -> RunningServer:
    """Start llama-server on `opts.port` for a prepared model and return once it answers /health.

    If the server dies starting with MTP drafting on, it is started again without it (the model is still served;
    the note names the log): drafting is a speed-up, never a reason not to serve.
    """
    if prepared.workers:
        check_workers(prepared.workers)  # llama-server would only log an unreachable worker
    note(f"starting llama-server {engine.version} ...")  # after the model's checks: a refusal stays one line
    port = opts.port
    url_host = "127.0.0.1" if opts.host in ("0.0.0.0", "::") else opts.host
    url_host = f"[{url_host}]" if ":" in url_host else url_host
    base_url = f"http://{url_host}:{port}"
    record = write_record(complete_split_set(prepared.gguf), url=f"{base_url}/v1", model=alias)
    mtp = opts.mtp and prepared.has_mtp
    info = {"model": alias, "gguf": prepared.gguf.name, "placement": placement_summary(prepared.llama_args)}
    page = write_page(port, {**info, "mtp": mtp})
    launch = {"port": port, "base_url": base_url, "alias": alias, "page": page}
    try:
        try:
            process, argv = _launch(engine, prepared, opts, **launch)
        except ServerError as e:
            if not mtp:
                raise
            note(f"llama-server did not start with MTP drafting ({e}); starting it without (--no-mtp skips this try)")
            mtp = False
            write_page(port, {**info, "mtp": False})
            process, argv = _launch(engine, prepared, replace(opts, mtp=False), **launch)
    except BaseException:
        remove_record(record)
        remove_page(page)
        raise
    return RunningServer(
        process=process, model=prepared, alias=alias, base_url=base_url, argv=argv, record=record, mtp=mtp, page=page
    )


def _launch(
    engine: ServerBinary,
    prepared: PreparedModel,
    opts: ServeOptions,
    *,
    alias: str,
    port: int,
    base_url: str,
    page: Path,
) -> tuple[ServerProcess, list[str]]:
    argv = server_argv(engine, prepared, opts, alias=alias, port=port, page=page)
    env = {"LLAMA_API_KEY": opts.api_key} if opts.api_key is not None else {}  # not on llama-server's command line
    log = dsv4_home() / "logs" / f"llama-server-{port}.log"
    process = ServerProcess(argv, log=log, base_url=base_url, env=env)
    try:
        process.wait_healthy(opts.health_timeout)
    except BaseException:
        process.stop()
        raise
    return process, argv
