"""Benchmark `dsv4 pull` against `huggingface_hub.snapshot_download` on a ~1 GB loopback repo.

Run: .venv/bin/python bench/pull.py [--mib 1024] [--files 4] [--rounds 2]

Both clients download the same repo from the same in-process Hub-compatible server (tests/hub_server.py), each
in its own subprocess, alternating, best round kept. dsv4's time includes its sha256 verification of every file;
peak RSS is the child's own ru_maxrss. Goals: throughput ratio >= 0.95x, dsv4 peak RSS < 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hub_server import HubServer  # noqa: E402

REPO = "bench-org/loopback"

# Each child times only the download call and reports its own peak RSS (ru_maxrss is KiB on Linux).
DSV4_CHILD = """
import json, resource, sys, time
from pathlib import Path
from dsv4cli.hub.pull import PullOptions, pull
t = time.perf_counter()
result = pull(sys.argv[1], PullOptions(folder=Path(sys.argv[2])))
seconds = time.perf_counter() - t
assert result.verified == len(result.files) and not result.mismatched
print(json.dumps({"seconds": seconds, "bytes": result.total_bytes,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
HF_CHILD = """
import json, resource, sys, time
from huggingface_hub import snapshot_download
t = time.perf_counter()
snapshot_download(sys.argv[1], local_dir=sys.argv[2])
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def make_repo(folder: Path, *, mib: int, files: int) -> int:
    """Random (incompressible) shards plus a config.json; returns the total size in bytes."""
    folder.mkdir(parents=True)
    per_file = (mib << 20) // files
    for i in range(1, files + 1):
        with open(folder / f"model-{i:05d}-of-{files:05d}.safetensors", "wb") as f:
            for _ in range(per_file >> 20):
                f.write(os.urandom(1 << 20))
    (folder / "config.json").write_text(json.dumps({"model_type": "deepseek_v4"}))
    return sum(p.stat().st_size for p in folder.iterdir())


def run_child(code: str, target: Path, env: dict[str, str]) -> dict[str, float]:
    shutil.rmtree(target, ignore_errors=True)
    done = subprocess.run(
        [sys.executable, "-c", code, REPO, str(target)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="repo size in MiB")
    parser.add_argument("--files", type=int, default=4, help="number of shards")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each is kept")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dsv4-bench-pull-") as tmp:
        work = Path(tmp)
        total = make_repo(work / "repo", mib=args.mib, files=args.files)
        with HubServer(work / "repo", REPO) as hub:
            env = dict(
                os.environ,
                HF_ENDPOINT=hub.url,
                HF_HOME=str(work / "hf-home"),
                DSV4_HOME=str(work / "dsv4-home"),
                HF_HUB_DISABLE_TELEMETRY="1",
                HF_HUB_DISABLE_PROGRESS_BARS="1",
            )
            env.pop("HF_TOKEN", None)
            best: dict[str, dict[str, float]] = {}
            for round_no in range(1, args.rounds + 1):
                for name, code in (("dsv4", DSV4_CHILD), ("hf", HF_CHILD)):
                    run = run_child(code, work / f"out-{name}", env)
                    mb_s, rss_mb = total / run["seconds"] / 1e6, run["rss"] / 1e6
                    print(f"round {round_no} {name}: {run['seconds']:.2f}s  {mb_s:.0f} MB/s  peak RSS {rss_mb:.0f} MB")
                    if name not in best or run["seconds"] < best[name]["seconds"]:
                        best[name] = run

    dsv4_rate = total / best["dsv4"]["seconds"] / 1e6
    hf_rate = total / best["hf"]["seconds"] / 1e6
    print(f"\nrepo: {total / 2**20:.0f} MiB in {args.files} LFS shards + config.json, loopback HTTP")
    print(f"snapshot_download (huggingface_hub, no hash check): {hf_rate:.0f} MB/s")
    print(f"dsv4 pull (sha256-verified):                         {dsv4_rate:.0f} MB/s")
    print(f"ratio dsv4 / snapshot_download: {dsv4_rate / hf_rate:.2f}x (goal >= 0.95x)")
    print(f"dsv4 peak RSS: {best['dsv4']['rss'] / 1e6:.0f} MB (goal < 300 MB)")


if __name__ == "__main__":
    main()
