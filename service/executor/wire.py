"""The executor's socket: frames of a length, a kind and a payload; descriptors at the handshake.

Frames carry small things only: a request's header (its model's ledger row, where its images lie in
the front-end's arena, their shape and type, its deadline), its answer (logits), the catalog, control
calls. Pixels never travel here. The frames of every request (submit, withdraw, result) are fixed
binary layouts (``struct``: a microsecond each); the rare ones (catalog, calls, errors) are JSON. Nothing
here unpickles, as nowhere in this project.

Handshake, on a blocking socket before either side goes asynchronous:
front-end -> HELLO ``{"frontend": i, "pid": p}`` with its arena's descriptor;
executor -> WELCOME ``{"lock": path}`` with the ledger's descriptor;
front-end -> READY on the stream: from then on the executor writes (its catalog first).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

import numpy as np

SOCKET_NAME = "executor.sock"  # in the supervisor's private run folder
LOCK_NAME = "ledger.lock"
HANDSHAKE_TIMEOUT_S = 10.0
MAX_HANDSHAKE = 4096

HEADER = struct.Struct("<IB")  # payload length, kind
# Front-end -> executor
HELLO, READY, SUBMIT, WITHDRAW, CALL = range(5)
# Executor -> front-end
WELCOME, CATALOG, RESULT, ERROR, REPLY = range(10, 15)

SUBMIT_BODY = struct.Struct("<QIQd4I3s")  # request, row, offset, deadline, shape (4 dims), dtype (numpy's str)
REQUEST = struct.Struct("<Q")  # WITHDRAW's body; the head of RESULT's and ERROR's
RESULT_HEAD = struct.Struct("<QII")  # request, images, classes; float32 logits follow


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), kind) + payload


def json_frame(kind: int, value: Any) -> bytes:
    return frame(kind, json.dumps(value, separators=(",", ":")).encode())


def submit(request: int, row: int, offset: int, images: np.ndarray, deadline: float) -> bytes:
    return frame(SUBMIT, SUBMIT_BODY.pack(request, row, offset, deadline, *images.shape, images.dtype.str.encode()))


def result(request: int, logits: np.ndarray) -> bytes:
    return frame(RESULT, RESULT_HEAD.pack(request, *logits.shape) + logits.astype(np.float32, copy=False).tobytes())


def error(request: int, status: int, message: str, headers: dict[str, str]) -> bytes:
    return frame(ERROR, REQUEST.pack(request) + json.dumps([status, message, headers]).encode())


def logits_of(payload: bytes) -> tuple[int, np.ndarray]:
    """A RESULT's request and its logits."""
    request, images, classes = RESULT_HEAD.unpack_from(payload)
    return request, np.frombuffer(payload, np.float32, images * classes, RESULT_HEAD.size).reshape(images, classes)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next (kind, payload); raises ``asyncio.IncompleteReadError`` when the peer has gone."""
    size, kind = HEADER.unpack(await reader.readexactly(HEADER.size))
    return kind, await reader.readexactly(size)


def send_with_fd(sock: socket.socket, kind: int, value: dict[str, Any], fd: int) -> None:
    socket.send_fds(sock, [json_frame(kind, value)], [fd])


def receive_with_fd(sock: socket.socket, kind: int) -> tuple[dict[str, Any], int]:
    """A handshake frame of ``kind`` and the descriptor sent with it (the peer sends nothing after it until
    answered, so one read holds exactly the frame)."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_HANDSHAKE, 1)
    try:
        if len(data) < HEADER.size or len(fds) != 1:
            raise ConnectionError("the peer left during the handshake")
        size, got = HEADER.unpack_from(data)
        if got != kind or len(data) != HEADER.size + size:
            raise ConnectionError(f"unexpected handshake frame (kind {got}, {len(data)} bytes)")
        return json.loads(data[HEADER.size :]), fds[0]
    except BaseException:
        for fd in fds:
            socket.close(fd)
        raise
