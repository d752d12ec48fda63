"""`dsv4 eval` on the tiny model with the engine build's real llama-perplexity: a model against itself, a lossy
recipe against the lossless reference dsv4 makes, our figures against llama-perplexity's own, and the errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dsv4cli.toolchain.build import installed_engine

pytestmark = [  # the engine build's llama-perplexity: the server tier
    pytest.mark.server,
    pytest.mark.skipif(installed_engine() is None, reason="needs `dsv4 engine build` (llama-perplexity)"),
]

FAST = ("--ctx", "128", "--chunks", "4", "--cpu")


@pytest.fixture(scope="module")
def lossy_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """`tiny` with Q4_0 experts (a rounding of the FP4 values), its report naming the checkpoint."""
    from quant.convert import QuantOptions, quantize_checkpoint

    out = tmp_path_factory.mktemp("lossy") / "tiny-q4_0-q8_0.gguf"
    quantize_checkpoint(tiny_checkpoint, out, QuantOptions(experts="q4_0"))
    return out


def _eval(dsv4, *args: str) -> tuple[dict, str]:
    r = dsv4("eval", *args, *FAST, "--json")
    assert r.code == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def test_model_against_itself_is_exact(dsv4, tiny_gguf: Path) -> None:
    result, _ = _eval(dsv4, str(tiny_gguf), "--ref", str(tiny_gguf))
    assert abs(result["kld_mean"]) < 1e-5 and result["kld_max"] < 1e-5 and result["rms_dp"] == 0.0
    # llama-perplexity stores the reference's log-probabilities as uint16 steps of (max - min) / 65535 (about
    # 3e-4 nats here), and the random tiny model's distributions are nearly flat: where its two best tokens are
    # closer than one step, the stored reference ties and names the first. One such token in 252 is 0.996.
    assert result["top1"] > 0.99
    assert result["ppl"] == pytest.approx(result["ppl_ref"], rel=1e-5)
    assert result["tokens"] == 4 * (128 - 1 - 64)  # the second half of every chunk is scored


def test_lossy_recipe_against_made_reference_matches_llama_perplexity(
    dsv4, lossy_gguf: Path, isolated_env: Path
) -> None:
    result, stderr = _eval(dsv4, str(lossy_gguf))
    reference = lossy_gguf.parent / "tiny-mxfp4-bf16.gguf"
    assert "MXFP4 experts, BF16 dense" in stderr and reference.is_file()  # made with dsv4's own quantizer
    assert result["ref_path"] == str(reference) and not result["cache_reused"]
    assert result["kld_mean"] > 1e-4 and result["kld_p99"] > result["kld_median"] > 0 and result["top1"] < 1.0
    assert result["kld_p999"] >= result["kld_p99"] and result["kld_max"] >= result["kld_p999"]

    [base] = (isolated_env / "eval" / "logits").glob("*.bin")
    by_hand = _llama_perplexity_by_hand(lossy_gguf, base)
    assert result["kld_mean"] == by_hand["Mean    KLD"]
    assert result["kld_median"] == by_hand["Median  KLD"]
    assert result["kld_p99"] == by_hand["99.0%   KLD"] and result["kld_max"] == by_hand["Maximum KLD"]
    assert result["ppl"] == by_hand["Mean PPL(Q)"] and result["ppl_ref"] == by_hand["Mean PPL(base)"]
    assert result["top1"] == pytest.approx(by_hand["Same top p"] / 100, abs=1e-9)
    assert result["rms_dp"] == pytest.approx(by_hand["RMS Δp"] / 100, abs=1e-9)

    again, stderr = _eval(dsv4, str(lossy_gguf))  # the reference logits are reused
    assert again["cache_reused"] and "reusing" in stderr and again["ref_seconds"] == 0
    assert again["kld_mean"] == result["kld_mean"]

    shown = dsv4("show", str(lossy_gguf), "--json")
    assert json.loads(shown.stdout)["eval"][0]["kld_mean"] == result["kld_mean"]  # one record per way measured


def _llama_perplexity_by_hand(model: Path, base: Path) -> dict[str, float]:
    """llama-perplexity's own statistics block for `model` against the base logits file (run again when its
    output was cut short: the pinned llama.cpp's log thread can lose the tail on a busy machine)."""
    tool = installed_engine().tool("llama-perplexity")
    argv = [str(tool), "-m", str(model), "-c", "128", "-b", "128", "-ub", "128", "-t", "2", "-fa", "on", "--no-repack"]
    argv += ["--kl-divergence-base", str(base), "--kl-divergence"]
    for _ in range(5):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True).stdout
        stats = dict(re.findall(r"^([^:\n]+?)\s*:\s+(-?[\d.]+)", out, re.M))
        if "Same top p" in stats:
            return {k.strip(): float(v) for k, v in stats.items()}
    pytest.fail("llama-perplexity never printed its statistics")


def test_reference_of_another_vocabulary_is_one_line(dsv4, tiny_gguf: Path, tmp_path: Path, isolated_env: Path) -> None:
    from dsv4cli.models.registry import ModelSpec, get_model
    from dsv4cli.models.tiny import write_tiny_checkpoint
    from quant.convert import QuantOptions, quantize_checkpoint

    config = {**get_model("tiny").config, "vocab_size": 384}
    write_tiny_checkpoint(ModelSpec(name="other", builtin=True, config=config), tmp_path / "other")
    other = tmp_path / "other.gguf"
    quantize_checkpoint(tmp_path / "other", other, QuantOptions())
    r = dsv4("eval", str(tiny_gguf), "--ref", str(other), *FAST)
    assert r.code == 1 and "the vocabularies differ" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (isolated_env / "eval").exists()  # refused before any work


def test_text_too_short_for_ctx_is_one_line(dsv4, tiny_gguf: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("a few words only\n")
    r = dsv4("eval", str(tiny_gguf), "--ref", str(tiny_gguf), "--text", str(short), *FAST)
    assert r.code == 1 and "--ctx 128 needs at least 256" in r.stderr and "give a longer --text" in r.stderr
    assert [line for line in r.stderr.splitlines() if "error" in line] == [r.stderr.splitlines()[-1]]


@pytest.mark.parametrize("damage", ["truncated", "flipped", "no-record"])
def test_damaged_logits_cache_is_computed_again(dsv4, tiny_gguf: Path, isolated_env: Path, damage: str) -> None:
    args = (str(tiny_gguf), "--ref", str(tiny_gguf), "--chunks", "2")
    first = dsv4("eval", *args, "--ctx", "128", "--cpu", "--json")
    assert first.code == 0, first.stderr
    [cached] = (isolated_env / "eval" / "logits").glob("*.bin")
    data = bytearray(cached.read_bytes())
    if damage == "truncated":
        cached.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        data[len(data) // 2] ^= 0xFF
        cached.write_bytes(bytes(data))
    else:
        cached.with_suffix(".json").unlink()  # killed between the rename and the record: not trusted
    again = dsv4("eval", *args, "--ctx", "128", "--cpu", "--json")
    assert again.code == 0 and "partial or damaged; computing them again" in again.stderr
    assert cached.read_bytes() == bytes(data) if damage != "flipped" else cached.read_bytes() != bytes(data)
    assert json.loads(again.stdout)["kld_max"] < 1e-5 and not json.loads(again.stdout)["cache_reused"]


def test_list_json_carries_the_result(dsv4, tiny_gguf: Path, isolated_env: Path) -> None:
    converted = isolated_env / "gguf" / tiny_gguf.name
    converted.parent.mkdir(parents=True)
    shutil.copy(tiny_gguf, converted)
    result, _ = _eval(dsv4, tiny_gguf.name, "--ref", str(converted))
    [entry] = json.loads(dsv4("list", "--json").stdout)
    assert entry["eval"][0]["kld_mean"] == result["kld_mean"] and entry["eval"][0]["text"] == "builtin:mixed-v1"
    assert any(f.endswith(".eval.json") for f in entry["files"])  # `dsv4 rm` removes the record with the model


def test_kld_output_is_complete_on_a_busy_machine(lossy_gguf: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    """The pinned llama-perplexity exits without flushing its log thread; with the exit drain preloaded, every one of
    twelve runs, six at once on a busy machine, prints all its rows and the whole statistics block (without it,
    most such runs lost the tail here: `dsv4cli.eval.exit_drain`)."""
    from concurrent.futures import ThreadPoolExecutor

    from dsv4cli.eval.exit_drain import exit_drain_library
    from dsv4cli.eval.perplexity import parse_kld, run_tool
    from dsv4cli.eval.text import DATA

    assert exit_drain_library() is not None  # a C compiler is here: the engine was built with it
    tool = str(installed_engine().tool("llama-perplexity"))
    common = ["-c", "128", "-b", "128", "-ub", "128", "-t", "1", "-fa", "off", "--no-repack"]
    base = tmp_path / "base.bin"
    run_tool([tool, "-m", str(tiny_gguf), *common, "-f", str(DATA / "mixed-v1.txt"), "--chunks", "4",
              "--kl-divergence-base", str(base)], tmp_path / "base.log", lambda _: None)  # fmt: skip
    argv = [tool, "-m", str(lossy_gguf), *common, "--kl-divergence-base", str(base), "--kl-divergence"]

    def once(i: int) -> float:
        log = tmp_path / f"run-{i}.log"
        return parse_kld(run_tool(argv, log, lambda _: None), log, 4).kld_mean  # IncompleteOutput if cut short

    with ThreadPoolExecutor(6) as pool:
        figures = set(pool.map(once, range(12)))
    assert len(figures) == 1 and figures.pop() > 0


def test_ctrl_c_while_writing_reference_logits_leaves_the_cache_consistent(
    python: str, tiny_gguf: Path, tmp_path: Path
) -> None:
    """SIGINT to a `dsv4 eval` subprocess (its progress bar drawn) while llama-perplexity writes the reference
    logits: exit 130 with one line, the child gone, no partial file and no file without its record; the next run
    computes the cache again and the one after reuses it."""
    import os
    import signal
    import time

    home = tmp_path / "home"
    env = {**os.environ, "DSV4_HOME": str(home), "DSV4_PROGRESS": "1"}
    cmd = [python, "-m", "dsv4cli", "eval", str(tiny_gguf), "--ref", str(tiny_gguf), "--ctx", "128", "--cpu"]
    logits = home / "eval" / "logits"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size > 1 << 20 for p in logits.glob("*.bin.partial")):  # a few chunks written
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "reference" in stderr and "chunks" in stderr  # the progress bar was drawn
    assert stderr.strip().splitlines()[-1].startswith("interrupted: no result recorded")
    assert not _processes_naming(home), "llama-perplexity outlived dsv4 eval"
    assert sorted(p.name for p in logits.iterdir()) == [".lock"]

    def run() -> dict:
        r = subprocess.run([*cmd, "--chunks", "2", "--json"], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    first, second = run(), run()
    assert not first["cache_reused"] and second["cache_reused"]
    assert first["kld_max"] < 1e-5 and second["kld_mean"] == first["kld_mean"]


def _processes_naming(text: Path) -> list[int]:
    """Processes whose command line names `text` (llama-perplexity's logits path is under the eval's home)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(text).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("planned", ["plan-file", "this-machine"])
def test_eval_loads_with_the_placement_plan_gives(
    dsv4, tiny_gguf: Path, tmp_path: Path, isolated_env: Path, monkeypatch: pytest.MonkeyPatch, planned: str
) -> None:
    """Both llama-perplexity runs get the plan's placement flags (threads, GPU layers, KV types, flash attention,
    load mode, repacking); only the chunk flags are eval's. Where the engine reports AMX, repacking is off: forcing
    it aborts llama.cpp there (`dsv4cli.system.llama_lib.use_extra_bufts`)."""
    import shlex

    monkeypatch.delenv("DSV4_REPACK", raising=False)
    plan_file = tmp_path / "plan.json"
    args: tuple[str, ...] = ("--plan", str(plan_file))
    if planned == "plan-file":  # a thread count of the user's, not the machine's default
        assert dsv4("plan", str(tiny_gguf), "--ctx", "128", "--threads", "1", "-o", str(plan_file)).code == 0
    else:
        assert dsv4("plan", str(tiny_gguf), "--ctx", "128", "-o", str(plan_file)).code == 0
        args = ()
    planned_args = json.loads(plan_file.read_text())["llama_args"]
    r = dsv4("eval", str(tiny_gguf), "--ref", str(tiny_gguf), *args, "--ctx", "128", "--chunks", "2", "--json")
    assert r.code == 0, r.stderr

    logs = sorted((isolated_env / "logs").glob("eval-*.log"))
    assert len(logs) == 2  # the reference's run and the model's
    for log in logs:
        command, *output = log.read_text().splitlines()
        argv = shlex.split(command.removeprefix("$ "))[1:]
        assert _placement_flags(argv) == _placement_flags(planned_args)
        assert argv[argv.index("-c") + 1] == "128" and int(argv[argv.index("-b") + 1]) <= 128
        if any("AMX_INT8 = 1" in line for line in output):  # the engine's own system_info line
            assert "--no-repack" in argv
    if planned == "plan-file":
        assert planned_args[planned_args.index("-t") + 1] == "1"


def _placement_flags(argv: list[str]) -> list[str]:
    """llama.cpp flags without the model, the chunk sizes and eval's own (text, chunks, logits files)."""
    with_value = {"-m", "-c", "-b", "-ub", "-f", "--chunks", "--kl-divergence-base"}
    kept, rest = [], iter(argv)
    for arg in rest:
        if arg in with_value:
            next(rest)
        elif arg != "--kl-divergence":
            kept.append(arg)
    return kept


def test_a_quant_that_copied_the_lossless_keys_is_not_its_own_reference() -> None:
    """llama-quantize keeps its input's dsv4.* keys and writes its own general.file_type (llama.h: MXFP4_MOE 38,
    MOSTLY_Q2_K 10): a Q2_K made from the lossless file must not pass for the lossless reference (KLD 0)."""
    from dsv4cli.eval.reference import is_lossless
    from quant.gguf_keys import DENSE_KEY, EXPERTS_KEY, FILE_TYPE

    lossless = {EXPERTS_KEY: "mxfp4", DENSE_KEY: "bf16", FILE_TYPE: 38}
    assert is_lossless(lossless)
    assert not is_lossless({**lossless, FILE_TYPE: 10})
    assert not is_lossless({**lossless, DENSE_KEY: "q8_0"})
