"""Start the real service (``python -m service``) on a free loopback port for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL_STORE = ROOT / "model_store"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log_path: Path
    grpc_target: str  # host:port of its gRPC server ("127.0.0.1:0" when IGCV2_GRPC_PORT=0 turned it off)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextmanager
def live_server(
    tmp_path: Path, env: dict[str, str] | None = None, ready: bool | None = True, timeout: float = 300.0
) -> Iterator[LiveServer]:
    """Run the service until the block ends, HTTP and gRPC each on a free port. ``ready``: wait for
    /health/ready (False: /health/live; None: wait for nothing)."""
    port = free_port()
    full_env = {
        **os.environ,
        "IGCV2_HOST": "127.0.0.1",
        "IGCV2_PORT": str(port),
        "IGCV2_GRPC_PORT": str(free_port()),
        "IGCV2_MODEL_STORE": str(MODEL_STORE),
        "IGCV2_LOG_LEVEL": "info",
        "TORCHINDUCTOR_CACHE_DIR": str(ROOT / ".inductor-cache"),
        # Ahead-of-time packages shared by every server of the suite (and the runner tests): compiled once.
        "IGCV2_COMPILE_CACHE": str(ROOT / ".compile-cache"),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    log_path = tmp_path / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    server = LiveServer(f"http://127.0.0.1:{port}", process, log_path, f"127.0.0.1:{full_env['IGCV2_GRPC_PORT']}")
    try:
        if ready is not None:
            _wait(server, "/health/ready" if ready else "/health/live", timeout)
        yield server
    finally:
        server.stop()


def _wait(server: LiveServer, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.url + path, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not answering 200 on {path} after {timeout}s:\n{server.log()[-4000:]}")
