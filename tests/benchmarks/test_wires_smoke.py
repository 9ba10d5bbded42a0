"""benchmarks/wires.py end to end, tiny (eager, half-second phases): both wires answer every request and
the JSON holds every phase and the gRPC/HTTP ratios. Speed is not judged here (benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import ROOT

pytestmark = pytest.mark.slow


def test_both_wires_are_measured_alternately(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.wires", "--models", "fashion", "--eager", "fashion"]
    command += ["--concurrency", "1,4", "--rounds", "1", "--warmup", "0.2", "--duration", "0.5", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    fashion = json.loads((tmp_path / "results.json").read_text())["models"]["fashion"]
    assert fashion["input"] == [28, 28, 1]
    phases = fashion["phases"]
    assert [(p["wire"], p["concurrency"]) for p in phases] == [("http", 1), ("grpc", 1), ("http", 4), ("grpc", 4)]
    for phase in phases:
        assert phase["answers"] > 0 and phase["errors"] == 0, phase
        assert 0 < phase["p50_ms"] <= phase["p99_ms"], phase
    for ratios in fashion["grpc_over_http"].values():
        assert set(ratios) == {"throughput", "p50", "p99"} and all(r > 0 for r in ratios.values())
