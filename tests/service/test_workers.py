"""service/workers.py in parts: summed process metrics, merged scrapes, the supervisor's restarts and stop,
the run folder, each process's share of the cores. The real supervisor runs in tests/e2e/test_workers.py."""

from __future__ import annotations

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
from prometheus_client import CollectorRegistry, Counter, generate_latest

from service import workers as workers_module
from service.config import Settings
from service.runtime import configure_cpu_threads
from service.workers import (
    EXECUTOR,
    GIVE_UP_AFTER,
    YOUNG_S,
    ServiceProcesses,
    Supervisor,
    dying,
    merged_with,
    ready_marker,
)


def test_process_metrics_add_up_the_supervisor_and_its_workers_the_dead_ones_included() -> None:
    """This test process plays the supervisor: its children are the workers."""
    burner = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"]
    )
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


def supervisor(workers: int = 1, age_s: float = 0.0) -> Supervisor:
    """A supervisor whose spawned workers are fakes, started ``age_s`` ago, that died (exit 1) while starting."""
    sup, pids = Supervisor(Settings(workers=workers)), itertools.count(1000)
    sup.spawn = lambda index, sock, env: sup.children.__setitem__(  # type: ignore[method-assign]
        index, (FakeWorker(next(pids), code=1), time.monotonic() - age_s)
    )
    return sup


def serving_since(sup: Supervisor, index: int, seconds_ago: float) -> FakeWorker:
    """Worker ``index``, alive, that told the supervisor it was ready ``seconds_ago``."""
    worker = FakeWorker(900 + index)
    sup.children[index] = (worker, time.monotonic() - seconds_ago - 30)
    sup.restart_at.pop(index, None)
    ready_marker(sup.run_dir, worker.pid).touch()
    sup.tend(None, {})  # the supervisor sees the marker now...
    sup.ready_at[index] -= seconds_ago  # ...as if it had seen it then
    return worker


def test_a_worker_that_keeps_dying_young_is_restarted_later_and_later_then_the_service_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup = supervisor()
    serving_since(sup, 0, 3600).code = -9  # a worker that has served for an hour crashes once
    sup.tend(None, {})
    assert sup.restart_at[0] - time.monotonic() == pytest.approx(1.0, abs=0.1) and sup.young_deaths[0] == 0
    assert not list(sup.run_dir.iterdir()), "its ready marker goes with it"
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
    assert "5 deaths in a row" in caplog.text and "not restarted" not in caplog.text  # reaped once
    shutil.rmtree(sup.run_dir)


def test_a_worker_that_dies_before_it_is_ready_dies_young_however_long_its_warm_up_took() -> None:
    """Loading, compiling and warming up can take minutes: its age does not tell a failure to start."""
    sup, deaths = supervisor(age_s=10 * YOUNG_S), 0
    sup.spawn(0, None, {})
    while not sup.stopping.is_set() and deaths < 10:
        sup.tend(None, {})  # finds it dead
        deaths += 1
        sup.restart_at[0] = 0.0  # due: the next tend respawns it
        sup.tend(None, {})
    assert deaths == GIVE_UP_AFTER and sup.failed
    shutil.rmtree(sup.run_dir)


def test_a_worker_that_dies_soon_after_it_was_ready_dies_young() -> None:
    """Soon after readiness, not after its start: a long warm-up does not hide a worker that crashes at once."""
    sup = supervisor()
    serving_since(sup, 0, YOUNG_S / 2).code = 1  # started YOUNG_S / 2 + 30 s ago
    sup.tend(None, {})
    assert sup.young_deaths[0] == 1
    serving_since(sup, 0, 2 * YOUNG_S).code = 1
    sup.tend(None, {})
    assert sup.young_deaths[0] == 0
    shutil.rmtree(sup.run_dir)


def test_stopping_counts_a_worker_ended_by_its_sigterm_as_clean_and_any_other_failure_not() -> None:
    sup = supervisor(workers=3)
    starting, drained, broken = FakeWorker(1, on_term=-signal.SIGTERM), FakeWorker(2), FakeWorker(3, on_term=1)
    sup.children = {0: (starting, 0.0), 1: (drained, 0.0), 2: (broken, 0.0)}
    assert sup.stop() == 1
    assert starting.signals == drained.signals == broken.signals == [signal.SIGTERM]
    sup.children = {0: (FakeWorker(1, on_term=-signal.SIGTERM), 0.0), 1: (FakeWorker(2), 0.0)}
    assert sup.stop() == 0
    shutil.rmtree(sup.run_dir)


def test_the_executor_is_stopped_after_every_front_end_has_drained() -> None:
    """What the front-ends accepted needs the executor to be answered."""
    order: list[str] = []

    class Recorded(FakeWorker):
        def __init__(self, pid: int, name: str) -> None:
            super().__init__(pid)
            self.name = name

        def send_signal(self, sig: int) -> None:
            order.append(f"SIGTERM {self.name}")
            super().send_signal(sig)

        def wait(self, timeout: float | None = None) -> int:
            order.append(f"drained {self.name}")
            return super().wait(timeout)

    sup = supervisor(workers=2)
    sup.children = {EXECUTOR: (Recorded(1, "executor"), 0.0), 0: (Recorded(2, "0"), 0.0), 1: (Recorded(3, "1"), 0.0)}
    assert sup.stop() == 0
    assert order == ["SIGTERM 0", "SIGTERM 1", "drained 0", "drained 1", "SIGTERM executor", "drained executor"]
    shutil.rmtree(sup.run_dir)


def test_a_scrape_merges_the_executors_families_into_the_front_ends() -> None:
    """A family both report (refusals at a front-end's door, deadlines in the executor) is one family."""
    local = CollectorRegistry()
    Counter("igcv2_rejected_images", "Refused.", ["reason"], registry=local).labels(reason="queue_full").inc(3)
    executor = [
        ("igcv2_rejected_images", "counter", "Refused.", [
            ("igcv2_rejected_images_total", {"reason": "queue_full"}, 2.0),
            ("igcv2_rejected_images_total", {"reason": "deadline"}, 5.0),
        ]),
        ("igcv2_model_ready", "gauge", "Ready.", [("igcv2_model_ready", {"model": "m"}, 1.0)]),
    ]  # fmt: skip
    text = generate_latest(merged_with(local, executor)).decode()
    assert text.count("# TYPE igcv2_rejected_images_total counter") == 1
    assert 'igcv2_rejected_images_total{reason="queue_full"} 5.0' in text
    assert 'igcv2_rejected_images_total{reason="deadline"} 5.0' in text
    assert 'igcv2_model_ready{model="m"} 1.0' in text


def test_a_worker_that_died_just_before_the_stop_is_a_crash_not_a_failed_drain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It died before the supervisor's last look (tend), then SIGTERM came: the others' drain decides."""
    sup = supervisor(workers=2)
    crashed, draining = FakeWorker(4, code=-signal.SIGKILL), FakeWorker(5)
    sup.children = {0: (crashed, time.monotonic() - 10), 1: (draining, 0.0)}
    assert sup.stop() == 0
    assert crashed.signals == [] and draining.signals == [signal.SIGTERM]
    assert "worker 0 (pid 4) exited with -9 while starting, 10s after its start; not restarted" in caplog.text
    assert "did not exit cleanly" not in caplog.text
    shutil.rmtree(sup.run_dir)


def test_a_worker_sent_sigkill_is_dying_from_that_moment_until_it_is_reaped(caplog: pytest.LogCaptureFixture) -> None:
    """Its threads and memory can take a second to go: until then it cannot be reaped, but must not be
    signalled and judged as a worker that failed to drain."""
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    exited = subprocess.Popen([sys.executable, "-c", ""])
    try:
        assert not dying(worker.pid)
        os.kill(worker.pid, signal.SIGKILL)
        assert dying(worker.pid)
        while not dying(exited.pid):  # a zombie, not reaped
            time.sleep(0.01)
        sup = supervisor(workers=2)
        sup.children = {0: (worker, time.monotonic()), 1: (exited, time.monotonic())}
        assert sup.stop() == 0
        assert f"(pid {worker.pid}) exited with -9 while starting" in caplog.text
        assert f"(pid {exited.pid}) exited with 0 while starting" in caplog.text
        shutil.rmtree(sup.run_dir)
    finally:
        worker.kill()
        worker.wait()


def test_a_worker_slow_to_die_does_not_hold_back_the_others_sigterm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGKILLed worker (a GPU context to tear down, say) is waited for only after the live ones
    were told to drain, so their drain keeps its whole time."""
    events: list[str] = []

    class SlowToDie(FakeWorker):
        def wait(self, timeout: float | None = None) -> int:
            events.append("waited for the dying one")
            self.code = -signal.SIGKILL
            return self.code

    class Draining(FakeWorker):
        def send_signal(self, sig: int) -> None:
            events.append("SIGTERM to the live one")
            super().send_signal(sig)

    slow, live = SlowToDie(6), Draining(7)
    monkeypatch.setattr(workers_module, "dying", lambda pid: pid == slow.pid)
    sup = supervisor(workers=2)
    sup.children = {0: (slow, time.monotonic()), 1: (live, time.monotonic())}
    assert sup.stop() == 0
    assert events == ["SIGTERM to the live one", "waited for the dying one"] and slow.signals == []
    shutil.rmtree(sup.run_dir)


def test_the_run_folder_is_private_and_new() -> None:
    first, second = Supervisor(Settings(workers=2)), Supervisor(Settings(workers=2))
    try:
        assert first.run_dir != second.run_dir and not list(first.run_dir.iterdir())
        assert first.run_dir.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(first.run_dir)
        shutil.rmtree(second.run_dir)


def test_each_front_end_takes_its_share_of_the_cores_and_the_executor_what_their_loops_leave() -> None:
    assert (Settings(cpus=16).cores, Settings(cpus=16).decode_workers) == (16, 16)
    assert (Settings(cpus=16, workers=4).cores, Settings(cpus=16, workers=4).decode_workers) == (4, 4)
    one_each = Settings(cpus=16, workers=16)
    assert (one_each.cores, one_each.decode_workers) == (1, 2)  # decoding keeps 2 threads
    assert Settings(cpus=16, workers=4, decode_threads=3).decode_workers == 3
    before = torch.get_num_threads()
    try:
        configure_cpu_threads(Settings(cpus=16))
        assert torch.get_num_threads() == 15, "one process: all cores but the event loop's"
        configure_cpu_threads(Settings(cpus=16, workers=4))  # as python -m service --executor does
        assert torch.get_num_threads() == 12, "the executor: a core for each front-end's loop"
        configure_cpu_threads(Settings(cpus=1))
        assert torch.get_num_threads() == 1
        configure_cpu_threads(Settings(cpus=16, cpu_threads=3))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("workers", [0, 65])
def test_the_worker_count_is_bounded(workers: int) -> None:
    with pytest.raises(ValueError, match="workers"):
        Settings(workers=workers)
