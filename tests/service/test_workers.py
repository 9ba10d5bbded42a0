"""service/workers.py in parts: state files, readiness across workers, summed process metrics, the
run folder, each worker's share of the cores. The supervisor itself runs in tests/e2e/test_workers.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from service.config import Settings
from service.engine import Engine
from service.errors import Conflict
from service.registry import ModelRegistry
from service.runtime import configure_cpu_threads
from service.workers import WorkerProcesses, WorkerSet, alive, clear


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_readiness_waits_for_every_other_worker_to_announce_itself_ready(tmp_path: Path) -> None:
    me, other = WorkerSet(tmp_path, 0, 3), WorkerSet(tmp_path, 1, 3)
    assert me.waiting() == ["worker 1 not running", "worker 2 not running"]
    other.announce(ready=False)  # same pid as this test, which is alive
    assert me.waiting() == ["worker 1 starting", "worker 2 not running"]
    other.announce(ready=True)
    (tmp_path / "worker-2").write_text(f"{os.getpid()} ready\n")
    assert me.waiting() == []
    assert other.waiting() == ["worker 0 not running"]  # its own state is not its concern, the others' are
    assert not list(tmp_path.glob(".worker-*")), "announce leaves no temporary file behind"


def test_a_dead_workers_ready_state_counts_for_nothing(tmp_path: Path) -> None:
    me = WorkerSet(tmp_path, 0, 2)
    (tmp_path / "worker-1").write_text(f"{dead_pid()} ready\n")
    assert me.waiting() == ["worker 1 not running"]
    assert me.pids() == []
    (tmp_path / "worker-1").write_text("garbage")
    assert me.waiting() == ["worker 1 not running"]
    assert alive(os.getpid()) and not alive(dead_pid())


def test_process_metrics_add_up_every_live_worker(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(60)"])
    try:
        time.sleep(1.0)  # the child has touched its 64 MiB
        (tmp_path / "worker-0").write_text(f"{os.getpid()} ready\n")
        (tmp_path / "worker-1").write_text(f"{sleeper.pid} starting\n")
        (tmp_path / "worker-2").write_text(f"{dead_pid()} ready\n")
        workers = WorkerSet(tmp_path, 0, 3)
        assert sorted(workers.pids()) == sorted([os.getpid(), sleeper.pid])
        values = {m.name: m.samples[0].value for m in WorkerProcesses(workers).collect()}
        alone = {m.name: m.samples[0].value for m in WorkerProcesses(WorkerSet(tmp_path, 0, 1)).collect()}
    finally:
        sleeper.kill()
        sleeper.wait()
    assert set(values) == {"process_resident_memory_bytes", "process_cpu_seconds"}
    own_rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert alone["process_resident_memory_bytes"] == pytest.approx(own_rss, rel=0.2)
    assert values["process_resident_memory_bytes"] - alone["process_resident_memory_bytes"] > 64 << 20
    assert values["process_cpu_seconds"] >= alone["process_cpu_seconds"] > 0


def test_a_reused_run_folder_is_emptied_of_metrics_and_states_only(tmp_path: Path) -> None:
    for name in ("counter_123.db", "gauge_livesum_9.db", "worker-0", ".worker-1.77", "notes.txt"):
        (tmp_path / name).write_text("x")
    clear(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    clear(tmp_path / "new")
    assert (tmp_path / "new").is_dir()


def test_each_worker_takes_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert (Settings().cores, Settings().decode_workers) == (16, 16)
    assert (Settings(workers=4).cores, Settings(workers=4).decode_workers) == (4, 4)
    assert (Settings(workers=16).cores, Settings(workers=16).decode_workers) == (1, 2)  # decoding keeps 2 threads
    assert Settings(workers=4, decode_threads=3).decode_workers == 3
    before = torch.get_num_threads()
    try:
        configure_cpu_threads(0, Settings(workers=4).cores)
        assert torch.get_num_threads() == 3
        configure_cpu_threads(0, 1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("workers", [0, 65])
def test_the_worker_count_is_bounded(workers: int) -> None:
    with pytest.raises(ValueError, match="workers"):
        Settings(workers=workers)


def test_model_control_is_refused_with_several_workers(tmp_path: Path) -> None:
    settings = Settings(workers=2, model_store=tmp_path)
    engine = Engine(settings, ModelRegistry(settings))
    try:
        for call in (engine.load_model, engine.unload_model):
            with pytest.raises(Conflict, match="IGCV2_WORKERS=2"):
                asyncio.run(call("igcv2-fashion"))
    finally:
        engine.close()
