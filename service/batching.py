"""DynamicBatcher: one bounded queue per model version, drained on each model instance's own thread.

Policy (after Triton / TF Serving, avoiding TorchServe's and LitServe's worker-started timer):
* an instance that is idle takes what is queued at once, so a lone request waits for nothing;
* while instances are busy, arriving images gather into the next batch (up to ``max_batch_size``);
* a batch is padded to the smallest compiled bucket that holds it, so when the instances' measured
  bucket times say a smaller full bucket computes images markedly faster, an instance takes that
  many and leaves the rest for the next batch (:func:`batch_cuts`), and when a few more images
  would fill the bucket it waits for them, no longer than the padding would cost (:func:`fill_waits`);
* with ``max_queue_delay_s`` > 0 an instance waits for a fuller batch, but never longer than that
  delay *measured from the oldest queued image's arrival*, and not past the point where a queued
  image's deadline would leave no time to compute it (the largest bucket's time);
* the queue is bounded in images: a request that does not fit is refused at once (503 with
  Retry-After), nothing blocks; an image whose request deadline has passed is never computed;
* a batch is one tensor, so one input kind (uint8 images, or the v2 protocol's normalised float
  tensors): the oldest image's kind, gathered from the whole queue, while the other kind keeps its
  place at the head for the next batch (alternating kinds no longer make batches of one).

Batches are formed on the inference threads, not on the event loop: a thread that finishes a batch
takes the next one at once, whatever the loop is busy with (a burst of arrivals to parse and decode),
and hands the results back with one ``call_soon_threadsafe`` per batch. With batches formed by a
task on the loop, the model waited behind every burst: paced clients at 0.8x the closed-loop
saturation already saturated the server (p50 236 ms, now 27 ms; benchmarks/RESULTS.md, run K).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service import metrics
from service.client import Client
from service.errors import ClientLeft, DeadlineExceeded, TooLarge, Unavailable
from service.stats import InferenceStats

log = logging.getLogger("igcv2.batching")

# The room held for a request from its body's arrival until its admission (contextvars follow the
# request through the layers and routes between the two, all in the request's own task).
DOOR: ContextVar[Reservation | None] = ContextVar("igcv2_door", default=None)


class Instance(Protocol):
    """One model instance: :meth:`run` computes a batch, always on ``executor``'s one thread."""

    executor: Executor

    def run(self, inputs: list[np.ndarray]) -> np.ndarray: ...


@dataclass(eq=False)
class _Item:
    image: np.ndarray
    deadline: float
    arrival: float = field(default_factory=time.monotonic)
    future: asyncio.Future[np.ndarray] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    abandoned: bool = False  # its request was answered already (deadline): the threads skip it
    started: float = 0.0  # when it left the queue for a batch (statistics)
    computed: tuple[float, float] | None = None  # its batch's (start, end) (statistics)


def batch_cuts(bucket_seconds: Mapping[int, float], margin: float = 1.1) -> list[int]:
    """``cuts[n]``: how many of ``n`` queued images one batch takes (n up to the largest bucket).

    A batch of k images costs one call of the smallest bucket >= k. All n is the rule; the first
    batch of a split is taken instead when computing the n in several batches takes ``margin``
    times less time or better. On a 2-core CPU, for instance, 20 queued images go as 16 now and 4
    next (5.6 + 2.1 ms) rather than padded to 32 (13.4 ms); on a GPU, where a call costs nearly the
    same at any size, nothing is split. The margin keeps warm-up timing noise from splitting batches.
    """
    buckets = sorted(bucket_seconds)
    call = [0.0] + [bucket_seconds[next(b for b in buckets if b >= k)] for k in range(1, buckets[-1] + 1)]
    clear = [0.0]  # clear[n]: the least time to compute n queued images
    cuts = [0]
    for n in range(1, len(call)):
        first = min(range(1, n), key=lambda k: (call[k] + clear[n - k], -k), default=n)
        split_s = call[first] + clear[n - first]
        cuts.append(first if call[n] > margin * split_s else n)
        clear.append(min(call[n], split_s))
    return cuts


def fill_waits(bucket_seconds: Mapping[int, float], cuts: Sequence[int]) -> list[tuple[float, int]]:
    """``waits[n]``: (seconds worth waiting for more images, the bucket they would fill) when ``n``
    queued images would be padded.

    A batch of n padded to bucket b computes n images in b's time; waiting w for the b - n that fill
    it computes b images in w more. That is no worse per image while w <= t_b * (b - n) / n, so an
    instance waits that long for arrivals to fill the bucket (never when n fills it or is split by
    ``cuts``). Without it, an instance that takes whatever is queued the moment it frees up computes
    12 images padded to 16 while the next 4 are still being read off the network (-14% at c=32).
    """
    buckets = sorted(bucket_seconds)
    waits = [(0.0, 0)]
    for n in range(1, len(cuts)):
        b = next(b for b in buckets if b >= n)
        waits.append((bucket_seconds[b] * (b - n) / n if cuts[n] == n else 0.0, b))
    return waits


class Reservation:
    """Room for ``n`` images held in a queue for a request, from the arrival of its body
    (:meth:`Admission.hold`) or its admission until its images are queued: a request admitted
    before decoding is not then refused after it (wasted parsing and decoding, under overload, of
    exactly the requests that could have been served)."""

    def __init__(self, admission: Admission, n: int) -> None:
        self.admission = admission
        self.n = n

    def release(self) -> None:
        """Give the room back (at once when the request fails first; idempotent)."""
        if self.n:
            self.admission.give_back(self.n)
        self.n = 0

    def buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Memory for this request's ``n`` inputs of ``shape``: the decoder fills it and the batcher takes it as it
        is (a front-end's reservation hands out shared memory that the executor reads)."""
        return np.empty((self.n, *shape), dtype)


class Admission:
    """A model version's queue bound: images queued plus images held for requests being read or decoded
    (:class:`Reservation`) never exceed ``max_queue_size``. A request that does not fit is refused at
    once (503 with Retry-After), before its body is read when it can be.

    This one counts in its process, on its event loop. With several front-ends the counts live in
    shared memory (:class:`service.executor.shared.SharedAdmission`), one bound for them all.
    """

    def __init__(self, max_queue_size: int, labels: dict[str, str], stats: InferenceStats) -> None:
        self.max_queue_size = max_queue_size
        self.closed = False
        self.stats = stats
        self._request_images = 1.0  # moving average of images per request at admission (event loop only)
        self._rejected_full = metrics.REJECTED.labels(**labels, reason="queue_full")
        self.queued = 0  # images in the queue (event loop and the batcher's lock)
        self.reserved = 0  # room held for requests being parsed or decoded (event loop only)

    # ----- the counts: in this process here, in shared memory for front-ends -----

    def counts(self) -> tuple[int, int]:
        """(queued, reserved) now."""
        return self.queued, self.reserved

    def take_if_room(self, n: int) -> tuple[int, int] | None:
        """Hold room for ``n`` images if they fit (None), else leave everything as it is and return the
        (queued, reserved) counts that refused them: one step, so nobody takes the same room in between."""
        if self.queued + self.reserved + n > self.max_queue_size:
            return self.queued, self.reserved
        self.reserved += n
        return None

    def give_back(self, n: int) -> None:
        self.reserved -= n

    def admit(self, reservation: Reservation | None, n: int) -> None:
        """``n`` images enter the queue, into the room ``reservation`` held for them (checked now when
        it held none); 503 if the queue closed meanwhile. Called under the batcher's lock."""
        if reservation is not None:
            reservation.release()  # and queued in the same step: no other request runs in between
        self.check_room(n)
        self.queued += n

    def left(self, n: int) -> None:
        """``n`` images left the queue (batched, expired or withdrawn)."""
        self.queued -= n

    def record_refusal(self) -> None:
        """A request refused for want of room: a failure in the statistics (Triton counts them)."""
        self.stats.record_failure(0.0)

    # ----- the checks -----

    def check_room(self, n: int, hold: bool = False) -> None:
        """503 at once unless ``n`` more images fit in the queue beside those queued and those held
        for admitted requests (and, with ``hold``, hold room for them): an overloaded server sheds a
        request before spending CPU on it."""
        if self.closed:
            raise Unavailable("model version is shutting down or unloading; retry on another replica", 1)
        if n > self.max_queue_size:  # would never fit: retrying cannot help
            self.record_refusal()
            raise TooLarge(
                f"{n} images in one request; this model version queues at most {self.max_queue_size} (max_queue_size)"
            )
        refused = self.take_if_room(n) if hold else self._refusal(n)
        if refused is not None:
            queued, reserved = refused
            self._rejected_full.inc(n)
            self.record_refusal()
            waiting = f"{queued} of {self.max_queue_size} images waiting"
            held = f", {reserved} more held for requests being read or decoded" if reserved else ""
            raise Unavailable(f"queue full ({waiting}{held}); retry later", 1)

    def _refusal(self, n: int) -> tuple[int, int] | None:
        queued, reserved = self.counts()
        return (queued, reserved) if queued + reserved + n > self.max_queue_size else None

    def door(self) -> Reservation:
        """The check before a request's body is read: 503 unless there is room for as many images
        as requests have lately brought (how many this one holds is not known yet). Returns an
        empty reservation for :meth:`hold` to fill once the body is in, and admission to empty.

        A check for one image let every request through while a few places were free, or all of
        them while the queue sat a few images short of full: each was then refused at admission,
        after its body was read and parsed, and under overload those refusals cost the event loop
        as much as answers; it fell behind, /metrics went unanswered for 8-27 s and the p50 stayed
        at 700 ms (benchmarks/RESULTS.md, run Q)."""
        self.check_room(self._door_images())
        return self.reservation(0)

    def hold(self, room: Reservation) -> None:
        """Once the request's body is in, before it is parsed: hold room for as many images as
        requests have lately brought until admission, or 503. Requests between the two never
        outnumber the room, and an upload in progress (slow, or stalled on purpose) holds none."""
        n = self._door_images()
        self.check_room(n, hold=True)
        room.n += n

    def _door_images(self) -> int:
        # The average creeps towards a whole number from above and stops an ulp short of it.
        return math.ceil(self._request_images - 1e-9)

    def reserve(self, n: int) -> Reservation:
        """Admission: the room held since the body came in (if any) given back, :meth:`check_room`
        for ``n``, then the room held until the batcher queues the images."""
        if 0 < n <= self.max_queue_size:  # not a request that can never fit (413): it says nothing of the next
            self._request_images += 0.2 * (n - self._request_images)
        if (door := DOOR.get()) is not None:
            door.release()
        self.check_room(n, hold=True)
        return self.reservation(n)

    def reservation(self, n: int) -> Reservation:
        return Reservation(self, n)


class DynamicBatcher:
    def __init__(
        self,
        instances: Sequence[Instance],
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        model: str,
        version: int,
        bucket_seconds: Mapping[int, float] | None = None,
        admission: Callable[[InferenceStats], Admission] | None = None,
    ) -> None:
        """``admission`` makes the queue's bound from the batcher's statistics (default: counted in this process)."""
        self.max_batch_size = max_batch_size
        self.cuts = batch_cuts(bucket_seconds) if bucket_seconds else list(range(max_batch_size + 1))
        self.fill_waits = fill_waits(bucket_seconds, self.cuts) if bucket_seconds else [(0.0, 0)] * len(self.cuts)
        self.max_queue_delay_s = max_queue_delay_s
        self._longest_call = max(bucket_seconds.values()) if bucket_seconds else 0.0  # the largest bucket's time
        self.max_queue_size = max_queue_size
        self._instances = list(instances)
        self._queue: deque[_Item] = deque()  # guarded by _changed, as are _closed and _in_flight
        self._changed = threading.Condition(threading.Lock())
        self._waiting: list[int] = []  # for each waiting instance, the queue depth that ends its wait
        self._closed = False
        self._in_flight: dict[int, list[_Item]] = {}  # batches being computed, by id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drains: list[Future[None]] = []
        self._labels = {"model": model, "version": str(version)}
        self.stats = InferenceStats()
        self.admission = (admission or (lambda stats: Admission(max_queue_size, self._labels, stats)))(self.stats)
        # Metric children looked up once: labels() takes a lock and builds a key on every call.
        self._depth = metrics.QUEUE_DEPTH.labels(**self._labels)
        self._queue_duration = metrics.QUEUE_DURATION.labels(**self._labels)
        self._inference_duration = metrics.INFERENCE_DURATION.labels(**self._labels)
        self._batch_size = metrics.BATCH_SIZE.labels(**self._labels)
        self._images = metrics.IMAGES.labels(**self._labels)
        metrics.QUEUE_CAPACITY.labels(**self._labels).set(max_queue_size)
        self._depth.set(0)

    def start(self) -> None:
        """Start draining on every instance's thread; call on the event loop that submits. Closed
        first (a shutdown while its model loaded), it starts nothing."""
        if self._closed:
            return
        self._loop = asyncio.get_running_loop()
        self._drains = [instance.executor.submit(self._drain, instance) for instance in self._instances]

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(
        self,
        images: list[np.ndarray],
        deadline: float,
        reservation: Reservation | None = None,
        client: Client | None = None,
    ) -> list[np.ndarray]:
        """Queue ``images`` (into the room ``reservation`` held) and wait for their outputs (one
        array per image), or raise 503/504, or 499 once ``client`` has left (its images withdrawn)."""
        items = [_Item(image, deadline) for image in images]
        with self._changed:
            self.admission.admit(reservation, len(items))
            # An instance gathering a fuller batch (a short queue) plans to wake at _gather_until(); a
            # deadline that must end the gathering sooner wakes it.
            urgent = bool(
                self.max_queue_delay_s
                and self._waiting
                and 0 < len(self._queue) < self.max_batch_size
                and deadline - self._longest_call < self._gather_until()
            )
            self._queue.extend(items)
            self._depth.set(len(self._queue))  # the admission counted them
            if self._waiting and (urgent or len(self._queue) >= min(self._waiting)):
                self._changed.notify_all()  # not one: it could be an instance waiting for more
        gathered = asyncio.gather(*(item.future for item in items))
        if client is not None:
            client.on_leave(gathered.cancel)
        try:
            outputs = await asyncio.wait_for(gathered, max(0.0, deadline - time.monotonic()))
        except BaseException as exc:  # CancelledError too: the request is gone either way
            uncomputed = self._withdraw(items)
            if gathered.done() and not gathered.cancelled():
                gathered.exception()  # retrieved: asyncio would log it as never retrieved
            # Cancelled by the client's leaving (gathered.cancel), not by a cancellation of this task
            left = client is not None and client.left and not asyncio.current_task().cancelling()
            if isinstance(exc, asyncio.CancelledError) and not left:
                raise
            self.stats.record_failure(time.monotonic() - items[0].arrival)
            if isinstance(exc, asyncio.CancelledError):
                metrics.REJECTED.labels(**self._labels, reason="client_left").inc(uncomputed)
                raise ClientLeft(
                    f"the client left before its answer; {uncomputed} of {len(items)} images never reached the model"
                ) from None
            if isinstance(exc, (TimeoutError, DeadlineExceeded)):
                metrics.REJECTED.labels(**self._labels, reason="deadline").inc(uncomputed)
                raise DeadlineExceeded(
                    f"deadline passed before the answer; {uncomputed} of {len(items)} images never reached the model"
                ) from exc
            raise
        finally:
            if client is not None:
                client.on_leave(None)
        if items:
            batches = {item.computed for item in items if item.computed is not None}
            self.stats.record_success(
                time.monotonic() - items[0].arrival,
                max(i.started - i.arrival for i in items),
                sum(end - start for start, end in batches),
            )
        return outputs

    def _withdraw(self, items: list[_Item]) -> int:
        """Take a request's images out of the queue once it is answered without them (deadline,
        another batch's error, cancellation), so they hold neither the bounded queue nor compute
        time; returns how many were never taken into a batch."""
        with self._changed:
            for item in items:
                item.abandoned = True
                item.future.cancel()
            before = len(self._queue)
            live = [item for item in self._queue if not item.abandoned]
            self._queue.clear()
            self._queue.extend(live)
            self._shrunk(before)
            return sum(1 for item in items if not item.started)

    # ----- on the inference threads -----

    def _drain(self, instance: Instance) -> None:
        """Compute batch after batch until closed and empty; runs as one long job on the instance's thread."""
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            started = time.perf_counter()
            try:
                outputs = instance.run([item.image for item in batch])
            except Exception as exc:
                log.exception("inference failed for a batch of %d on %s", len(batch), self._labels)
                self._computed(batch)
                self._post(self._answer, batch, exc)
                continue
            self._computed(batch)
            elapsed = time.perf_counter() - started
            self._inference_duration.observe(elapsed)
            self._batch_size.observe(len(batch))
            self._images.inc(len(batch))
            for item in batch:
                item.computed = (started, started + elapsed)
            self._post(self._answer, batch, outputs, elapsed)

    def _next_batch(self) -> list[_Item] | None:
        """The next batch (waiting for one; empty when every queued image had expired or was
        abandoned), or None once closed and drained."""
        expired: list[_Item] = []
        batch: list[_Item] = []
        with self._changed:
            while not self._queue:
                if self._closed:
                    return None
                self._wait(1)
            if self.max_queue_delay_s > 0:
                while self._queue and len(self._queue) < self.max_batch_size and not self._closed:
                    remaining = self._gather_until() - time.monotonic()
                    if remaining <= 0 or not self._wait(self.max_batch_size, remaining):
                        break
            looked = time.monotonic()
            while self._queue and not self._closed and not self.max_queue_delay_s:  # the delay is the whole wait
                worth, bucket = self.fill_waits[min(len(self._queue), self.max_batch_size)]
                remaining = looked + worth - time.monotonic()
                if remaining <= 0 or not self._wait(bucket, remaining):
                    break
            now = time.monotonic()
            size = self.cuts[min(len(self._queue), self.max_batch_size)]
            other_kind: list[_Item] = []  # one input kind per batch (uint8 images or float tensors): one tensor
            before = len(self._queue)
            while self._queue and len(batch) < size:
                item = self._queue.popleft()
                if item.abandoned:
                    continue
                if item.deadline <= now:
                    expired.append(item)
                    continue
                if batch and item.image.dtype != batch[0].image.dtype:
                    other_kind.append(item)  # stays queued, in order, for a batch of its own kind
                    continue
                item.started = now
                batch.append(item)
            self._queue.extendleft(reversed(other_kind))
            self._shrunk(before)
            if batch:
                self._in_flight[id(batch)] = batch
        for item in batch:
            self._queue_duration.observe(now - item.arrival)
        if expired:
            self._post(self._expire, expired)
        return batch

    def _shrunk(self, before: int) -> None:
        """The queue went from ``before`` images to what it holds now; call holding ``_changed``."""
        self.admission.left(before - len(self._queue))
        self._depth.set(len(self._queue))

    def _computed(self, batch: list[_Item]) -> None:
        """The batch left the model: its answer is on its way to the loop (not close()'s to give)."""
        with self._changed:
            self._in_flight.pop(id(batch), None)

    def _gather_until(self) -> float:
        """The end of the wait for a fuller batch: the oldest image's delay, or sooner when a queued
        image's deadline would pass before a batch started then could be computed."""
        return min(
            self._queue[0].arrival + self.max_queue_delay_s,
            min(item.deadline for item in self._queue) - self._longest_call,
        )

    def _wait(self, depth: int, timeout: float | None = None) -> bool:
        """Wait, holding ``_changed``, until the queue holds ``depth`` images or close(); False on
        timeout. Arrivals that leave the queue short of every waiter's depth wake no thread."""
        self._waiting.append(depth)
        try:
            return self._changed.wait(timeout)
        finally:
            self._waiting.remove(depth)

    def _post(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the event loop (futures belong to it)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is left waiting
            log.warning("event loop closed before a batch of %s was answered", self._labels)

    # ----- on the event loop -----

    def _answer(self, batch: list[_Item], outputs: np.ndarray | Exception, elapsed: float = 0.0) -> None:
        if isinstance(outputs, Exception):
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(outputs)
            return
        self.stats.record_batch(len(batch), elapsed)
        for item, output in zip(batch, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(output)

    @staticmethod
    def _expire(items: list[_Item]) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(DeadlineExceeded("deadline passed while queued"))

    async def close(self, timeout: float) -> bool:
        """Stop taking requests, finish what is queued (up to ``timeout``), stop draining. False when
        a batch was still computing at the timeout (its images are answered 503 all the same)."""
        with self._changed:
            self._closed = self.admission.closed = True
            self._changed.notify_all()
        if self._drains:
            await asyncio.wait([asyncio.wrap_future(f) for f in self._drains], timeout=timeout)
        with self._changed:
            computing = [item for batch in self._in_flight.values() for item in batch]
            unanswered = [*self._queue, *computing]
            before = len(self._queue)
            self._queue.clear()
            self._shrunk(before)
        if computing:
            log.warning(
                "%d image(s) of %s still computing after %.1fs; answering 503", len(computing), self._labels, timeout
            )
        for item in unanswered:
            if not item.future.done():
                item.future.set_exception(Unavailable("shut down before this image was computed", 1))
        return not computing

    def computing(self) -> bool:
        """Whether a batch is inside the model now (after close(): a call that has not returned)."""
        with self._changed:
            return bool(self._in_flight)
