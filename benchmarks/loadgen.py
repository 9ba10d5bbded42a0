"""HTTP load from Debian's ``hey``: closed-loop streams, paced (open-loop) streams, parsed results.

Why hey: it is a compiled Go client, so on 2 cores it takes far less CPU from the server than a
Python client would, and we still measure what it took (``wait4`` rusage of each hey process).

How it is used:
* a *stream* is one hey process sending one prepared body (``-D``) with ``-c`` workers for
  ``-z`` seconds; several streams with different images run side by side, so the server sees
  several real images, not one;
* CSV output (``-o csv``) gives one row per answered request (latency, status code, start
  offset): the closed-loop sweep and the open-loop runs use it for exact percentiles. hey leaves
  transport errors out of its CSV, so those phases cross-check the row count against the
  server's own request counter;
* summary output lists every status code *and* every transport error: overload and soak, where
  "every request was answered" is the point, use it;
* ``-q`` paces each worker (requests/s per worker). hey's workers start together, so paced
  workers fire in bursts; :func:`paced_streams` splits them over staggered processes to make the
  arrivals close to even (see the JSON's ``pacing`` entry for the resulting burst size).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HEY = shutil.which("hey")
_TOTAL = re.compile(r"Total:\s+([\d.]+) secs")
_PCT = re.compile(r"(\d+)% in ([\d.]+) secs")
_CODE = re.compile(r"\[(\d+)\]\s+(\d+) responses")
_ERROR = re.compile(r"\[(\d+)\]\s+(.*)")


@dataclass(frozen=True)
class Body:
    """One request shape: body file, content type, query string, images per request."""

    name: str
    path: Path
    content_type: str
    images: int
    query: str = ""


@dataclass(frozen=True)
class Stream:
    """One hey process: ``workers`` concurrent closed loops, optionally paced at ``rate`` req/s each."""

    body: Body
    workers: int
    duration_s: float
    rate: float | None = None
    csv: bool = True
    timeout_s: int = 60
    start_delay_s: float = 0.0


@dataclass
class StreamResult:
    stream: Stream
    latency_s: np.ndarray  # CSV mode: one entry per answered request
    status: np.ndarray
    offset_s: np.ndarray
    codes: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # summary mode only (CSV drops them)
    percentiles_s: dict[int, float] = field(default_factory=dict)  # summary mode: hey's own percentiles
    total_s: float = 0.0  # hey's run time (summary) or the span of the CSV rows
    cpu_s: float = 0.0  # hey's own user + system CPU
    wall_s: float = 0.0
    returncode: int = 0

    @property
    def answered(self) -> int:
        return sum(self.codes.values())


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal positive integers (fewer parts if total is small)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def closed_streams(
    bodies: list[Body], concurrency: int, duration_s: float, max_streams: int, timeout_s: int, csv: bool = True
) -> list[Stream]:
    """``concurrency`` closed-loop workers spread over up to ``max_streams`` bodies (one process each)."""
    shares = split(concurrency, min(max_streams, len(bodies)))
    return [Stream(bodies[i % len(bodies)], c, duration_s, None, csv, timeout_s) for i, c in enumerate(shares)]


@dataclass(frozen=True)
class Pacing:
    """How paced load is laid out over hey workers and staggered processes."""

    rate: float  # nominal requests/s, all workers together (workers / worker_interval_s)
    workers: int
    streams: int
    worker_interval_s: float  # each worker sends one request per interval (hey's first one after one interval)
    burst: float  # requests that start together (one process's workers)
    burst_period_s: float  # time between bursts across processes

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def paced_streams(
    bodies: list[Body],
    workers: int,
    worker_interval_s: float,
    duration_s: float,
    streams: int,
    timeout_s: int,
    csv: bool = True,
) -> tuple[list[Stream], Pacing]:
    """``workers`` hey workers that each send one request every ``worker_interval_s`` (``-q``).

    A worker whose answer takes longer than its interval skips ticks, so the offered rate sags: the
    caller sizes the interval above the expected latency and reports offered vs achieved. hey's
    workers of one process fire together (and first fire one interval after the start), so the
    processes start staggered by interval/streams. ``duration_s`` counts from the first tick.
    """
    shares = split(max(workers, 1), streams)
    out = [
        Stream(
            bodies[i % len(bodies)],
            w,
            worker_interval_s + duration_s,
            1.0 / worker_interval_s,
            csv,
            timeout_s,
            i * worker_interval_s / len(shares),
        )
        for i, w in enumerate(shares)
    ]
    total = sum(shares)
    pacing = Pacing(
        total / worker_interval_s,
        total,
        len(shares),
        worker_interval_s,
        total / len(shares),
        worker_interval_s / len(shares),
    )
    return out, pacing


def open_loop_workers(rate: float, min_interval_s: float) -> tuple[int, float]:
    """Workers and interval giving exactly ``rate`` req/s with each worker's interval >= ``min_interval_s``
    (as few workers as that allows: at low rates more workers would only stretch the interval)."""
    workers = max(1, math.ceil(rate * min_interval_s))
    return workers, workers / rate


class HeyRun:
    """Several hey processes started together (each after its ``start_delay_s``) and waited for."""

    def __init__(self, url: str, streams: list[Stream], out_dir: Path, tag: str) -> None:
        if HEY is None:
            raise RuntimeError("hey is not installed (Debian package 'hey'; `make test` installs it)")
        self.hey = HEY
        self.url = url
        self.streams = sorted(streams, key=lambda s: s.start_delay_s)
        self.out_dir = out_dir
        self.tag = tag
        self.procs: list[subprocess.Popen[bytes]] = []
        self.outputs: list[Path] = []
        self.started_at: list[float] = []

    def command(self, stream: Stream) -> list[str]:
        cmd = [
            self.hey,
            "-z",
            f"{round(stream.duration_s * 1000)}ms",
            "-c",
            str(stream.workers),
            "-m",
            "POST",
            "-T",
            stream.body.content_type,
            "-D",
            str(stream.body.path),
            "-t",
            str(stream.timeout_s),
        ]
        if stream.rate:
            cmd += ["-q", f"{stream.rate:.6f}"]
        if stream.csv:
            cmd += ["-o", "csv"]
        query = f"?{stream.body.query}" if stream.body.query else ""
        return [*cmd, f"{self.url}/classify{query}"]

    def start(self) -> HeyRun:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        for i, stream in enumerate(self.streams):
            pause = t0 + stream.start_delay_s - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            out = self.out_dir / f"{self.tag}-{i}.{'csv' if stream.csv else 'txt'}"
            with open(out, "wb") as fh:
                self.procs.append(subprocess.Popen(self.command(stream), stdout=fh, stderr=subprocess.STDOUT))
            self.outputs.append(out)
            self.started_at.append(time.monotonic())
        return self

    def kill(self) -> None:
        """Stop any hey still running (on an error in the caller; they are bounded by -z anyway)."""
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
                proc.wait()

    def wait(self, grace_s: float = 30.0) -> list[StreamResult]:
        """Reap every process (killing any that overrun its bound) and parse what it wrote."""
        results: list[StreamResult | None] = [None] * len(self.procs)
        pending = set(range(len(self.procs)))
        try:
            self._reap(pending, results, grace_s)
        finally:
            self.kill()  # interrupted: leave no hey behind
        return [r for r in results if r is not None]

    def _reap(self, pending: set[int], results: list[StreamResult | None], grace_s: float) -> None:
        while pending:
            for i in list(pending):
                proc, stream = self.procs[i], self.streams[i]
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid == 0:
                    limit = stream.duration_s + stream.timeout_s + grace_s
                    if time.monotonic() - self.started_at[i] > limit:
                        proc.send_signal(signal.SIGKILL)
                    continue
                proc.returncode = os.waitstatus_to_exitcode(status)
                wall = time.monotonic() - self.started_at[i]
                result = parse(stream, self.outputs[i])
                result.cpu_s, result.wall_s, result.returncode = usage.ru_utime + usage.ru_stime, wall, proc.returncode
                results[i] = result
                pending.discard(i)
            if pending:
                time.sleep(0.02)


def parse(stream: Stream, path: Path) -> StreamResult:
    text = path.read_text(errors="replace")
    if stream.csv:
        rows = [line.split(",") for line in text.splitlines()[1:] if line and line[0].isdigit()]
        table = np.array([[float(r[0]), float(r[6]), float(r[7])] for r in rows if len(r) >= 8]).reshape(-1, 3)
        status = table[:, 1].astype(int)
        codes: dict[int, int] = {}
        for code, count in zip(*np.unique(status, return_counts=True), strict=True):
            codes[int(code)] = int(count)
        span = float((table[:, 2] + table[:, 0]).max()) if len(table) else 0.0
        return StreamResult(stream, table[:, 0], status, table[:, 2], codes, total_s=span)
    head, _, error_part = text.partition("Error distribution:")
    codes = {int(c): int(n) for c, n in _CODE.findall(head)}
    errors = {msg.strip(): int(n) for n, msg in _ERROR.findall(error_part)}
    percentiles = {int(p): float(v) for p, v in _PCT.findall(head) if int(p) > 0}
    total = _TOTAL.search(head)
    empty = np.zeros(0)
    return StreamResult(
        stream, empty, empty.astype(int), empty, codes, errors, percentiles, float(total.group(1)) if total else 0.0
    )


def run(url: str, streams: list[Stream], out_dir: Path, tag: str) -> list[StreamResult]:
    hey = HeyRun(url, streams, out_dir, tag)
    try:
        return hey.start().wait()
    finally:
        hey.kill()


def hey_version() -> str | None:
    """The installed hey's Debian version (hey itself has no --version)."""
    if HEY is None:
        return None
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "hey"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
