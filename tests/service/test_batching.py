"""DynamicBatcher against a real (small, numpy) inference function on its own thread: dispatch policy,
bounds, deadlines, shutdown."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.batching import DOOR, DynamicBatcher, Reservation, batch_cuts, fill_waits
from service.client import Client
from service.errors import ClientLeft, DeadlineExceeded, TooLarge, Unavailable

_names = itertools.count()


def image(ident: int) -> np.ndarray:
    """An image whose pixels all hold ``ident``, so an output tells which image it came from."""
    return np.full((4, 4, 1), ident, np.uint8)


@dataclass
class Model:
    """A real inference function: numpy per-image statistics, with knobs to make it slow or fail.

    ``gate``: when set, the first call waits for it (the instance is busy until the test opens it).
    """

    compute_s: float = 0.0
    gate: threading.Event | None = None
    poison: int | None = None
    batches: list[list[int]] = field(default_factory=list)
    dispatched_at: list[float] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        self.dispatched_at.append(time.monotonic())
        ids = [int(img[0, 0, 0]) for img in images]
        self.batches.append(ids)
        self.started.set()
        if self.gate is not None and len(self.batches) == 1:
            assert self.gate.wait(30), "the test never opened the gate"
        if self.compute_s:
            time.sleep(self.compute_s)
        if self.poison is not None and self.poison in ids:
            raise ValueError(f"cannot classify image {self.poison}")
        stacked = np.stack(images).astype(np.float32)
        return np.stack([stacked.mean(axis=(1, 2, 3)), stacked.std(axis=(1, 2, 3)) + 1], axis=1)

    @property
    def seen(self) -> set[int]:
        return {i for batch in self.batches for i in batch}


@dataclass(eq=False)
class Instance:
    """``model`` on a thread of its own, as the batcher sees a ModelRunner."""

    model: Model
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "test-instance"))

    def run(self, inputs: list[np.ndarray]) -> np.ndarray:
        return self.model(inputs)


def make(
    model: Model, *, max_batch_size: int = 4, delay_s: float = 0.0, queue: int = 64, instances: int = 1
) -> tuple[DynamicBatcher, dict[str, str]]:
    labels = {"model": f"batching-test-{next(_names)}", "version": "1"}
    batcher = DynamicBatcher(
        [Instance(model) for _ in range(instances)],
        max_batch_size=max_batch_size,
        max_queue_delay_s=delay_s,
        max_queue_size=queue,
        model=labels["model"],
        version=1,
    )
    batcher.start()
    return batcher, labels


def later(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


async def classify(batcher: DynamicBatcher, *ids: int, timeout: float = 30.0) -> list[int]:
    """Submit images ``ids`` and return the id each output says it came from (checks routing)."""
    outputs = await batcher.submit([image(i) for i in ids], later(timeout))
    return [round(float(out[0])) for out in outputs]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


def metric(name: str, labels: dict[str, str], **extra: str) -> float:
    return REGISTRY.get_sample_value(name, {**labels, **extra}) or 0.0


def run(coroutine: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coroutine())


# ----- dispatch policy -----


def test_lone_request_on_an_idle_instance_is_dispatched_at_once() -> None:
    async def main() -> None:
        model = Model()
        batcher, _ = make(model)
        waits = []
        for i in range(5):
            submitted = time.monotonic()
            assert await classify(batcher, i) == [i]
            waits.append(model.dispatched_at[-1] - submitted)
        await batcher.close(5)
        assert model.batches == [[0], [1], [2], [3], [4]]
        assert min(waits) < 0.01 and max(waits) < 0.1, waits

    run(main)


def test_requests_gather_into_batches_while_the_instance_is_busy() -> None:
    async def main() -> None:
        model = Model(gate=threading.Event())
        batcher, _ = make(model, max_batch_size=4)
        first = asyncio.create_task(classify(batcher, 0))
        await until(model.started.is_set)
        waiting = [asyncio.create_task(classify(batcher, i)) for i in range(1, 11)]
        await until(lambda: batcher.depth == 10)
        model.gate.set()  # type: ignore[union-attr]
        assert await first == [0]
        assert [await task for task in waiting] == [[i] for i in range(1, 11)]
        await batcher.close(5)
        assert model.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]

    run(main)


def test_the_next_batch_starts_while_the_event_loop_is_busy() -> None:
    """Batches are formed on the inference thread: when a batch ends, the next one starts at once even
    while the event loop is held up (parsing and decoding a burst of arrivals, here a blocking sleep)."""

    async def main() -> None:
        model = Model(gate=threading.Event())
        batcher, _ = make(model, max_batch_size=4)
        first = asyncio.create_task(classify(batcher, 0))
        await until(model.started.is_set)
        waiting = asyncio.create_task(classify(batcher, 1, 2, 3))
        await until(lambda: batcher.depth == 3)
        model.gate.set()  # type: ignore[union-attr]
        time.sleep(0.2)  # the loop is busy: nothing of the batcher's can run on it
        assert model.batches == [[0], [1, 2, 3]], "the second batch waited for the event loop"
        assert await first == [0] and await waiting == [1, 2, 3]
        await batcher.close(5)

    run(main)


# Per-call seconds by bucket as measured for igcv2-fashion on the 2-core CPU: 16 is the most efficient.
CPU_BUCKETS = {1: 1.28e-3, 2: 1.61e-3, 4: 2.07e-3, 8: 3.15e-3, 16: 5.61e-3, 32: 13.38e-3}


def test_batch_cuts_split_a_batch_only_when_that_computes_the_queue_markedly_faster() -> None:
    cuts = batch_cuts(CPU_BUCKETS)
    assert len(cuts) == 33 and cuts[0] == 0
    assert cuts[1:9] == list(range(1, 9)), "padding up to the next bucket costs less than another call"
    assert cuts[9] == 8, "8 now + 1 next (4.4 ms) beats 9 padded to 16 (5.6 ms)"
    assert all(cuts[n] == 16 for n in range(17, 33)), "17..32 padded to 32 (13.4 ms) vs 16 + the rest"
    # A GPU (H200, CUDA graphs): a call costs nearly the same at any size, so all queued images go.
    gpu = {1: 246e-6, 2: 250e-6, 4: 260e-6, 8: 285e-6, 16: 310e-6, 32: 368e-6}
    assert batch_cuts(gpu) == list(range(33))
    # Within the margin (warm-up timing noise) nothing is split.
    assert batch_cuts({1: 1.0, 2: 2.1})[2] == 2 and batch_cuts({1: 1.0, 2: 2.3})[2] == 1


def test_an_instance_takes_the_cut_that_the_bucket_times_say() -> None:
    async def main() -> None:
        model = Model(gate=threading.Event())
        labels = {"model": f"batching-test-{next(_names)}", "version": "1"}
        batcher = DynamicBatcher(
            [Instance(model)],
            max_batch_size=32,
            max_queue_delay_s=0.0,
            max_queue_size=64,
            model=labels["model"],
            version=1,
            bucket_seconds=CPU_BUCKETS,
        )
        batcher.start()
        first = asyncio.create_task(classify(batcher, 0))
        await until(model.started.is_set)
        waiting = asyncio.create_task(classify(batcher, *range(1, 21)))
        await until(lambda: batcher.depth == 20)
        model.gate.set()  # type: ignore[union-attr]
        assert await first == [0] and await waiting == list(range(1, 21))
        await batcher.close(5)
        assert [len(b) for b in model.batches] == [1, 16, 4], model.batches

    run(main)


def test_fill_waits_are_worth_no_more_than_the_padding_costs() -> None:
    cuts = batch_cuts(CPU_BUCKETS)
    waits = fill_waits(CPU_BUCKETS, cuts)
    assert waits[12] == pytest.approx((CPU_BUCKETS[16] * 4 / 12, 16)), "12 padded to 16: wait up to 1.87 ms for 4"
    assert waits[3] == pytest.approx((CPU_BUCKETS[4] / 3, 4))
    assert all(waits[b][0] == 0 for b in CPU_BUCKETS), "a full bucket goes at once"
    assert all(waits[n][0] == 0 for n in range(17, 33)), "split (16 now): nothing to wait for"
    assert waits[9][0] == 0, "9 goes as 8 + 1"


def test_an_instance_waits_briefly_for_images_that_fill_its_bucket() -> None:
    """3 queued with bucket 4 next: worth waiting t_4 / 3 = 0.1 s for a 4th, and no longer."""

    async def main() -> None:
        model = Model(gate=threading.Event())
        labels = {"model": f"batching-test-{next(_names)}", "version": "1"}
        batcher = DynamicBatcher(
            [Instance(model)],
            max_batch_size=4,
            max_queue_delay_s=0.0,
            max_queue_size=64,
            model=labels["model"],
            version=1,
            bucket_seconds={1: 0.1, 2: 0.19, 4: 0.3},
        )
        batcher.start()
        first = asyncio.create_task(classify(batcher, 0))
        await until(model.started.is_set)
        three = asyncio.create_task(classify(batcher, 1, 2, 3))
        await until(lambda: batcher.depth == 3)
        model.gate.set()  # type: ignore[union-attr]
        await asyncio.sleep(0.03)
        assert await classify(batcher, 4) == [4] and await three == [1, 2, 3] and await first == [0]
        released = time.monotonic()
        assert await classify(batcher, 5, 6, 7) == [5, 6, 7]  # nobody fills this one
        waited = model.dispatched_at[-1] - released
        await batcher.close(5)
        assert model.batches == [[0], [1, 2, 3, 4], [5, 6, 7]]
        assert 0.09 <= waited < 0.2, f"dispatched after {waited:.3f}s; worth waiting 0.1s"

    run(main)


def test_a_request_larger_than_a_batch_is_split_and_reassembled_in_order() -> None:
    async def main() -> None:
        model = Model()
        batcher, _ = make(model, max_batch_size=2)
        assert await classify(batcher, 5, 6, 7, 8, 9) == [5, 6, 7, 8, 9]
        await batcher.close(5)
        assert all(len(b) <= 2 for b in model.batches) and sorted(model.seen) == [5, 6, 7, 8, 9]

    run(main)


def test_concurrent_requests_each_get_their_own_outputs() -> None:
    async def main() -> None:
        model = Model(compute_s=0.002)
        batcher, _ = make(model, max_batch_size=8, queue=256, instances=2)
        requests = [list(range(k * 3, k * 3 + 1 + k % 3)) for k in range(40)]
        results = await asyncio.gather(*(classify(batcher, *ids) for ids in requests))
        await batcher.close(5)
        assert results == requests
        assert max(len(b) for b in model.batches) > 1 and all(len(b) <= 8 for b in model.batches)

    run(main)


# ----- max_queue_delay, measured from the oldest queued image's arrival -----


def test_queue_delay_holds_a_lone_request_for_the_delay_and_no_longer() -> None:
    async def main() -> None:
        model = Model()
        batcher, _ = make(model, delay_s=0.05)
        waits = []
        for i in range(3):
            submitted = time.monotonic()
            await classify(batcher, i)
            waits.append(model.dispatched_at[-1] - submitted)
        await batcher.close(5)
        assert min(waits) >= 0.049, waits
        assert min(waits) < 0.1, f"dispatched after {min(waits):.3f}s, more than twice the 50 ms delay"

    run(main)


def test_queue_delay_timer_starts_at_the_oldest_arrival_not_at_later_ones() -> None:
    async def main() -> None:
        model = Model()
        batcher, _ = make(model, max_batch_size=8, delay_s=0.1)
        t0 = time.monotonic()
        a = asyncio.create_task(classify(batcher, 1))
        await asyncio.sleep(0.05)
        b = asyncio.create_task(classify(batcher, 2))  # must not restart the clock
        assert await a == [1] and await b == [2]
        await batcher.close(5)
        assert model.batches == [[1, 2]]
        waited = model.dispatched_at[0] - t0
        assert 0.099 <= waited < 0.14, f"dispatched {waited:.3f}s after the first arrival (delay 0.1s)"

    run(main)


def test_queue_delay_counts_time_spent_waiting_for_a_busy_instance() -> None:
    """An image that already waited longer than the delay while the instance was busy leaves at once
    when the instance frees up (TorchServe/LitServe would start the timer only then)."""

    async def main() -> None:
        model = Model(gate=threading.Event())
        batcher, _ = make(model, max_batch_size=8, delay_s=0.08)
        first = asyncio.create_task(classify(batcher, 0))
        await until(model.started.is_set)
        queued_at = time.monotonic()
        second = asyncio.create_task(classify(batcher, 1))
        await asyncio.sleep(0.15)  # longer than the delay
        released_at = time.monotonic()
        model.gate.set()  # type: ignore[union-attr]
        assert await first == [0] and await second == [1]
        await batcher.close(5)
        assert model.dispatched_at[1] - released_at < 0.04, "waited a second delay after the instance freed up"
        assert model.dispatched_at[1] - queued_at < 0.08 + 0.15

    run(main)


def test_a_full_batch_does_not_wait_for_the_delay() -> None:
    async def main() -> None:
        model = Model()
        batcher, _ = make(model, max_batch_size=4, delay_s=5.0)
        started = time.monotonic()
        assert await classify(batcher, 1, 2, 3, 4) == [1, 2, 3, 4]
        await batcher.close(5)
        assert time.monotonic() - started < 1.0 and model.batches == [[1, 2, 3, 4]]

    run(main)


def test_the_delay_ends_early_for_a_deadline_that_cannot_wait_for_it() -> None:
    """A request whose deadline falls inside the delay is computed in time, not answered 504 after
    waiting for companions: alone, and arriving while another waits (it wakes the gathering)."""

    async def main() -> None:
        model = Model()
        batcher = DynamicBatcher(
            [Instance(model)],
            max_batch_size=8,
            max_queue_delay_s=5.0,
            max_queue_size=64,
            model=f"batching-test-{next(_names)}",
            version=1,
            bucket_seconds=dict.fromkeys((1, 2, 4, 8), 0.2),
        )  # a call takes 0.2 s at most
        batcher.start()
        started = time.monotonic()
        outputs = await batcher.submit([image(1)], started + 1.0)  # a 504 if it waited for the 5 s delay
        assert round(float(outputs[0][0])) == 1 and time.monotonic() - started < 1.0
        patient = asyncio.create_task(batcher.submit([image(2)], later()))
        await until(lambda: batcher.depth == 1)
        hurried = time.monotonic()
        outputs = await batcher.submit([image(3)], hurried + 1.0)
        assert round(float(outputs[0][0])) == 3 and time.monotonic() - hurried < 1.0
        assert model.batches == [[1], [2, 3]]
        await patient
        await batcher.close(5)

    run(main)


# ----- bounded queue -----


def test_full_queue_refuses_at_once_with_retry_after() -> None:
    async def main() -> None:
        model = Model(gate=threading.Event())
        batcher, labels = make(model, max_batch_size=8, queue=3)
        first = asyncio.create_task(classify(batcher, 0))
        await until(model.started.is_set)
        queued = [asyncio.create_task(classify(batcher, i)) for i in (1, 2)]
        await until(lambda: batcher.depth == 2)
        rejected_before = metric("igcv2_rejected_images_total", labels, reason="queue_full")
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await asyncio.wait_for(classify(batcher, 3, 4), 1.0)  # 2 + 2 > 3: refused whole
        assert time.monotonic() - started < 0.1, "a full queue must answer at once, not block"
        assert info.value.status_code == 503 and info.value.headers["Retry-After"] == "1"
        assert "queue full" in info.value.message
        assert batcher.depth == 2, "a refused request must not be partly queued"
        assert metric("igcv2_rejected_images_total", labels, reason="queue_full") == rejected_before + 2
        last = asyncio.create_task(classify(batcher, 5))  # exactly fills the queue
        await until(lambda: batcher.depth == 3)
        with pytest.raises(Unavailable):
            await classify(batcher, 6)
        model.gate.set()  # type: ignore[union-attr]
        assert [await t for t in [first, *queued, last]] == [[0], [1], [2], [5]]
        assert await classify(batcher, 7) == [7], "serves again once the queue drained"
        await batcher.close(5)
        assert 3 not in model.seen and 4 not in model.seen and 6 not in model.seen

    run(main)


def test_the_door_asks_room_for_as_many_images_as_requests_lately_brought_and_holds_it_until_admission() -> None:
    """Requests of 4 with 2 places left: one image would fit, but the next request will not, and a
    refusal after its body is read and parsed costs the event loop as much as an answer. Room held
    from a body's arrival keeps requests being parsed together from outnumbering the room."""

    async def main() -> None:
        batcher, labels = make(Model(), queue=10)
        room = batcher.admission.door()
        assert room.n == 0, "the door holds nothing: an upload in progress must not hold the queue"
        batcher.admission.hold(room)
        assert room.n == 1 and batcher.admission.reserved == 1, "nothing seen yet: room for one"
        room.release()
        for _ in range(6):
            batcher.admission.reserve(4).release()  # requests of 4 came and went
        first, second = batcher.admission.door(), batcher.admission.door()
        batcher.admission.hold(first), batcher.admission.hold(second)
        assert (first.n, second.n) == (4, 4) and batcher.admission.reserved == 8
        shed_before = metric("igcv2_rejected_images_total", labels, reason="queue_full")
        with pytest.raises(Unavailable, match="8 more held for requests being read"):
            batcher.admission.door()  # 2 places left
        assert metric("igcv2_rejected_images_total", labels, reason="queue_full") == shed_before + 4
        batcher.admission.check_room(1)  # though one image would still fit
        late = Reservation(batcher.admission, 0)
        with pytest.raises(Unavailable):
            batcher.admission.hold(late)  # passed the door before the others' bodies came in: refused before parsing
        assert late.n == 0 and batcher.admission.reserved == 8

        context = contextvars.Context()
        context.run(DOOR.set, first)
        admitted = context.run(batcher.admission.reserve, 4)
        assert first.n == 0 and batcher.admission.reserved == 8, "admission swaps the held room for its own"
        second.release()  # its request ended before admission (a 400, say)
        admitted.release()
        assert batcher.admission.reserved == 0
        with pytest.raises(TooLarge):
            batcher.admission.reserve(11)  # can never fit: says nothing of the requests to come
        assert batcher.admission._door_images() == 4
        for _ in range(3):
            batcher.admission.reserve(1).release()
        batcher.admission.reserve(2).release()
        for _ in range(200):
            batcher.admission.reserve(1).release()
        assert batcher.admission._door_images() == 1, f"the average crept to {batcher.admission._request_images!r}"
        await batcher.close(5)

    run(main)


def test_request_larger_than_the_queue_is_413_not_a_retry() -> None:
    """An empty queue would not hold it either: a 503 telling the client to retry (and counted as
    shed load, which alerts) would be a lie."""

    async def main() -> None:
        model = Model()
        batcher, labels = make(model, queue=4)
        shed_before = metric("igcv2_rejected_images_total", labels, reason="queue_full")
        with pytest.raises(TooLarge, match="5 images in one request; this model version queues at most 4"):
            await classify(batcher, *range(5))
        assert metric("igcv2_rejected_images_total", labels, reason="queue_full") == shed_before
        assert await classify(batcher, *range(4)) == [0, 1, 2, 3]
        await batcher.close(5)

    run(main)


def test_admitted_requests_hold_their_room_until_queued() -> None:
    """Room is reserved at admission, before decoding: a request admitted is not refused after
    decoding because others were admitted meanwhile, and later ones are refused before theirs."""

    async def main() -> None:
        model = Model()
        batcher, _ = make(model, queue=4)
        first = batcher.admission.reserve(3)  # admitted, still decoding
        held = r"queue full \(0 of 4 images waiting, 3 more held for requests being read or decoded\)"
        with pytest.raises(Unavailable, match=held):
            batcher.admission.reserve(2)
        second = batcher.admission.reserve(1)  # exactly the room left
        assert len(await batcher.submit([np.full((2, 2, 1), i, np.uint8) for i in range(3)], later(), first)) == 3
        first.release()  # a no-op once its images were queued
        second.release()  # its request failed before queueing: the room comes back
        room = batcher.admission.reserve(4)
        with pytest.raises(Unavailable):
            batcher.admission.reserve(1)
        room.release()
        assert batcher.depth == 0 and batcher.admission.reserved == 0
        await batcher.close(5)

    run(main)


def test_close_reports_a_batch_still_computing_and_only_that() -> None:
    """An idle batcher closed at once (a forced shutdown) is not stuck, though its threads have not
    woken yet; one whose model call outlives the timeout is, until that call returns."""

    async def main() -> None:
        idle, _ = make(Model())
        assert await idle.close(0) is True and not idle.computing()
        model = Model(gate=threading.Event())
        busy, _ = make(model)
        request = asyncio.ensure_future(classify(busy, 1))
        await until(model.started.is_set)
        assert await busy.close(0.1) is False and busy.computing()
        with pytest.raises(Unavailable, match="shut down before this image was computed"):
            await request
        model.gate.set()  # type: ignore[union-attr]
        await until(lambda: not busy.computing())

    run(main)


# ----- deadlines -----


def test_deadline_passing_in_the_queue_is_504_and_never_computed() -> None:
    async def main() -> None:
        model = Model(gate=threading.Event())
        batcher, labels = make(model, max_batch_size=8, queue=2)
        before = metric("igcv2_rejected_images_total", labels, reason="deadline")
        first = asyncio.create_task(classify(batcher, 0))
        await until(model.started.is_set)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as info:
            await classify(batcher, 41, 42, timeout=0.05)
        assert 0.045 <= time.monotonic() - started < 0.5
        assert info.value.status_code == 504 and "2 of 2 images" in info.value.message
        assert metric("igcv2_rejected_images_total", labels, reason="deadline") == before + 2
        # The expired images were answered: they must not keep holding the bounded queue.
        assert batcher.depth == 0
        assert metric("igcv2_queue_depth", labels) == 0
        queued = asyncio.create_task(classify(batcher, 1, 2))
        await until(lambda: batcher.depth == 2)
        model.gate.set()  # type: ignore[union-attr]
        assert await first == [0] and await queued == [1, 2]
        await batcher.close(5)
        assert not {41, 42} & model.seen

    run(main)


def test_already_expired_request_is_never_computed() -> None:
    async def main() -> None:
        model = Model()
        batcher, _ = make(model)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit([image(9)], time.monotonic() - 1)
        assert await classify(batcher, 1) == [1]
        await batcher.close(5)
        assert model.batches == [[1]]

    run(main)


def test_only_the_expired_request_of_a_batch_is_dropped() -> None:
    async def main() -> None:
        model = Model(gate=threading.Event())
        batcher, _ = make(model, max_batch_size=8)
        first = asyncio.create_task(classify(batcher, 0))
        await until(model.started.is_set)
        short = asyncio.create_task(classify(batcher, 50, timeout=0.03))
        long = asyncio.create_task(classify(batcher, 60, timeout=30))
        with pytest.raises(DeadlineExceeded):
            await short
        model.gate.set()  # type: ignore[union-attr]
        assert await first == [0] and await long == [60]
        await batcher.close(5)
        assert model.batches == [[0], [60]]

    run(main)


def test_a_request_timed_out_while_its_batch_computes_is_not_counted_as_dropped() -> None:
    """The image is computed (for nobody): igcv2_images_total counts it, the deadline drops do not."""

    async def main() -> None:
        model = Model(gate=threading.Event())
        batcher, labels = make(model)
        dropped = metric("igcv2_rejected_images_total", labels, reason="deadline")
        with pytest.raises(DeadlineExceeded, match="0 of 1 images never reached the model"):
            await classify(batcher, 7, timeout=0.05)
        assert model.batches == [[7]]
        assert metric("igcv2_rejected_images_total", labels, reason="deadline") == dropped
        model.gate.set()  # type: ignore[union-attr]
        await batcher.close(5)
        assert metric("igcv2_images_total", labels) == 1

    run(main)


def test_a_cancelled_request_takes_its_images_out_of_the_queue() -> None:
    """uvicorn cancels requests still running at the shutdown timeout: their images must neither hold
    the bounded queue nor be computed for nobody."""

    async def main() -> None:
        model = Model(gate=threading.Event())
        batcher, labels = make(model, max_batch_size=8, queue=3)
        first = asyncio.create_task(classify(batcher, 0))
        await until(model.started.is_set)
        cancelled = asyncio.create_task(classify(batcher, 41, 42))
        await until(lambda: batcher.depth == 2)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert batcher.depth == 0 and metric("igcv2_queue_depth", labels) == 0
        room = asyncio.create_task(classify(batcher, 1, 2, 3))  # the whole queue is free again
        await until(lambda: batcher.depth == 3)
        model.gate.set()  # type: ignore[union-attr]
        assert await first == [0] and await room == [1, 2, 3]
        await batcher.close(5)
        assert not {41, 42} & model.seen

    run(main)


def test_a_request_whose_client_left_is_withdrawn_and_answered_499() -> None:
    """A client that closes its connection while its images wait: they leave the queue at once, are
    never computed, and count as client_left; one that left before its images were queued never
    queues them; the task's own cancellation stays a cancellation."""

    async def main() -> None:
        model = Model(gate=threading.Event())
        batcher, labels = make(model, max_batch_size=8, queue=3)
        first = asyncio.create_task(classify(batcher, 0))
        await until(model.started.is_set)
        client = Client()
        leaving = asyncio.create_task(batcher.submit([image(41), image(42)], later(), client=client))
        await until(lambda: batcher.depth == 2)
        client.leave()
        with pytest.raises(ClientLeft, match="2 of 2 images never reached the model"):
            await leaving
        assert batcher.depth == 0 and metric("igcv2_rejected_images_total", labels, reason="client_left") == 2
        gone = Client()
        gone.leave()
        with pytest.raises(ClientLeft):
            await batcher.submit([image(43)], later(), client=gone)
        cancelled_client = Client()
        cancelled = asyncio.create_task(batcher.submit([image(44)], later(), client=cancelled_client))
        await until(lambda: batcher.depth == 1)
        cancelled.cancel()
        cancelled_client.leave()  # uvicorn's shutdown cancels, and the connection then drops
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        stayed = Client()
        kept = asyncio.create_task(batcher.submit([image(1)], later(), client=stayed))
        model.gate.set()  # type: ignore[union-attr]
        assert await first == [0] and round(float((await kept)[0][0])) == 1
        stayed.leave()  # after the answer: nothing left to withdraw, nothing raised
        await batcher.close(5)
        assert not {41, 42, 43, 44} & model.seen
        assert metric("igcv2_rejected_images_total", labels, reason="client_left") == 3

    run(main)


# ----- failures and shutdown -----


def test_inference_error_fails_only_its_batch() -> None:
    async def main() -> None:
        model = Model(gate=threading.Event(), poison=13)
        batcher, _ = make(model, max_batch_size=8)
        first = asyncio.create_task(classify(batcher, 0))
        await until(model.started.is_set)
        poisoned = asyncio.create_task(classify(batcher, 13))
        neighbour = asyncio.create_task(classify(batcher, 14))
        await until(lambda: batcher.depth == 2)
        model.gate.set()  # type: ignore[union-attr]
        assert await first == [0]
        for task in (poisoned, neighbour):  # same batch: both fail, with the model's own error
            with pytest.raises(ValueError, match="cannot classify image 13"):
                await task
        assert await classify(batcher, 15) == [15], "the next batch must work"
        await batcher.close(5)
        assert model.batches == [[0], [13, 14], [15]]

    run(main)


def test_a_request_failed_by_one_batch_takes_its_other_images_out_of_the_queue() -> None:
    async def main() -> None:
        model = Model(compute_s=0.05, poison=13)
        batcher, labels = make(model, max_batch_size=2)
        with pytest.raises(ValueError, match="cannot classify image 13"):
            await classify(batcher, 13, 14, 15, 16, 17, 18)
        # [15, 16] may have been taken as [13, 14] failed; [17, 18] waited behind it and must be gone.
        assert batcher.depth == 0 and metric("igcv2_queue_depth", labels) == 0
        assert await classify(batcher, 1) == [1]
        await batcher.close(5)
        assert {17, 18}.isdisjoint(model.seen) and [1] in model.batches

    run(main)


def test_close_finishes_queued_work_then_stops() -> None:
    async def main() -> None:
        model = Model(gate=threading.Event())
        batcher, labels = make(model, max_batch_size=2)
        first = asyncio.create_task(classify(batcher, 0))
        await until(model.started.is_set)
        queued = [asyncio.create_task(classify(batcher, i)) for i in (1, 2, 3)]
        await until(lambda: batcher.depth == 3)
        closing = asyncio.create_task(batcher.close(10))
        await asyncio.sleep(0.01)
        with pytest.raises(Unavailable, match="shutting down"):
            await classify(batcher, 99)
        model.gate.set()  # type: ignore[union-attr]
        await closing
        assert await first == [0] and [await t for t in queued] == [[1], [2], [3]]
        assert all(drain.done() for drain in batcher._drains)
        assert batcher.depth == 0 and metric("igcv2_queue_depth", labels) == 0
        assert 99 not in model.seen

    run(main)


def test_close_timeout_answers_every_waiting_request() -> None:
    """An instance stuck past the shutdown timeout: queued and in-flight requests get 503, none hangs."""

    async def main() -> None:
        model = Model(gate=threading.Event())  # never opened
        batcher, _ = make(model, max_batch_size=1)
        in_flight = asyncio.create_task(classify(batcher, 0, timeout=30))
        await until(model.started.is_set)
        queued = asyncio.create_task(classify(batcher, 1, timeout=30))
        await until(lambda: batcher.depth == 1)
        await batcher.close(0.05)
        for task in (in_flight, queued):
            with pytest.raises(Unavailable):
                await asyncio.wait_for(task, 2.0)
        model.gate.set()  # type: ignore[union-attr]  # let the thread go

    run(main)


# ----- metrics -----


def test_metrics_follow_the_queue_and_the_batches() -> None:
    async def main() -> None:
        model = Model(gate=threading.Event())
        batcher, labels = make(model, max_batch_size=4, queue=10)
        assert metric("igcv2_queue_capacity", labels) == 10
        assert metric("igcv2_queue_depth", labels) == 0
        first = asyncio.create_task(classify(batcher, 0))
        await until(model.started.is_set)
        assert metric("igcv2_queue_depth", labels) == 0
        queued = asyncio.create_task(classify(batcher, 1, 2, 3))
        await until(lambda: batcher.depth == 3)
        assert metric("igcv2_queue_depth", labels) == 3
        model.gate.set()  # type: ignore[union-attr]
        await first
        await queued
        await batcher.close(5)
        assert model.batches == [[0], [1, 2, 3]]
        assert metric("igcv2_queue_depth", labels) == 0
        assert metric("igcv2_batch_size_count", labels) == 2
        assert metric("igcv2_batch_size_sum", labels) == 4
        assert metric("igcv2_batch_size_bucket", labels, le="1.0") == 1
        assert metric("igcv2_batch_size_bucket", labels, le="2.0") == 1
        assert metric("igcv2_batch_size_bucket", labels, le="4.0") == 2
        assert metric("igcv2_images_total", labels) == 4
        assert metric("igcv2_queue_duration_seconds_count", labels) == 4
        assert metric("igcv2_inference_duration_seconds_count", labels) == 2
        assert metric("igcv2_inference_duration_seconds_sum", labels) > 0

    run(main)
