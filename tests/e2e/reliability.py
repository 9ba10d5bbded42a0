"""Helpers shared by the reliability tests (tests/e2e/test_reliability_*.py): fast server settings,
the documented error shape, Prometheus samples and a "still serving" check."""

from __future__ import annotations

import contextlib
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import httpx
from live_server import LiveServer
from prometheus_client.parser import text_string_to_metric_families
from samples import fashion_pngs, multipart

# Eager (no torch.compile) and small batch buckets: a server is ready in seconds, not minutes.
FAST = {"IGCV2_COMPILE": "false", "IGCV2_MAX_BATCH_SIZE": "4", "IGCV2_LOG_LEVEL": "info"}


def fast_env(store: Path, **settings: str) -> dict[str, str]:
    """Environment for ``live_server``: ``store`` served eagerly, plus ``IGCV2_<NAME>`` overrides."""
    return {**FAST, "IGCV2_MODEL_STORE": str(store), **{f"IGCV2_{k.upper()}": v for k, v in settings.items()}}


def error_message(response: httpx.Response, *statuses: int) -> str:
    """Assert a documented error: one of ``statuses`` with a JSON ``{"error": "<message>"}`` body."""
    assert response.status_code in statuses, f"{response.status_code} not in {statuses}: {response.text[:500]}"
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    message = response.json()["error"]
    assert isinstance(message, str) and len(message) > 5, response.text
    return message


def assert_serving(server: LiveServer) -> None:
    """The process is alive and a good request still gets its answer."""
    assert server.process.poll() is None, f"server died:\n{server.log()[-3000:]}"
    response = httpx.post(server.url + "/classify", files=multipart(fashion_pngs(1)), timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 1


def samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of every sample called ``name`` whose labels include ``labels``."""
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def metric(server: LiveServer, name: str, **labels: str) -> float:
    """The sum of a metric's matching samples, scraped from the server's /metrics now."""
    return sum(samples(httpx.get(server.url + "/metrics", timeout=30).text, name, **labels))


@dataclass
class RawResponse:
    status: int | None  # None: the server closed the connection without an HTTP response
    head: bytes
    body: bytes


def raw_request(server: LiveServer, request: bytes, timeout: float = 20.0) -> RawResponse:
    """Send ``request`` byte for byte (no client-side normalisation of paths, headers or framing)
    and read until the server closes the connection; a reset after the response keeps the response."""
    host, port = server.url.removeprefix("http://").split(":")
    data = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before taking it all
            sock.sendall(request)
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while chunk := sock.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return RawResponse(int(match.group(1)) if match else None, head, body)


def http_request(method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 request with ``Connection: close``; ``target`` goes on the wire as given."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class KeepAliveClient:
    """A minimal HTTP/1.1 client on one keep-alive connection that sends prepared request bytes.

    For load: an httpx request costs the client about a millisecond of CPU, and on a small machine the
    client's CPU is taken from the server it measures; this one costs a fraction of that."""

    def __init__(self, server: LiveServer, timeout: float = 30.0) -> None:
        host, port = server.url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buffer = b""

    def request(self, data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send ``data`` (a whole request) and return (status, headers, body); OSError when the
        connection fails (it is then closed, and the next request opens a new one)."""
        try:
            if self.sock is None:
                self.sock = socket.create_connection(self.address, timeout=self.timeout)
                self.buffer = b""
            self.sock.sendall(data)
            while b"\r\n\r\n" not in self.buffer:
                self._read()
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if b": " in line)
            length = int(headers.get(b"content-length", b"0"))
            while len(self.buffer) < length:
                self._read()
            body, self.buffer = self.buffer[:length], self.buffer[length:]
            if headers.get(b"connection") == b"close":
                self.close()
            return status, headers, body
        except (OSError, ValueError, IndexError):
            self.close()
            raise

    def _read(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> KeepAliveClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def multipart_request(path: str, images: list[bytes], boundary: str = "igcv2-load") -> bytes:
    """A keep-alive POST of ``images`` as multipart ``file`` parts, ready for KeepAliveClient."""
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n"
        for i, image in enumerate(images)
    )
    body = parts + f"--{boundary}--\r\n".encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body
