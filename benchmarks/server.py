"""The service under test as a child process, and what we read from it while it runs.

The server is the real ``python -m service`` on a free loopback port (never a TestClient), so the
numbers include uvicorn, the HTTP parser and multipart handling. The readings use only the
standard library (urllib, /proc) to keep the orchestrating process light on a 2-core machine.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None, timeout: float = 30.0
) -> tuple[int, dict[str, str], bytes]:
    """One request; HTTP errors are answers too (status, headers, body), not exceptions."""
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@dataclass
class Metrics:
    """One scrape of /metrics: samples by name, each a (labels, value) pair."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Metrics:
        out = cls()
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            match = _SAMPLE.match(line)
            if match is None:
                continue
            name, labels, value = match.groups()
            try:
                number = float(value)
            except ValueError:
                continue
            out.samples.setdefault(name, []).append((dict(_LABEL.findall(labels or "")), number))
        return out

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
        return sum(v for lab, v in self.samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))

    def by_label(self, name: str, key: str, **labels: str) -> dict[str, float]:
        """Samples of ``name`` matching ``labels``, summed per value of label ``key``."""
        out: dict[str, float] = {}
        for lab, v in self.samples.get(name, []):
            if all(lab.get(k) == x for k, x in labels.items()):
                out[lab.get(key, "")] = out.get(lab.get(key, ""), 0.0) + v
        return out


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) and its live descendants (the workers
    of IGCV2_WORKERS > 1), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, IndexError):
        return float("nan")
    own = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return own + sum(cpu for cpu in map(process_cpu_s, children) if not math.isnan(cpu))  # nan: gone meanwhile


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, summed over cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return (total - values[3] - values[4]) / CLK_TCK, total / CLK_TCK


@dataclass
class Reading:
    """The server and the machine at one instant: deltas of two readings describe a phase."""

    t: float
    metrics: Metrics
    server_cpu_s: float
    machine_busy_s: float
    machine_total_s: float


class Service:
    """``python -m service`` on a free loopback port, serving one model from one store."""

    def __init__(
        self, store: Path, model: str, env: Mapping[str, str], log_path: Path, label: str, root: Path = ROOT
    ) -> None:
        """``root``: the checkout whose ``python -m service`` runs (another design, to compare with)."""
        self.root = root
        self.model = model
        self.label = label
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port()
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "IGCV2_HOST": "127.0.0.1",
            "IGCV2_PORT": str(self.port),
            "IGCV2_GRPC_PORT": str(self.grpc_port),
            "IGCV2_MODEL_STORE": str(store),
            "IGCV2_MODELS": model,
            "IGCV2_DEFAULT_MODEL": model,
            "IGCV2_LOG_LEVEL": "warning",
            "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".inductor-cache")),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("service not started")
        return self.process.pid

    def start(self, timeout: float) -> Service:
        """Start and wait until /health/ready is 200 (every bucket compiled and warmed up)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service"], cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if http("GET", self.url + "/health/ready", timeout=2.0)[0] == 200:
                    self.startup_s = time.monotonic() - started
                    return self
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"{self.label} server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful: queued work finishes), then SIGKILL if it does not exit in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def scrape(self, timeout: float = 10.0) -> Metrics:
        status, _, body = http("GET", self.url + "/metrics", timeout=timeout)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return Metrics.parse(body.decode())

    def reading(self) -> Reading:
        metrics = self.scrape()
        busy, total = machine_cpu_s()
        return Reading(time.monotonic(), metrics, process_cpu_s(self.pid), busy, total)

    def describe(self) -> dict[str, Any]:
        """What the server says about the version it serves: device, compiled, buckets, batching.

        GET /models/{name} lists every loaded version; requests go to the highest ready one.
        """
        status, _, body = http("GET", f"{self.url}/models/{self.model}", timeout=10.0)
        if status != 200:
            return {"error": f"/models/{self.model} answered {status}"}
        ready = [v for v in json.loads(body).get("versions", []) if v.get("ready")]
        described: dict[str, Any] = max(ready, key=lambda v: v["version"]) if ready else {}
        described.pop("labels", None)  # 1000 names for the ImageNet model: not worth keeping
        return described

    def rss_bytes(self) -> float:
        """Resident memory as the server itself reports it (process_resident_memory_bytes)."""
        return self.scrape().value("process_resident_memory_bytes")


class GpuUtilization:
    """nvidia-smi's utilization.gpu (share of time a kernel was running on GPU 0), sampled every
    ``interval_ms`` for as long as the run lasts; a phase averages the samples inside its window."""

    def __init__(self, interval_ms: int = 100) -> None:
        self.samples: list[tuple[float, float]] = []
        self.process = subprocess.Popen(
            [
                "nvidia-smi",
                "-i",
                "0",
                "--query-gpu=utilization.gpu",
                "--format=csv,noheader,nounits",
                f"-lms={interval_ms}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.samples.append((time.monotonic(), float(line.strip()) / 100))
            except ValueError:
                continue

    def mean(self, t0: float, t1: float) -> float | None:
        inside = [v for t, v in self.samples if t0 <= t <= t1]
        return sum(inside) / len(inside) if inside else None

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


class StandinDevice:
    """The stand-in device's busy share (benchmarks/standin/sitecustomize.py), read like :class:`GpuUtilization`:
    its busy-seconds counter sampled every ``interval_ms``, a phase taking the counter's growth over its window."""

    def __init__(self, path: Path, interval_ms: int = 50) -> None:
        self.path = path
        self.samples: list[tuple[float, float]] = []
        self.interval_s = interval_ms / 1000
        self.stopped = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def busy_s(self) -> float:
        try:
            data = self.path.read_bytes()[:8]
        except OSError:
            return 0.0
        return struct.unpack("<d", data)[0] if len(data) == 8 else 0.0

    def _read(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.samples.append((time.monotonic(), self.busy_s()))

    def mean(self, t0: float, t1: float) -> float | None:
        inside = [(t, busy) for t, busy in self.samples if t0 <= t <= t1]
        if len(inside) < 2:
            return None
        (start, first), (end, last) = inside[0], inside[-1]
        return (last - first) / (end - start)

    def close(self) -> None:
        self.stopped.set()
