"""Several server processes on one port (``IGCV2_WORKERS`` > 1).

One Python process is one GIL: HTTP parsing, multipart, decoding and the inference thread's own
Python take turns on it, which leaves a GPU mostly idle (benchmarks/RESULTS.md: 1-45% busy with one
process on an H200). The supervisor binds the port once and starts that many copies of the service
on the shared socket; the kernel hands each new connection to whichever worker accepts it first.

Every worker loads, compiles and batches its own models. What they share is kept in a run folder:
Prometheus' multiprocess files (so one scrape of any worker sums them all) and one state file per
worker (``worker-<index>``: its pid and whether its models are ready), from which readiness waits
for every worker and the process metrics add up every live worker.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.config import Settings

log = logging.getLogger("igcv2.workers")

RUN_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it: metrics go to files in the run folder
PR_SET_PDEATHSIG = 1
RESTART_DELAY_S = (1.0, 60.0)  # after a worker dies: first delay, doubled while it keeps dying young
YOUNG_S = 60.0  # a worker that lived less than this is failing to start, not a one-off crash


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class WorkerSet:
    """One worker's view of all of them, through their state files in the run folder."""

    def __init__(self, run_dir: Path, index: int, count: int) -> None:
        self.run_dir, self.index, self.count = run_dir, index, count

    def _state_file(self, index: int) -> Path:
        return self.run_dir / f"worker-{index}"

    def announce(self, ready: bool) -> None:
        """Record this worker's pid and readiness (atomically: readers never see half a file)."""
        tmp = self.run_dir / f".worker-{self.index}.{os.getpid()}"
        tmp.write_text(f"{os.getpid()} {'ready' if ready else 'starting'}\n")
        tmp.replace(self._state_file(self.index))

    def _states(self) -> Iterator[tuple[int, int | None, bool]]:
        """(index, live pid or None, ready) for every worker."""
        for index in range(self.count):
            try:
                pid_text, state = self._state_file(index).read_text().split()
                pid = int(pid_text)
            except (OSError, ValueError):
                yield index, None, False
                continue
            yield (index, pid, state == "ready") if alive(pid) else (index, None, False)

    def waiting(self) -> list[str]:
        """The other workers readiness still waits for, as ``worker N starting``."""
        return [f"worker {index} {'starting' if pid else 'not running'}"
                for index, pid, ready in self._states() if index != self.index and not ready]

    def pids(self) -> list[int]:
        return [pid for _, pid, _ in self._states() if pid is not None]


class WorkerProcesses(Collector):
    """The memory and CPU of every live worker, summed, where one process would report its own
    (``process_resident_memory_bytes``, ``process_cpu_seconds_total``: the dashboard's panels)."""

    def __init__(self, workers: WorkerSet) -> None:
        self.workers = workers
        self.tick, self.page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")

    def collect(self) -> Iterator[Metric]:
        rss = cpu = 0.0
        for pid in self.workers.pids():
            try:  # fields after the command name: state, ..., utime (12th), stime (13th), ..., rss (22nd)
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone since its state file was read, or no /proc
                continue
            cpu += (int(fields[11]) + int(fields[12])) / self.tick
            rss += int(fields[21]) * self.page
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of every worker, summed.", rss)
        yield CounterMetricFamily("process_cpu_seconds", "CPU time of every live worker, summed.", cpu)


def metrics_registry(workers: WorkerSet) -> CollectorRegistry:
    """What a scrape of any worker answers: every worker's metrics, from the run folder's files."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, str(workers.run_dir))
    registry.register(WorkerProcesses(workers))
    return registry


def follow_parent(parent: int) -> None:
    """Get SIGTERM (a graceful drain) when the supervisor dies, so no orphan keeps the port (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: an orphan lives on until stopped
        return
    if os.getppid() != parent:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Start ``settings.workers`` workers on one listening socket, restart any that dies, and on
    SIGTERM/SIGINT pass SIGTERM on, wait for every worker to drain, and exit 0 if all did."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = threading.Event()
        self.children: dict[int, tuple[subprocess.Popen, float]] = {}  # index -> (process, started)
        self.restart_at: dict[int, float] = {}
        self.delay: dict[int, float] = {}
        given = os.environ.get(RUN_DIR)  # an operator's own folder is emptied, not removed
        self.run_dir, self.own_dir = Path(given or tempfile.mkdtemp(prefix="igcv2-workers-")), not given

    def run(self) -> int:
        clear(self.run_dir)
        s = self.settings
        try:
            family = socket.AF_INET6 if ":" in s.host else socket.AF_INET  # as uvicorn binds
            sock = socket.create_server((s.host, s.port), family=family, backlog=2048)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", s.host, s.port, exc)
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        log.info("listening on http://%s:%d with %d workers (pid %d; run folder %s)",
                 s.host, sock.getsockname()[1], s.workers, os.getpid(), self.run_dir)
        env = {**os.environ, RUN_DIR: str(self.run_dir)}
        try:
            for index in range(s.workers):
                self.spawn(index, sock, env)
            while not self.stopping.wait(0.2):
                self.tend(sock, env)
            return self.stop()
        finally:
            sock.close()
            if self.own_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    def spawn(self, index: int, sock: socket.socket, env: dict[str, str]) -> None:
        command = [sys.executable, "-m", "service", "--worker", f"{index}:{sock.fileno()}:{os.getpid()}"]
        process = subprocess.Popen(command, env=env, pass_fds=(sock.fileno(),))
        self.children[index] = (process, time.monotonic())
        log.info("worker %d started (pid %d)", index, process.pid)

    def tend(self, sock: socket.socket, env: dict[str, str]) -> None:
        """Restart dead workers: at once after a crash, later and later while one dies young."""
        now = time.monotonic()
        for index, (process, started) in list(self.children.items()):
            if index in self.restart_at:
                if now >= self.restart_at[index]:
                    del self.restart_at[index]
                    self.spawn(index, sock, env)
                continue
            code = process.poll()
            if code is None:
                continue
            multiprocess.mark_process_dead(process.pid, str(self.run_dir))  # live gauges go; counters stay
            lo, hi = RESTART_DELAY_S
            delay = min(hi, self.delay.get(index, lo / 2) * 2) if now - started < YOUNG_S else lo
            self.delay[index], self.restart_at[index] = delay, now + delay
            log.error("worker %d (pid %d) exited with %s after %.0fs; restarting it in %.0fs",
                      index, process.pid, code, now - started, delay)

    def stop(self) -> int:
        """SIGTERM to every worker; each drains within the shutdown timeout (its own bound)."""
        running = [p for index, (p, _) in self.children.items() if index not in self.restart_at]
        log.info("stopping: SIGTERM to %d workers", len(running))
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout_s + 30
        codes = []
        for process in running:
            try:
                codes.append(process.wait(max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not exit in time: killed", process.pid)
                process.kill()
                codes.append(process.wait())
        for process in running:
            multiprocess.mark_process_dead(process.pid, str(self.run_dir))
        failed = [(p.pid, c) for p, c in zip(running, codes, strict=True) if c != 0]
        if failed:
            log.error("workers that did not exit cleanly (pid, code): %s", failed)
        return 1 if failed else 0


def clear(run_dir: Path) -> None:
    """Empty a reused run folder: stale metrics would be summed, stale state files read."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for path in run_dir.iterdir():
        if path.suffix == ".db" or path.name.startswith(("worker-", ".worker-")):
            path.unlink(missing_ok=True)
