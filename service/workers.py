"""Several server processes on one port (``IGCV2_WORKERS`` > 1): N front-ends and one model executor.

One Python process is one GIL: HTTP parsing, multipart, decoding and the inference thread's own
Python take turns on it, which leaves a GPU mostly idle (benchmarks/RESULTS.md: 3-32% busy with one
process on an H200). The supervisor binds the port once, starts the executor (service/executor: the
models, queues, batcher and inference threads) and that many front-ends on the shared socket; the
kernel hands each new connection to a front-end that is accepting. A process that dies is restarted.

A front-end accepts connections once the executor has loaded its models (at the first start; a
front-end replaced later accepts at once). The front-ends' Prometheus values live in files in a private
run folder (prometheus_client's multiprocess mode), the executor's in the executor, and a scrape of any
front-end reports them all. The executor's Unix socket and the ledger's lock file live there too.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.config import Settings

log = logging.getLogger("igcv2.workers")

RUN_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it: metrics go to files in the run folder
PR_SET_PDEATHSIG = 1
RESTART_DELAY_S = (1.0, 60.0)  # after a worker dies: first delay, doubled while it keeps dying young
YOUNG_S = 60.0  # a worker that dies before it is ready or this soon after is failing to start, not crashing once
GIVE_UP_AFTER = 5  # young deaths of one worker in a row: stop, so the orchestrator sees a failed service
EXECUTOR = -1  # the executor's index among the supervisor's children (front-ends are 0..N-1)


def name_of(index: int) -> str:
    return "the executor" if index == EXECUTOR else f"worker {index}"


def ready_marker(run_dir: Path, pid: int) -> Path:
    """The empty file by which worker ``pid`` tells the supervisor that it has warmed up and now accepts
    connections. Not ``*.db``: the metrics collector reads only those."""
    return run_dir / f"ready_{pid}"


@dataclass(frozen=True)
class Worker:
    """This process is worker ``index`` (a front-end, or the executor) of the supervisor ``supervisor``."""

    index: int
    supervisor: int
    run_dir: Path
    replacement: bool = False  # started in place of a worker that died

    def announce_ready(self) -> None:
        """Its startup is over: from now on a death is a crash, not a failure to start (loading, compiling and
        warming up can take minutes, so the supervisor cannot tell one from the other by age alone)."""
        ready_marker(self.run_dir, os.getpid()).touch()


@dataclass(frozen=True)
class Death:
    """How a worker ended: its exit code, seconds since its start, and since it became ready (None: never)."""

    code: int
    age_s: float
    served_s: float | None

    @property
    def young(self) -> bool:
        """Failing to start (dying before it was ready, or soon after), not a one-off crash."""
        return self.served_s is None or self.served_s < YOUNG_S

    def __str__(self) -> str:
        if self.served_s is None:
            return f"exited with {self.code} while starting, {self.age_s:.0f}s after its start"
        return f"exited with {self.code} {self.served_s:.0f}s after it became ready"


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def dying(pid: int) -> bool:
    """Dead or being killed, though not reapable yet: a worker's threads and memory take up to a second to go
    after a SIGKILL. Its main thread has exited (a zombie), or a SIGKILL is pending for the process (Linux
    sets that the moment the signal is sent and clears it only when the process is reaped)."""
    try:
        status = dict(
            line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line
        )
    except OSError:
        return False
    return status["State"].startswith("Z") or bool(int(status["ShdPnd"], 16) & 1 << (signal.SIGKILL - 1))


class ServiceProcesses(Collector):
    """Memory and CPU of the supervisor and all its workers, where one process would report its own
    (``process_resident_memory_bytes``, ``process_cpu_seconds_total``: the dashboard's panels).

    CPU includes the workers that have died (the supervisor's reaped children), so the counter never
    goes back when one is replaced."""

    def __init__(self, supervisor: int) -> None:
        self.supervisor = supervisor
        self.tick, self.page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")

    def collect(self) -> Iterator[Metric]:
        rss = cpu = 0.0
        try:
            children = Path(f"/proc/{self.supervisor}/task/{self.supervisor}/children").read_text().split()
        except OSError:
            children = []
        for pid in [self.supervisor, *map(int, children)]:
            fields = proc_stat(pid)
            if fields is None:
                continue
            cpu += (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime
            if pid == self.supervisor:  # cutime, cstime: its reaped children, the workers that died
                cpu += (int(fields[13]) + int(fields[14])) / self.tick
            rss += int(fields[21]) * self.page
        yield GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory of the supervisor and its workers, summed.", rss
        )
        yield CounterMetricFamily(
            "process_cpu_seconds", "CPU time of the supervisor and its workers, the dead ones included.", cpu
        )


def metrics_registry(worker: Worker) -> CollectorRegistry:
    """What a scrape of any worker answers: every worker's metrics, from the run folder's files."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, str(worker.run_dir))
    registry.register(ServiceProcesses(worker.supervisor))
    return registry


class merged_with:
    """``registry``'s metrics and the executor's ``families`` (:func:`service.executor.server.exported_metrics`)
    as one scrape: a family both report (requests refused at a front-end's door and in the executor) is one
    family whose samples add up."""

    def __init__(self, registry: Collector, families: list[tuple[str, str, str, list[tuple[str, dict, float]]]]):
        self.registry = registry
        self.families = families

    def collect(self) -> Iterator[Metric]:
        merged = {family.name: family for family in self.registry.collect()}
        for name, kind, documentation, samples in self.families:
            family = merged.setdefault(name, Metric(name, documentation, kind))
            index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(family.samples)}
            for sample_name, labels, value in samples:
                key = (sample_name, tuple(sorted(labels.items())))
                if key in index:
                    old = family.samples[index[key]]
                    family.samples[index[key]] = old._replace(value=old.value + value)
                else:
                    family.add_sample(sample_name, labels, value)
        yield from merged.values()


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
    SIGTERM/SIGINT close the port, pass SIGTERM on, and exit 0 once every worker has drained."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = threading.Event()
        self.children: dict[int, tuple[subprocess.Popen, float]] = {}  # index -> (process, started)
        self.ready_at: dict[int, float] = {}  # index -> when its current process became ready
        self.restart_at: dict[int, float] = {}
        self.young_deaths: dict[int, int] = {}
        self.failed = False
        # Private (0700, new): nobody else's files are summed, and nothing of ours is left to clear.
        self.run_dir = Path(tempfile.mkdtemp(prefix="igcv2-workers-"))

    def run(self) -> int:
        s = self.settings
        try:
            family = socket.AF_INET6 if ":" in s.host else socket.AF_INET  # as uvicorn binds
            sock = socket.create_server((s.host, s.port), family=family, backlog=2048)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", s.host, s.port, exc)
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        log.info(
            "listening on http://%s:%d with %d front-end workers and a model executor (pid %d; run folder %s)",
            s.host,
            sock.getsockname()[1],
            s.workers,
            os.getpid(),
            self.run_dir,
        )
        env = {**os.environ, RUN_DIR: str(self.run_dir)}
        try:
            for index in (EXECUTOR, *range(s.workers)):
                self.spawn(index, sock, env)
            while not self.stopping.wait(0.2):
                self.tend(sock, env)
            sock.close()  # new connections are refused at once, not queued for workers that are leaving
            return self.stop()
        finally:
            sock.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def spawn(self, index: int, sock: socket.socket, env: dict[str, str]) -> None:
        replacement = int(index in self.children)
        if index == EXECUTOR:  # its metrics stay in the process (the front-ends' scrapes ask it): no RUN_DIR
            role = ["--executor", f"{os.getpid()}:{replacement}:{self.run_dir}"]
            env, fds = {k: v for k, v in env.items() if k != RUN_DIR}, ()
        else:
            role, fds = ["--worker", f"{index}:{sock.fileno()}:{os.getpid()}:{replacement}"], (sock.fileno(),)
        process = subprocess.Popen([sys.executable, "-m", "service", *role], env=env, pass_fds=fds)
        self.children[index] = (process, time.monotonic())
        log.info("%s started (pid %d)", name_of(index), process.pid)

    def tend(self, sock: socket.socket, env: dict[str, str]) -> None:
        """Restart dead workers: at once after a crash, later and later while one dies young, and
        give up (exit 1) when one keeps dying young."""
        now = time.monotonic()
        for index, (process, _) in list(self.children.items()):
            if index in self.restart_at:
                if now >= self.restart_at[index]:
                    del self.restart_at[index]
                    self.spawn(index, sock, env)
                continue
            death = self.reap(index, now)
            if death is None:
                continue
            self.young_deaths[index] = self.young_deaths.get(index, 0) + 1 if death.young else 0
            if self.young_deaths[index] >= GIVE_UP_AFTER:
                log.error(
                    "%s (pid %d) %s: %d deaths in a row before it was ready or within %.0fs of it; "
                    "stopping the service",
                    name_of(index),
                    process.pid,
                    death,
                    GIVE_UP_AFTER,
                    YOUNG_S,
                )
                del self.children[index]  # reaped, and not to be signalled or reaped again by stop()
                self.failed = True
                self.stopping.set()
                return
            lo, hi = RESTART_DELAY_S
            delay = min(hi, lo * 2 ** max(0, self.young_deaths[index] - 1))
            self.restart_at[index] = now + delay
            log.error("%s (pid %d) %s; restarting it in %.0fs", name_of(index), process.pid, death, delay)

    def reap(self, index: int, now: float) -> Death | None:
        """How worker ``index`` died, its run files then cleared; None while it lives (noting when it is ready)."""
        process, started = self.children[index]
        code = process.poll()  # before the marker: a dead worker's marker is final
        marker = ready_marker(self.run_dir, process.pid)
        if index not in self.ready_at and marker.exists():
            self.ready_at[index] = now
        if code is None:
            return None
        multiprocess.mark_process_dead(process.pid, str(self.run_dir))  # live gauges go; counters stay
        marker.unlink(missing_ok=True)  # its pid may come back as another worker's
        ready_at = self.ready_at.pop(index, None)
        return Death(code, now - started, None if ready_at is None else now - ready_at)

    def stop(self) -> int:
        """SIGTERM to every live front-end, then, once they have drained, to the executor (whatever they accepted
        needs it). Each drains within the shutdown timeout (its own bound). Exit 1 if one did not drain, not for one
        that died before the stop: that is a crash, logged as such."""
        frontends = [index for index in self.children if index != EXECUTOR]
        failed = self._stop(frontends) + self._stop([EXECUTOR] if EXECUTOR in self.children else [])
        if failed:
            log.error("workers that did not exit cleanly (pid, code): %s", failed)
        return 1 if failed or self.failed else 0

    def _stop(self, indices: list[int]) -> list[tuple[int, int | None]]:
        """Stop these children; returns (pid, exit code) of those that did not drain."""
        deadline = time.monotonic() + self.settings.shutdown_timeout_s + 30
        running: list[subprocess.Popen] = []
        gone: list[int] = []  # dead, or dying of a SIGKILL, since the last tend(): crashes, not drains
        for index in indices:
            process = self.children[index][0]
            if index in self.restart_at:  # died earlier, reaped by tend()
                continue
            if process.poll() is None and not dying(process.pid):
                running.append(process)
            else:
                gone.append(index)
        log.info("stopping: SIGTERM to %s", ", ".join(f"pid {p.pid}" for p in running) or "nobody")
        for process in running:
            process.send_signal(signal.SIGTERM)
        failed: list[tuple[int, int | None]] = []
        for index in gone:  # after the others were signalled: a SIGKILLed worker can take a second to go
            process = self.children[index][0]
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
            death = self.reap(index, time.monotonic())
            if death is None:
                log.error("%s (pid %d) was being killed and did not go in time", name_of(index), process.pid)
                failed.append((process.pid, None))
            else:
                log.error("%s (pid %d) %s; not restarted: stopping", name_of(index), process.pid, death)
        for process in running:
            try:
                code = process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("pid %d did not exit in time: killed", process.pid)
                process.kill()
                code = process.wait()
            # A worker still starting has no handler yet: SIGTERM ends it at once, as asked.
            if code not in (0, -signal.SIGTERM):
                failed.append((process.pid, code))
        return failed
