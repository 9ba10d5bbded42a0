"""A front-end's catalog against a real executor over its Unix socket, both on one event loop: answers,
withdrawals, deadlines, model control, statistics and metrics, and either side going away."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
from samples import DEFAULT_MODEL, default_model_store, fashion_test_images

from igcv2.artifact import load_artifact, versions
from service.catalog import ServedModel
from service.client import Client
from service.config import Settings
from service.errors import ClientLeft, DeadlineExceeded, NotFound, Unavailable
from service.executor.remote import RemoteCatalog, RemoteQueue
from service.executor.server import Executor
from service.runtime import ModelRunner, RuntimeOptions, resolve_device


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(model_store=default_model_store(tmp_path), compile=False, max_batch_size=8, **overrides)


class Running:
    def __init__(self, executor: Executor, stop: asyncio.Event, task: asyncio.Future[None]) -> None:
        self.executor, self.stop, self.task = executor, stop, task

    async def end(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)
        self.executor.ledger.close()


async def start_executor(settings: Settings, run_dir: Path) -> Running:
    executor, stop = Executor(settings, run_dir), asyncio.Event()
    return Running(executor, stop, asyncio.ensure_future(executor.serve(stop, lambda: None)))


async def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def pair(tmp_path: Path, **overrides: object) -> AsyncIterator[tuple[Running, RemoteCatalog]]:
    settings = settings_for(tmp_path, **overrides)
    running = await start_executor(settings, tmp_path)
    catalog = RemoteCatalog(settings, tmp_path, 0)
    catalog.start()
    try:
        await until(catalog.is_ready)
        yield running, catalog
    finally:
        await catalog.close()
        if not running.task.done():
            await running.end()


async def infer(served: ServedModel, images: np.ndarray, timeout_s: float | None = None, client: Client | None = None):
    client = client or Client()
    with served.admitted(len(images), timeout_s, client.arrival) as (deadline, room):
        buffer = room.buffer(images.shape[1:], images.dtype)
        buffer[...] = images
        return np.stack(await served.infer(buffer, deadline, room, client))


def gate(running: Running) -> tuple[threading.Event, threading.Event, list[int]]:
    """Hold the executor's model in its next call until released; returns (entered, release, sizes computed)."""
    runner = running.executor.registry.resolve(DEFAULT_MODEL).runners[0]
    entered, release, sizes = threading.Event(), threading.Event(), []
    run = runner.run

    def gated(inputs: list[np.ndarray]) -> np.ndarray:
        entered.set()
        release.wait(30)
        sizes.append(len(inputs))
        return run(inputs)

    runner.run = gated  # type: ignore[method-assign]
    return entered, release, sizes


def test_answers_are_the_models_own(tmp_path: Path) -> None:
    images, _ = fashion_test_images(20)
    artifact = load_artifact(
        default_model_store(tmp_path) / DEFAULT_MODEL / str(versions(default_model_store(tmp_path) / DEFAULT_MODEL)[-1])
    )
    runner = ModelRunner(artifact, RuntimeOptions(resolve_device("cpu"), compile=False, max_batch_size=32))
    expected = runner.predict(list(images))

    async def main() -> None:
        async with pair(tmp_path) as (_, catalog):
            served = catalog.resolve(DEFAULT_MODEL)
            assert isinstance(served.batcher, RemoteQueue) and served.runtime["device"] == "cpu"
            answers = await asyncio.gather(*(infer(served, images[i : i + 4]) for i in range(0, 20, 4)))
            np.testing.assert_allclose(np.concatenate(answers), expected, rtol=1e-5, atol=1e-5)
            assert served.batcher.admission.counts() == (0, 0), "every count comes back"

    asyncio.run(main())


def test_a_client_that_leaves_is_withdrawn_and_one_past_its_deadline_is_504_neither_computed(tmp_path: Path) -> None:
    images, _ = fashion_test_images(3)

    async def main() -> None:
        async with pair(tmp_path) as (running, catalog):
            served = catalog.resolve(DEFAULT_MODEL)
            entered, release, sizes = gate(running)
            busy = asyncio.ensure_future(infer(served, images[:1]))
            assert await asyncio.to_thread(entered.wait, 10)
            leaving = Client()
            left = asyncio.ensure_future(infer(served, images[1:2], client=leaving))
            late = asyncio.ensure_future(infer(served, images[2:3], timeout_s=0.3))
            await until(lambda: served.batcher.depth == 2)
            leaving.leave()
            with pytest.raises(ClientLeft, match="1 of 1 images never reached the model"):
                await left
            with pytest.raises(DeadlineExceeded, match="1 of 1 images never reached the model"):
                await late
            release.set()
            assert (await busy).shape == (1, 10)
            assert sizes == [1] and served.batcher.admission.counts() == (0, 0)

    asyncio.run(main())


def test_a_front_end_that_goes_has_its_images_withdrawn_and_its_room_given_back(tmp_path: Path) -> None:
    images, _ = fashion_test_images(4)

    async def main() -> None:
        async with pair(tmp_path) as (running, catalog):
            second = RemoteCatalog(catalog.settings, tmp_path, 1)
            second.start()
            await until(second.is_ready)
            entered, release, sizes = gate(running)
            busy = asyncio.ensure_future(infer(catalog.resolve(DEFAULT_MODEL), images[:1]))
            assert await asyncio.to_thread(entered.wait, 10)
            theirs = second.resolve(DEFAULT_MODEL)
            queued = asyncio.ensure_future(infer(theirs, images[1:3]))
            held = theirs.batcher.admission.reserve(1)  # reading a body, say
            await until(lambda: theirs.batcher.admission.counts() == (2, 1))
            await second.close()  # the front-end is gone (as if killed: its socket closes)
            with pytest.raises(Unavailable, match="restarting"):
                await queued
            await until(lambda: catalog.resolve(DEFAULT_MODEL).batcher.admission.counts() == (0, 0))
            held.release()  # a dead process gives nothing back; here it must not count twice either
            release.set()
            await busy
            assert sizes == [1], "the gone front-end's images were never computed"
            assert running.executor.connections.keys() == {0}

    asyncio.run(main())


def test_while_the_executor_is_gone_everything_is_503_then_it_serves_again(tmp_path: Path) -> None:
    images, _ = fashion_test_images(2)

    async def main() -> None:
        async with pair(tmp_path) as (running, catalog):
            entered, release, _ = gate(running)
            served = catalog.resolve(DEFAULT_MODEL)
            busy = asyncio.ensure_future(infer(served, images[:1]))
            queued = asyncio.ensure_future(infer(served, images[1:2]))
            assert await asyncio.to_thread(entered.wait, 10)
            running.executor.listener.shutdown(socket.SHUT_RDWR)  # as a SIGKILL would leave it: nobody
            for connection in list(running.executor.connections.values()):  # listens, every connection breaks
                connection.writer.transport.abort()
            for request in (busy, queued):
                with pytest.raises(Unavailable, match="the model executor is restarting; retry") as info:
                    await request
                assert info.value.headers == {"Retry-After": "1"}
            assert not catalog.is_ready() and catalog.not_ready() == ["the model executor is restarting"]
            with pytest.raises(Unavailable, match="is not ready"):
                await infer(catalog.resolve(DEFAULT_MODEL), images[:1])
            release.set()
            await running.end()
            replacement = await start_executor(catalog.settings, tmp_path)
            try:
                await until(catalog.is_ready)
                assert (await infer(catalog.resolve(DEFAULT_MODEL), images[:1])).shape == (1, 10)
            finally:
                await catalog.close()
                await replacement.end()

    asyncio.run(main())


async def images_counted(catalog: RemoteCatalog) -> float:
    """``igcv2_images_total`` as the executor reports it to a front-end's scrape."""
    families = {name: samples for name, _, _, samples in await catalog.executor_metrics()}
    return sum(value for name, _, value in families.get("igcv2_images", []) if name == "igcv2_images_total")


def test_model_control_statistics_and_metrics_are_the_executors(tmp_path: Path) -> None:
    images, _ = fashion_test_images(2)

    async def main() -> None:
        async with pair(tmp_path, max_queue_size=2) as (running, catalog):
            served = catalog.resolve(DEFAULT_MODEL)
            before = await images_counted(catalog)
            await infer(served, images)
            assert await images_counted(catalog) == before + 2
            held = served.batcher.admission.reserve(2)
            with pytest.raises(Unavailable, match="queue full"):
                served.batcher.admission.reserve(1)
            held.release()
            [stats] = await catalog.statistics([served])
            assert stats["inference_count"] == 2 and stats["inference_stats"]["fail"]["count"] == 1

            await catalog.unload(DEFAULT_MODEL)
            await until(lambda: DEFAULT_MODEL not in catalog.names())
            with pytest.raises(NotFound):
                catalog.resolve(DEFAULT_MODEL)
            loaded = await catalog.load(DEFAULT_MODEL)
            assert loaded.name == DEFAULT_MODEL and (await infer(loaded, images)).shape == (2, 10)
            assert running.executor.registry.resolve(DEFAULT_MODEL).batcher.admission.row == 1, "a new row"

    asyncio.run(main())
