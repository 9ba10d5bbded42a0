"""The executor process: the models of one device, their queues, the batcher and the inference threads,
serving every front-end of the host over one Unix socket.

It is the single process's model side unchanged (:class:`service.registry.ModelRegistry`, the same
:class:`service.batching.DynamicBatcher` per version), with two differences: each version's queue bound
is counted in the shared :class:`service.executor.shared.Ledger`, and requests arrive as frames naming
images already written in a front-end's arena. A front-end that goes has its queued images withdrawn
and the room it held given back; the executor itself drains last on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import REGISTRY

from service import metrics
from service.catalog import ServedModel
from service.client import Client
from service.config import Settings
from service.errors import NotFound, ServiceError, Unavailable
from service.executor import wire
from service.executor.shared import LEDGER_ROWS, MAX_FRONTENDS, Ledger, SharedAdmission, view_of
from service.registry import ModelRegistry, record_device_memory
from service.stats import InferenceStats
from service.workers import Worker

log = logging.getLogger("igcv2.executor")
EXPORTED_PREFIX = "igcv2_"  # the executor's metrics the front-ends' scrapes include (not its process or GC ones)


class Executor:
    def __init__(self, settings: Settings, run_dir: Path) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.ledger = Ledger.create(run_dir / wire.LOCK_NAME)
        self._rows = itertools.count()
        self.rows: dict[int, ServedModel] = {}  # ledger row -> the registered version it counts
        self.registry = ModelRegistry(settings, admission=self._admission, on_change=self._changed)
        self.connections: dict[int, Connection] = {}  # by front-end index
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listener: socket.socket | None = None
        self._catalog_due = False

    # ----- the registry's hooks (called from loading threads) -----

    def _admission(self, served: ServedModel, stats: InferenceStats) -> SharedAdmission:
        row = next(self._rows)
        if row >= LEDGER_ROWS:
            raise Unavailable(f"{LEDGER_ROWS} model versions loaded since the executor started; restart it", 1)
        return SharedAdmission(self.ledger, row, served.batching["max_queue_size"], served.labels, None, stats)

    def _changed(self) -> None:
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the executor is ending
                self.loop.call_soon_threadsafe(self.publish)

    # ----- the catalog -----

    def publish(self) -> None:
        """Send the front-ends what is served now (coalesced: several changes at once go as one frame)."""
        if self._catalog_due:
            return
        self._catalog_due = True
        assert self.loop is not None
        self.loop.call_soon(self._send_catalog)

    def _send_catalog(self) -> None:
        self._catalog_due = False
        message = wire.json_frame(wire.CATALOG, self.catalog())
        for connection in list(self.connections.values()):
            connection.send(message)

    def catalog(self) -> dict[str, Any]:
        """What is served now; the rows it names are the ones requests are routed by from now on."""
        registry = self.registry
        served = registry.all()
        self.rows = {row_of(m): m for m in served if m.batcher is not None}
        return {
            "started": registry.started,
            "missing": list(registry.missing),
            "configured": registry.configured,
            "models": [
                (
                    m.name,
                    m.version,
                    str(m.path),
                    str(m.state),
                    m.reason,
                    None if m.config is None else m.config.model_dump(mode="json"),
                    m.batching,
                    m.runtime,
                    None if m.batcher is None else row_of(m),
                )
                for m in served
            ],
        }

    # ----- connections -----

    def accept(self, listener: socket.socket) -> None:
        """Accept front-ends and shake hands with them, on a thread of its own (blocking calls), until the
        listening socket closes."""
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            try:
                sock.settimeout(wire.HANDSHAKE_TIMEOUT_S)
                hello, arena_fd = wire.receive_with_fd(sock, wire.HELLO)
                frontend, pid = hello["frontend"], hello["pid"]
                if not 0 <= frontend < MAX_FRONTENDS:
                    os.close(arena_fd)
                    raise ConnectionError(f"front-end index {frontend} out of range")
                wire.send_with_fd(sock, wire.WELCOME, {"lock": str(self.run_dir / wire.LOCK_NAME)}, self.ledger.fd)
                sock.settimeout(None)
            except (OSError, ValueError, KeyError, ConnectionError) as exc:
                log.warning("front-end handshake failed: %s", exc)
                sock.close()
                continue
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self._connected, sock, frontend, pid, arena_fd)

    def _connected(self, sock: socket.socket, frontend: int, pid: int, arena_fd: int) -> None:
        old = self.connections.pop(frontend, None)
        if old is not None:  # its replacement came before its end was noticed: end it first
            old.close()
        try:
            arena = view_of(arena_fd)
        finally:
            os.close(arena_fd)
        connection = Connection(self, frontend, pid, arena)
        self.connections[frontend] = connection
        connection.task = asyncio.ensure_future(connection.serve(sock))

    def forget(self, connection: Connection) -> None:
        if self.connections.get(connection.frontend) is connection:
            del self.connections[connection.frontend]

    # ----- control calls -----

    async def call(self, method: str, args: list[Any]) -> Any:
        registry = self.registry
        if method == "load":
            (name,) = args
            served = await registry.load(name)
            return served.name, served.version
        if method == "unload":
            name, version = args
            return [(m.name, m.version) for m in await registry.unload(name, version)]
        if method == "statistics":
            return await self.statistics(args[0])
        if method == "metrics":
            record_device_memory()
            return exported_metrics()
        raise NotFound(f"unknown executor call {method!r}")

    async def statistics(self, versions: list[tuple[str, int]]) -> list[dict[str, Any]]:
        """Triton's statistics of the named versions, with the requests the front-ends refused at the door."""
        models = [self.registry.resolve(name, version) for name, version in versions]
        stats = await self.registry.statistics(models)
        for served, entry in zip(models, stats, strict=True):
            if served.batcher is not None:
                entry["inference_stats"]["fail"]["count"] += served.batcher.admission.refused
        return stats

    # ----- the process -----

    async def serve(self, stop: asyncio.Event, announce_ready: Callable[[], None]) -> None:
        """Load the models, serve front-ends until ``stop``, then drain: queued work is finished, nothing new
        arrives (the supervisor stops the executor after every front-end has gone)."""
        self.loop = asyncio.get_running_loop()
        path = self.run_dir / wire.SOCKET_NAME
        path.unlink(missing_ok=True)
        self.listener = listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(MAX_FRONTENDS)
        threading.Thread(target=self.accept, args=(listener,), name="executor-accept", daemon=True).start()

        self.registry.start()
        log.info("executor listening on %s (pid %d)", path, os.getpid())
        while not self.registry.started and not stop.is_set():
            await asyncio.sleep(0.05)
        if not stop.is_set():
            announce_ready()
        await stop.wait()
        log.info("executor stopping: finishing queued work")
        with contextlib.suppress(OSError):  # wakes the accepting thread
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        await self.registry.close()
        for connection in list(self.connections.values()):
            connection.close()
        log.info("executor stopped")


def row_of(served: ServedModel) -> int:
    assert served.batcher is not None
    admission = served.batcher.admission
    assert isinstance(admission, SharedAdmission)
    return admission.row


class Connection:
    """One front-end: its requests, its arena (read-only here), the clients of its requests in flight."""

    def __init__(self, executor: Executor, frontend: int, pid: int, arena: Any) -> None:
        self.executor = executor
        self.frontend = frontend
        self.pid = pid
        self.arena = arena
        self.clients: dict[int, Client] = {}  # request id -> its client, to withdraw it
        self.tasks: set[asyncio.Future[None]] = set()
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Future[None] | None = None
        self.closed = False

    async def serve(self, sock: socket.socket) -> None:
        reader, self.writer = await asyncio.open_unix_connection(sock=sock)
        try:
            if (await wire.read_frame(reader))[0] != wire.READY:
                raise ConnectionError("front-end did not say ready")
            self.send(wire.json_frame(wire.CATALOG, self.executor.catalog()))
            log.info("front-end %d (pid %d) connected", self.frontend, self.pid)
            while True:
                kind, payload = await wire.read_frame(reader)
                if kind == wire.SUBMIT:
                    self.spawn(self.submit(*wire.SUBMIT_BODY.unpack(payload)))
                elif kind == wire.WITHDRAW:
                    if (client := self.clients.get(wire.REQUEST.unpack(payload)[0])) is not None:
                        client.leave()
                elif kind == wire.CALL:
                    self.spawn(self.call(*json.loads(payload)))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, EOFError) as exc:
            if not self.closed:
                log.info("front-end %d (pid %d) gone (%s)", self.frontend, self.pid, type(exc).__name__)
        finally:
            self.close()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)  # a task nothing refers to may be collected before it ends
        task.add_done_callback(self.tasks.discard)

    def send(self, frame: bytes) -> None:
        if not self.closed and self.writer is not None:
            self.writer.write(frame)

    async def submit(
        self, request: int, row: int, offset: int, deadline: float, n: int, d1: int, d2: int, d3: int, dtype: bytes
    ) -> None:
        client = self.clients[request] = Client()
        try:
            served = self.executor.rows.get(row)
            if served is None or served.batcher is None:
                self.executor.ledger.dequeued(row, n)  # counted as queued by its front-end
                raise Unavailable("this model version is no longer served; retry", 1)
            images = np.ndarray((n, d1, d2, d3), np.dtype(dtype.decode()), buffer=self.arena, offset=offset)
            self.send(wire.result(request, np.stack(await served.batcher.submit(images, deadline, None, client))))
        except ServiceError as exc:
            self.send(wire.error(request, exc.status_code, exc.message, exc.headers))
        except Exception as exc:  # the model failed on this batch (logged by the batcher): a 500, as in one process
            self.send(wire.error(request, 500, f"internal error: {type(exc).__name__}", {}))
        finally:
            self.clients.pop(request, None)

    async def call(self, call: int, method: str, args: list[Any]) -> None:
        try:
            value = await self.executor.call(method, args)
        except ServiceError as exc:
            self.send(wire.json_frame(wire.REPLY, [call, None, [exc.status_code, exc.message, exc.headers]]))
        except Exception as exc:
            log.exception("executor call %s failed", method)
            self.send(wire.json_frame(wire.REPLY, [call, None, [500, f"internal error: {type(exc).__name__}", {}]]))
        else:
            self.executor._send_catalog()  # what the call changed reaches the front-end before its answer
            self.send(wire.json_frame(wire.REPLY, [call, value, None]))

    def close(self) -> None:
        """The front-end is gone: its queued images are withdrawn, the room it held comes back."""
        if self.closed:
            return
        self.closed = True
        for client in list(self.clients.values()):
            client.leave()
        self.executor.ledger.forget_frontend(self.frontend)
        self.executor.forget(self)
        if self.writer is not None:
            self.writer.close()
        self.arena = None  # its pages go once the last queued view of them does


def exported_metrics() -> list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]:
    """The executor's own metric families as plain values, for the front-ends' scrapes to merge in."""
    return [
        (family.name, family.type, family.documentation, [(s.name, s.labels, s.value) for s in family.samples])
        for family in REGISTRY.collect()
        if family.name.startswith(EXPORTED_PREFIX)
    ]


def run(settings: Settings, me: Worker) -> Executor:
    """The executor's main: serve until SIGTERM (or the supervisor's death), drain; returns the executor that was."""
    import uvloop

    executor = Executor(settings, me.run_dir)
    if me.replacement:
        metrics.WORKER_RESTARTS.inc()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        with contextlib.closing(executor.ledger):
            await executor.serve(stop, me.announce_ready)

    uvloop.run(main())
    return executor
