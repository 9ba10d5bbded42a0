"""python -m benchmarks.startup: seconds from ``python -m service`` to ``/health/ready`` (issue 22).

Each round starts the same model three ways, one after the other:
* ``torch.compile``: IGCV2_AOT=false, how the service started before ahead-of-time packages (inductor's
  cache is kept across all starts, as the image's /cache volume keeps it; frozen graphs never hit it);
* ``cold cache``: the default, on an empty compile cache: the server serves with torch.compile and a
  background process compiles the packages; the run waits for them (``fill_s``: after ready);
* ``warm cache``: the same cache again, as a restart, a second worker or a new replica finds it;
then, with ``--workers N``, ``warm cache, N workers``: every worker must load every bucket (read from the
server's log). Rounds repeat the kinds in the same order (A B C A B C), so a machine that gets busier
during the run shifts every kind alike; the ratios are taken within a round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.server import ROOT, Service
from benchmarks.workloads import BUNDLED_STORE

MODEL = "igcv2-fashion"
LOADED = "ahead-of-time packages of buckets"  # one line per worker that loaded every bucket
MISSED = "torch.compile serves this start"  # one per worker that did not


def packages_in(cache: Path) -> int:
    return sum(1 for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def start(label: str, env: dict[str, str], out: Path, timeout: float, fill: Path | None = None) -> dict[str, Any]:
    """One start to ready: its seconds, what the server says of the model, what its log says it loaded;
    with ``fill``, then the seconds until that cache holds a package for every bucket."""
    log = out / f"{label.replace(' ', '-').replace(',', '')}.log"
    with Service(BUNDLED_STORE, MODEL, {"IGCV2_LOG_LEVEL": "info", **env}, log, label) as svc:
        svc.start(timeout)
        described = svc.describe()
        ready = time.monotonic()
        if fill is not None:
            while packages_in(fill) < len(described["buckets"]) and time.monotonic() < ready + timeout:
                time.sleep(0.5)
        fill_s = time.monotonic() - ready
    text = log.read_text(errors="replace")
    result = {
        "start": label,
        "ready_s": svc.startup_s,
        "warmup_s": described.get("warmup_s"),
        "compiled": described.get("compiled"),
        "device": described.get("device"),
        "loaded_from_cache": text.count(LOADED),
        "served_by_torch_compile": text.count(MISSED),
        **({"fill_s": fill_s, "packages": packages_in(fill)} if fill is not None else {}),
    }
    print(json.dumps(result), flush=True)
    return result


def measure(args: argparse.Namespace) -> dict[str, Any]:
    base = {"IGCV2_MODELS": MODEL, **dict(e.split("=", 1) for e in args.server_env)}
    inductor = args.out / "inductor-cache"  # shared by every start: what a cache volume holds
    rounds = []
    for i in range(args.rounds):
        cache = Path(tempfile.mkdtemp(prefix="compile-cache-", dir=args.out))
        env = {**base, "TORCHINDUCTOR_CACHE_DIR": str(inductor), "IGCV2_COMPILE_CACHE": str(cache)}
        starts = [
            start(f"torch.compile {i}", {**env, "IGCV2_AOT": "false"}, args.out, args.ready_timeout),
            start(f"cold cache {i}", env, args.out, args.ready_timeout, fill=cache),
            start(f"warm cache {i}", env, args.out, args.ready_timeout),
        ]
        if args.workers > 1:
            workers = {**env, "IGCV2_WORKERS": str(args.workers)}
            starts.append(start(f"warm cache, {args.workers} workers {i}", workers, args.out, args.ready_timeout))
        jit, cold, warm = (s["ready_s"] for s in starts[:3])
        rounds.append({"starts": starts, "warm_over_cold": warm / cold, "cold_over_torch_compile": cold / jit})
        print(json.dumps({k: v for k, v in rounds[-1].items() if k != "starts"}), flush=True)
        shutil.rmtree(cache)
    return {
        "model": MODEL,
        "server_env": base,
        "rounds": rounds,
        "median_warm_over_cold": statistics.median(r["warm_over_cold"] for r in rounds),
        "median_cold_over_torch_compile": statistics.median(r["cold_over_torch_compile"] for r in rounds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "startup")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of torch.compile, cold cache, warm cache")
    parser.add_argument("--workers", type=int, default=2, help="IGCV2_WORKERS of a last warm start (1: none)")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure(args)
    (args.out / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
