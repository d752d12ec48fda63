"""Run many `dsv4` command lines through the real entry point, each bounded, and report how each one ended.

Cases run in worker processes (the suite's own cores, at most `workers` at once), in-process through
`dsv4cli.cli.main` so hundreds of cases take seconds, yet isolated: each worker has a memory cap (RLIMIT_AS) and a
per-case alarm, and a case that kills its worker (llama.cpp aborting, a segfault) is recorded as such and the
worker restarted after it. The fuzz tests of every input format share this harness.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKER = r"""
import io, json, os, resource, signal, sys, time
from contextlib import redirect_stderr, redirect_stdout
memory, seconds = int(sys.argv[3]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
from dsv4cli.cli import main

class Hang(Exception):
    pass

def alarm(*_):
    raise Hang()

signal.signal(signal.SIGALRM, alarm)
cases = json.load(open(sys.argv[1]))
log = open(sys.argv[2], "a")
for index, case in cases:
    log.write(json.dumps({"start": index}) + "\n")
    log.flush()
    err, started = io.StringIO(), time.monotonic()
    saved = {k: os.environ.get(k) for k in case.get("env", {})}
    os.environ.update(case.get("env", {}))
    signal.alarm(seconds)
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            main(case["argv"])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Hang:
        code = "hang"
    except BaseException as e:
        code = f"raised {type(e).__name__}: {e}"
    signal.alarm(0)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    log.write(json.dumps({"index": index, "code": code, "stderr": err.getvalue(),
                          "seconds": time.monotonic() - started}) + "\n")
    log.flush()
"""


def run_cases(
    python: str,
    cases: list[dict[str, Any]],
    work: Path,
    *,
    workers: int = 2,
    memory: int = 6 << 30,
    seconds: int = 20,
) -> list[dict[str, Any]]:
    """Run every case ({"argv": [...], "env"?: {...}, ...}) and return one result per case, in order:
    the case's own keys plus "code" (exit code, "hang", "raised ...", or "crashed: ..."), "stderr", "seconds"."""
    work.mkdir(parents=True, exist_ok=True)
    pending = [list(range(i, len(cases), workers)) for i in range(workers)]
    results: dict[int, dict[str, Any]] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    while any(pending):
        procs = []
        for w, indices in enumerate(pending):
            if not indices:
                continue
            case_file, log = work / f"cases-{w}.json", work / f"log-{w}.jsonl"
            case_file.write_text(json.dumps([(i, cases[i]) for i in indices]))
            log.write_text("")
            cmd = [python, "-c", WORKER, str(case_file), str(log), str(memory), str(seconds)]
            procs.append((w, log, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        for w, log, proc in procs:
            _, stderr = proc.communicate(timeout=900)
            started = None
            for line in log.read_text().splitlines():
                entry = json.loads(line)
                if "start" in entry:
                    started = entry["start"]
                else:
                    results[entry.pop("index")] = entry
                    started = None
            if started is not None:  # the worker died inside this case
                why = f"crashed: exit {proc.returncode}: {stderr.decode(errors='replace')[-500:]}"
                results[started] = {"code": why, "stderr": "", "seconds": 0.0}
            pending[w] = [i for i in pending[w] if i not in results]
            if proc.returncode != 0 and started is None and pending[w]:
                raise RuntimeError(f"fuzz worker failed outside a case: {stderr.decode(errors='replace')[-2000:]}")
    return [{**cases[i], **results[i]} for i in range(len(cases))]


def clean_failures(results: list[dict[str, Any]], *, max_seconds: float = 15) -> list[dict[str, Any]]:
    """Results that did not end cleanly: exit 0, or exit 1 with exactly one `error:` line (the last one on
    stderr; any others are `note:` lines), never a traceback, a hang, a crash, or more than `max_seconds`."""
    bad = []
    for r in results:
        lines = r["stderr"].strip().splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        one_error = len(errors) == 1 and lines[-1] == errors[0]
        only_notes = all(line.startswith(("error: ", "note: ")) for line in lines)
        clean = r["code"] == 0 or (r["code"] == 1 and one_error and only_notes)
        if not clean or "Traceback" in r["stderr"] or r["seconds"] > max_seconds:
            bad.append(r)
    return bad


def registry_cases(root: Path, entries: dict[str, str], commands: list[list[str]]) -> list[dict[str, Any]]:
    """One home per models.toml text in `entries` (label -> text), and one case per (entry, command): each
    command runs with DSV4_HOME set to that home, so every registry entry is read the way a user's would be."""
    cases = []
    for i, (label, text) in enumerate(entries.items()):
        home = root / f"home-{i}"
        home.mkdir(parents=True, exist_ok=True)
        (home / "models.toml").write_text(text)
        cases += [{"argv": argv, "env": {"DSV4_HOME": str(home)}, "entry": label} for argv in commands]
    return cases
