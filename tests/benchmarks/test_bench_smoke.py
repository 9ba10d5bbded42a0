"""The benchmark end to end, tiny: every phase runs for about a second (eager, no compile) and the
JSON it writes has every field with sane values. The numbers themselves are not judged here:
only a full run on a quiet machine (benchmarks/README.md) says anything about speed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import ROOT
from samples import default_model_store

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("hey") is None, reason="needs Debian's hey (make test installs it)"),
]

SHED = {"429", "503", "504"}


def ordered(latency: dict[str, float | None]) -> bool:
    return latency["p50"] is not None and 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]


def check_point(point: dict, batching: bool) -> None:
    assert point["throughput_images_per_s"] > 0 and point["requests_per_s"] > 0
    assert ordered(point["latency_ms"]), point["latency_ms"]
    assert set(point["codes"]) == {"200"}, point["codes"]
    assert point["unaccounted"] == 0, "hey recorded fewer answers than the server sent"
    assert point["requests_measured"] > 0
    if batching:
        assert 1.0 <= point["mean_batch_size"] <= 4.0  # --smoke sets max_batch_size=4
    else:
        assert point["mean_batch_size"] == 1.0  # IGCV2_MAX_BATCH_SIZE=1: the server never batched
    cores = point["cpu_cores"]
    assert cores["server"] > 0 and cores["loadgen"] >= 0 and cores["machine"] > 0


@pytest.mark.timeout(300)
def test_benchmark_smoke_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--smoke",
        "--mode",
        "all",
        "--out",
        str(out),
        "--model-store",
        str(default_model_store(tmp_path)),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((out / "results.json").read_text())
    assert "error" not in result

    assert result["model"]["name"] == "igcv2-fashion" and result["model"]["input"]["height"] == 28
    assert result["machine"]["cores"] >= 1 and result["machine"]["hey"]
    assert result["modes"] == ["throughput", "overload", "soak"]

    ceiling = result["ceiling"]
    assert ceiling["compiled"] is False  # --smoke is eager
    assert [b["batch"] for b in ceiling["buckets"]] == [1, 2, 4]
    assert ceiling["best_batch"] in (1, 2, 4) and ceiling["images_per_s"] > 0
    assert 0 < ceiling["single_image"]["p50_ms"] <= ceiling["single_image"]["p95_ms"]

    assert [p["concurrency"] for p in result["batching"]["sweep"]] == [1, 4]
    for point in result["batching"]["sweep"]:
        check_point(point, batching=True)
    assert result["batching"]["server"]["batching"]["max_batch_size"] == 4
    assert [p["concurrency"] for p in result["no_batching"]["sweep"]] == [4]
    for point in result["no_batching"]["sweep"]:
        check_point(point, batching=False)
    assert result["no_batching"]["server"]["batching"]["max_batch_size"] == 1

    (open_point,) = result["open_loop"]
    assert open_point["offered_requests_per_s"] > 0 and open_point["requests_per_s"] > 0
    assert open_point["pacing"]["workers"] >= 1 and open_point["unaccounted"] == 0

    ratios = result["ratios"]
    assert set(ratios) == {"batching_speedup", "saturation_vs_ceiling", "c1_latency_vs_inprocess"}
    assert all(r["value"] > 0 and isinstance(r["met"], bool) for r in ratios.values())
    assert ratios["batching_speedup"]["concurrency"] == 4  # 32 is not in the smoke sweep: the largest common one

    overload = result["overload"]
    assert overload["transport_errors"] == {} and overload["unexpected_codes"] == {}
    assert overload["targets"]["every_request_answered"]["met"] is True
    assert set(overload["codes"]) <= {"200"} | SHED and int(overload["codes"].get("200", 0)) > 0
    assert overload["queue_depth"]["capacity"] == 16 and 0 <= overload["queue_depth"]["max"] <= 16
    assert overload["requests_in_progress"]["max"] > 0  # sampled during overload: never an idle server
    assert overload["rss"]["start_mib"] > 50 and overload["rss"]["end_mib"] > 50
    assert overload["goodput_images_per_s"] > 0 and overload["saturation_images_per_s"] > 0
    before, after = overload["saturation_before_after_images_per_s"]  # bracketed: the machine's speed drifts
    assert before > 0 and after > 0 and overload["saturation_images_per_s"] == (before + after) / 2
    assert overload["alive_after"] and overload["recovered_after"]
    assert overload["retry_after"]["all_present"] is True

    soak = result["soak"]
    assert soak["transport_errors"] == {} and soak["unexpected"] == 0 and soak["server_errors"] == {}
    assert soak["requests"] == sum(soak["codes"].values()) > 0
    for name, kind in soak["kinds"].items():
        expected = {str(c) for c in kind["expected"]}
        assert set(kind["codes"]) <= expected | SHED, (name, kind["codes"])
        assert expected & set(kind["codes"]), f"{name} never got its expected answer {expected}: {kind['codes']}"
    assert {"400", "404", "413", "415", "422"} <= set(soak["codes"])
    assert soak["rss"]["start_mib"] > 50 and soak["alive_after"] and soak["recovered_after"]

    assert (out / "latency_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Ratios" in (out / "results.md").read_text()


@pytest.mark.timeout(200)
def test_the_stand_in_device_is_shared_by_every_process_and_reports_its_busy_share(tmp_path: Path) -> None:
    """A + B * bucket ms per call on one device for the whole server (here the executor of two front-ends):
    the sweep reports its busy share where a GPU's would be, and the server computed nothing real."""
    out = tmp_path / "bench"
    cmd = [
        *(sys.executable, "-m", "benchmarks.run", "--smoke", "--mode", "sweep", "--out", str(out)),
        *("--model-store", str(default_model_store(tmp_path)), "--concurrency", "8", "--duration", "2"),
        *("--standin-device", "2,0.05", "--server-env", "IGCV2_WORKERS=2"),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((out / "results.json").read_text())
    (point,) = result["batching"]["sweep"]
    assert set(point["codes"]) == {"200"} and point["throughput_images_per_s"] > 0
    assert 0.05 < point["gpu_busy"] <= 1.0, point["gpu_busy"]
    # Each call takes at least 2 ms of the one device: no more than 500 calls a second, whatever the CPU.
    assert point["throughput_images_per_s"] / point["mean_batch_size"] <= 500 * 1.05
    assert (out / "raw" / "standin-device").stat().st_size == 8
