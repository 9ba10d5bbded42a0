"""A front-end's side of the executor: the models it serves are the executor's, seen through its catalog.

:class:`RemoteCatalog` is what the routes and the engine use, the same :class:`service.catalog.Catalog`
as in a single process; each version's queue is a :class:`RemoteQueue`, whose bound is the shared ledger
and whose way to the model is :class:`ExecutorLink`: one Unix socket, requests out, answers and the
catalog in. When the executor dies, everything in flight is answered 503 with Retry-After at once,
readiness turns 503, and the link reconnects to the executor the supervisor starts in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from igcv2.store import ArtifactConfig
from service.catalog import Catalog, ServedModel, State
from service.client import Client
from service.config import Settings
from service.errors import DeadlineExceeded, ServiceError, Unavailable, from_status
from service.executor import wire
from service.executor.shared import Arena, Ledger, SharedAdmission, SharedReservation

log = logging.getLogger("igcv2.frontend")
RECONNECT_S = 0.2  # between attempts while the executor (re)starts
GRACE_S = 1.0  # an answer past its deadline by this much is given up on: the executor is stuck, not busy
GONE = "the model executor is restarting"


class ExecutorLink:
    """The front-end's connection to the executor, kept up for the process's life."""

    def __init__(self, run_dir: Path, frontend: int, on_catalog: Callable[[dict[str, Any] | None], None]) -> None:
        self.path = run_dir / wire.SOCKET_NAME
        self.frontend = frontend
        self.on_catalog = on_catalog  # None: the executor is gone
        self.arena = Arena()
        self.ledger: Ledger | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count()
        self._pending: dict[int, tuple[asyncio.Future[Any], tuple[int, int] | None]] = {}  # requests and calls
        self._closing = False

    @property
    def connected(self) -> bool:
        return self.writer is not None

    async def run(self) -> None:
        """Connect, serve, and reconnect whenever the executor goes, until :meth:`close`."""
        waited = 0.0
        while not self._closing:
            try:
                reader = await self._connect()
            except (OSError, ValueError, KeyError) as exc:  # not listening yet (starting, restarting), or mid-exit
                if waited >= 5.0:
                    log.warning("no model executor at %s yet (%s); still trying", self.path, exc)
                    waited = 0.0
                await asyncio.sleep(RECONNECT_S)
                waited += RECONNECT_S
                continue
            try:
                while True:
                    self._dispatch(*await wire.read_frame(reader))
            except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, EOFError) as exc:
                if not self._closing:
                    log.error("lost the model executor (%s); answering 503 until it is back", type(exc).__name__)
            finally:
                self._lost()

    async def _connect(self) -> asyncio.StreamReader:
        def handshake() -> tuple[socket.socket, int, str]:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(wire.HANDSHAKE_TIMEOUT_S)
                sock.connect(str(self.path))
                wire.send_with_fd(sock, wire.HELLO, {"frontend": self.frontend, "pid": os.getpid()}, self.arena.fd)
                welcome, ledger_fd = wire.receive_with_fd(sock, wire.WELCOME)
                sock.settimeout(None)
            except BaseException:
                sock.close()
                raise
            return sock, ledger_fd, welcome["lock"]

        sock, ledger_fd, lock_path = await asyncio.to_thread(handshake)
        self.ledger = Ledger.open(ledger_fd, Path(lock_path))
        reader, self.writer = await asyncio.open_unix_connection(sock=sock)
        self.writer.write(wire.frame(wire.READY))
        return reader

    def _dispatch(self, kind: int, payload: bytes) -> None:
        if kind == wire.CATALOG:
            self.on_catalog(json.loads(payload))
            return
        if kind == wire.RESULT:
            request, logits = wire.logits_of(payload)
            self._answer(request, logits, None)
        elif kind == wire.ERROR:
            (request,) = wire.REQUEST.unpack_from(payload)
            self._answer(request, None, from_status(*json.loads(payload[wire.REQUEST.size :])))
        elif kind == wire.REPLY:
            call, value, error = json.loads(payload)
            self._answer(call, value, from_status(*error) if error else None)

    def _answer(self, key: int, value: Any, error: ServiceError | None) -> None:
        """Settle request or call ``key`` (unless given up on already, past its deadline); its block comes back."""
        entry = self._pending.pop(key, None)
        if entry is None:
            return
        future, block = entry
        if block is not None:
            self.arena.free(*block)
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def _lost(self) -> None:
        """The executor is gone: everything waiting on it is answered 503, its arena blocks come back."""
        if self.writer is not None:
            self.writer.close()
        self.writer = None
        self.ledger = None  # a reservation still held gives its room back to memory nobody reads
        self.on_catalog(None)
        pending, self._pending = self._pending, {}
        for future, block in pending.values():
            if block is not None:
                self.arena.free(*block)
            if not future.done():
                future.set_exception(Unavailable(f"{GONE}; retry", 1))

    def _send(self, frame: bytes) -> None:
        if self.writer is None:
            raise Unavailable(f"{GONE}; retry", 1)
        self.writer.write(frame)

    async def submit(
        self, queue: RemoteQueue, images: np.ndarray, deadline: float, room: SharedReservation, client: Client | None
    ) -> list[np.ndarray]:
        """Logits for ``images`` (written in ``room``'s block of the arena), computed by the executor."""
        if self.writer is None or queue.admission.ledger is not self.ledger:  # its rows were the last executor's
            raise Unavailable(f"{GONE}; retry", 1)
        block = queue.admission.send(room)
        request = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request] = (future, block)
        self._send(wire.submit(request, queue.row, block[0], images, deadline))
        if client is not None:
            client.on_leave(lambda: self._withdraw(request))
        try:
            logits = await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()) + GRACE_S)
        except TimeoutError:
            self._withdraw(request)
            if (entry := self._pending.pop(request, None)) is not None and entry[1] is not None:
                self.arena.free(*entry[1])
            raise DeadlineExceeded("deadline passed before the answer (the model executor did not answer)") from None
        finally:
            if client is not None:
                client.on_leave(None)
        return list(logits)

    def _withdraw(self, request: int) -> None:
        with contextlib.suppress(Unavailable):
            self._send(wire.frame(wire.WITHDRAW, wire.REQUEST.pack(request)))

    async def call(self, method: str, *args: Any) -> Any:
        """A control call to the executor (load, unload, statistics, metrics)."""
        call = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._send(wire.json_frame(wire.CALL, [call, method, args]))
        self._pending[call] = (future, None)
        return await future

    def close(self) -> None:
        self._closing = True
        if self.writer is not None:
            self.writer.close()


class RemoteQueue:
    """A model version's queue as a front-end sees it: the bound in the shared ledger, the executor beyond."""

    def __init__(self, link: ExecutorLink, row: int, admission: SharedAdmission) -> None:
        self.link = link
        self.row = row
        self.admission = admission

    @property
    def depth(self) -> int:
        """Images queued in the executor (or on their way there)."""
        return self.admission.counts()[0]

    async def submit(
        self,
        images: np.ndarray,
        deadline: float,
        reservation: SharedReservation | None = None,
        client: Client | None = None,
    ) -> list[np.ndarray]:
        if reservation is None or reservation.block is None:
            raise TypeError("a front-end submits the images it wrote into its reservation's buffer")
        return await self.link.submit(self, images, deadline, reservation, client)


class RemoteCatalog(Catalog):
    """The executor's models, as its catalog frames describe them; requests go to it through the link."""

    def __init__(self, settings: Settings, run_dir: Path, frontend: int) -> None:
        super().__init__(settings)
        self.link = ExecutorLink(run_dir, frontend, self._update)
        self.frontend = frontend
        self.first_catalog = asyncio.Event()  # the executor has told what it serves (after its first load)

    def _update(self, catalog: dict[str, Any] | None) -> None:
        """Take the executor's word for what is served (None: it is gone, nothing is)."""
        if catalog is None:
            with self._lock:
                for served in self._models.values():
                    served.batcher = None
                    if served.state is State.READY:
                        served.state, served.reason = State.LOADING, GONE
            return
        known = {key: m for key, m in self._snapshot()}
        models: dict[tuple[str, int], ServedModel] = {}
        for name, version, path, state, reason, config, batching, runtime, row in catalog["models"]:
            served = known.get((name, version)) or ServedModel(name, version, Path(path))
            served.state, served.reason = State(state), reason
            served.config = None if config is None else ArtifactConfig.model_validate(config)
            served.batching, served.runtime = batching, runtime
            queue = served.batcher
            if row is None:
                served.batcher = None
            elif (
                not isinstance(queue, RemoteQueue) or queue.row != row or queue.admission.ledger is not self.link.ledger
            ):
                assert self.link.ledger is not None
                admission = SharedAdmission(
                    self.link.ledger,
                    row,
                    batching["max_queue_size"],
                    served.labels,
                    self.frontend,
                    arena=self.link.arena,
                )
                served.batcher = RemoteQueue(self.link, row, admission)
            models[(name, version)] = served
        for key, gone in known.items():
            if key not in models and isinstance(gone.batcher, RemoteQueue):
                gone.batcher.admission.closed = True
        with self._lock:
            self._models = models
            self._configured = {tuple(key) for key in catalog["configured"]}
            self.missing = list(catalog["missing"])
            self.started = catalog["started"]
        if self.started:
            self.first_catalog.set()

    def _current(self, queue: Any, row: int) -> bool:
        """Whether ``queue`` is the one for ``row`` in the executor connected now (a new one has a new ledger)."""
        return isinstance(queue, RemoteQueue) and queue.row == row and queue.admission.ledger is self.link.ledger

    def _queue(self, served: ServedModel, row: int) -> RemoteQueue:
        assert self.link.ledger is not None
        size = served.batching["max_queue_size"]
        admission = SharedAdmission(self.link.ledger, row, size, served.labels, self.frontend, arena=self.link.arena)
        return RemoteQueue(self.link, row, admission)

    def start(self) -> None:
        self._link_task = asyncio.ensure_future(self.link.run())

    def is_ready(self) -> bool:
        return self.link.connected and super().is_ready()

    def not_ready(self) -> list[str]:
        return super().not_ready() if self.link.connected else [GONE]

    async def load(self, name: str) -> ServedModel:
        loaded_name, version = await self.link.call("load", name)
        return self.resolve(loaded_name, version)

    async def unload(self, name: str, version: int | None = None) -> list[ServedModel]:
        known = {key: m for key, m in self._snapshot()}
        return [known[tuple(key)] for key in await self.link.call("unload", name, version) if tuple(key) in known]

    async def statistics(self, models: list[ServedModel]) -> list[dict[str, Any]]:
        return await self.link.call("statistics", [(m.name, m.version) for m in models])

    async def executor_metrics(self) -> list[Any]:
        """The executor's metric families (empty while it is gone)."""
        try:
            return await asyncio.wait_for(self.link.call("metrics"), 5.0)
        except (ServiceError, TimeoutError):
            return []

    async def close(self, timeout: float | None = None) -> None:
        """Once the front-end has answered what it accepted (uvicorn waits for that): let go of the executor."""
        self.link.close()
        self._link_task.cancel()
