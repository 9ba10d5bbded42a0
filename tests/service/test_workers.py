"""service/workers.py in parts: summed process metrics, the supervisor's restarts and stop, the run
folder, each worker's share of the cores. The real supervisor runs in tests/e2e/test_workers.py."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
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
from service.workers import ServiceProcesses, Supervisor


def test_process_metrics_add_up_the_supervisor_and_its_workers_the_dead_ones_included() -> None:
    """This test process plays the supervisor: its children are the workers."""
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                               "while time.process_time() - t < 0.5: pass"])
    before = {m.name: m.samples[0].value for m in ServiceProcesses(os.getpid()).collect()}
    burner.wait()  # reaped: its CPU moves to this process's children's time, and stays counted
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(60)"])
    try:
        time.sleep(1.0)  # the sleeper has touched its 64 MiB
        after = {m.name: m.samples[0].value for m in ServiceProcesses(os.getpid()).collect()}
    finally:
        sleeper.kill()
        sleeper.wait()
    assert set(after) == {"process_resident_memory_bytes", "process_cpu_seconds"}
    own_rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert after["process_resident_memory_bytes"] - own_rss > 64 << 20
    assert after["process_cpu_seconds"] >= before["process_cpu_seconds"] + 0.4, (before, after)


class FakeWorker:
    """A worker process as the supervisor sees it: a pid, an exit code, what it was sent."""

    def __init__(self, pid: int, code: int | None = None, on_term: int = 0) -> None:
        self.pid, self.code, self.on_term, self.signals = pid, code, on_term, []

    def poll(self) -> int | None:
        return self.code

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        self.code = self.on_term

    def wait(self, timeout: float | None = None) -> int:
        return self.code


def supervisor(workers: int = 1) -> Supervisor:
    """A supervisor whose spawned workers are fakes that have already died (exit 1)."""
    sup, pids = Supervisor(Settings(workers=workers)), itertools.count(1000)
    sup.spawn = lambda index, sock, env: sup.children.__setitem__(  # type: ignore[method-assign]
        index, (FakeWorker(next(pids), code=1), time.monotonic()))
    return sup


def test_a_worker_that_keeps_dying_young_is_restarted_later_and_later_then_the_service_stops() -> None:
    sup = supervisor()
    sup.children[0] = (FakeWorker(999, code=-9), time.monotonic() - 3600)  # an old worker crashes once
    sup.tend(None, {})
    assert sup.restart_at[0] - time.monotonic() == pytest.approx(1.0, abs=0.1) and sup.young_deaths[0] == 0
    delays = []
    for _ in range(10):
        sup.restart_at[0] = 0.0  # due: the next tend respawns it, and the one after finds it dead again
        sup.tend(None, {})
        sup.tend(None, {})
        if sup.stopping.is_set():
            break
        delays.append(round(sup.restart_at[0] - time.monotonic()))
    assert delays == [1, 2, 4, 8]
    assert sup.stopping.is_set() and sup.failed and 0 not in sup.restart_at
    assert sup.stop() == 1
    shutil.rmtree(sup.run_dir)


def test_stopping_counts_a_worker_ended_by_its_sigterm_as_clean_and_any_other_failure_not() -> None:
    sup = supervisor(workers=3)
    starting, drained, broken = FakeWorker(1, on_term=-signal.SIGTERM), FakeWorker(2), FakeWorker(3, on_term=1)
    sup.children = {0: (starting, 0.0), 1: (drained, 0.0), 2: (broken, 0.0)}
    assert sup.stop() == 1
    assert starting.signals == drained.signals == broken.signals == [signal.SIGTERM]
    sup.children = {0: (FakeWorker(1, on_term=-signal.SIGTERM), 0.0), 1: (FakeWorker(2), 0.0)}
    assert sup.stop() == 0
    dead_before = FakeWorker(4, code=-signal.SIGTERM)  # killed by someone else before the stop: not clean
    sup.children = {0: (dead_before, 0.0)}
    assert sup.stop() == 1 and dead_before.signals == []
    shutil.rmtree(sup.run_dir)


def test_the_run_folder_is_private_and_new() -> None:
    first, second = Supervisor(Settings(workers=2)), Supervisor(Settings(workers=2))
    try:
        assert first.run_dir != second.run_dir and not list(first.run_dir.iterdir())
        assert first.run_dir.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(first.run_dir)
        shutil.rmtree(second.run_dir)


def test_each_worker_takes_its_share_of_the_cores() -> None:
    assert (Settings(cpus=16).cores, Settings(cpus=16).decode_workers) == (16, 16)
    assert (Settings(cpus=16, workers=4).cores, Settings(cpus=16, workers=4).decode_workers) == (4, 4)
    one_each = Settings(cpus=16, workers=16)
    assert (one_each.cores, one_each.decode_workers) == (1, 2)  # decoding keeps 2 threads
    assert Settings(cpus=16, workers=4, decode_threads=3).decode_workers == 3
    before = torch.get_num_threads()
    try:
        configure_cpu_threads(0, Settings(cpus=16, workers=4).cores)
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
