"""DynamicBatcher: one bounded queue per model version, drained by one worker per model instance.

Policy (after Triton / TF Serving, avoiding TorchServe's and LitServe's worker-started timer):
* a worker that is idle takes what is queued at once, so a lone request waits for nothing;
* while workers are busy, arriving images gather into the next batch (up to ``max_batch_size``);
* a batch is padded to the smallest compiled bucket that holds it, so when the instances' measured
  bucket times say a smaller full bucket computes images markedly faster, a worker takes that many
  and leaves the rest for the next batch (:func:`batch_cuts`);
* with ``max_queue_delay_s`` > 0 a worker waits for a fuller batch, but never longer than that
  delay *measured from the oldest queued image's arrival*;
* the queue is bounded in images: a request that does not fit is refused at once (503 with
  Retry-After), nothing blocks; an image whose request deadline has passed is never computed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from service import metrics
from service.errors import DeadlineExceeded, Unavailable
from service.stats import InferenceStats

log = logging.getLogger("igcv2.batching")
InferFn = Callable[[list[np.ndarray]], Awaitable[np.ndarray]]


@dataclass(eq=False)
class _Item:
    image: np.ndarray
    deadline: float
    arrival: float = field(default_factory=time.monotonic)
    future: asyncio.Future[np.ndarray] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
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


class DynamicBatcher:
    def __init__(
        self,
        instances: Sequence[InferFn],
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        model: str,
        version: int,
        bucket_seconds: Mapping[int, float] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.cuts = batch_cuts(bucket_seconds) if bucket_seconds else list(range(max_batch_size + 1))
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._instances = list(instances)
        self._queue: deque[_Item] = deque()
        self._changed = asyncio.Condition()
        self._closed = False
        self._workers: list[asyncio.Task[None]] = []
        self._labels = {"model": model, "version": str(version)}
        self.stats = InferenceStats()
        self._rejected_full = metrics.REJECTED.labels(**self._labels, reason="queue_full")  # hot under overload
        metrics.QUEUE_CAPACITY.labels(**self._labels).set(max_queue_size)
        metrics.QUEUE_DEPTH.labels(**self._labels).set(0)

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(infer)) for infer in self._instances]

    @property
    def depth(self) -> int:
        return len(self._queue)

    def check_room(self, n: int) -> None:
        """503 at once unless ``n`` more images fit in the queue. The engine asks before decoding,
        so an overloaded server sheds a request before spending CPU on it."""
        if self._closed:
            raise Unavailable("model version is shutting down or unloading; retry on another replica", 1)
        if len(self._queue) + n > self.max_queue_size:
            self._rejected_full.inc(n)
            self.stats.record_failure(0.0)
            waiting = f"{len(self._queue)} of {self.max_queue_size} images waiting"
            raise Unavailable(f"queue full ({waiting}); retry later", 1)

    async def submit(self, images: list[np.ndarray], deadline: float) -> list[np.ndarray]:
        """Queue ``images`` and wait for their outputs (one array per image), or raise 503/504."""
        self.check_room(len(images))
        items = [_Item(image, deadline) for image in images]
        async with self._changed:
            self._queue.extend(items)
            metrics.QUEUE_DEPTH.labels(**self._labels).set(len(self._queue))
            self._changed.notify()
        futures = [item.future for item in items]
        try:
            outputs = await asyncio.wait_for(asyncio.gather(*futures), max(0.0, deadline - time.monotonic()))
        except (TimeoutError, DeadlineExceeded) as exc:
            for f in futures:
                f.cancel()
            # Answered 504: the dropped images must not keep holding the bounded queue (or its depth).
            live = [item for item in self._queue if not item.future.done()]
            self._queue.clear()
            self._queue.extend(live)
            metrics.QUEUE_DEPTH.labels(**self._labels).set(len(self._queue))
            uncomputed = sum(1 for f in futures if f.cancelled())
            metrics.REJECTED.labels(**self._labels, reason="deadline").inc(uncomputed)
            self.stats.record_failure(time.monotonic() - items[0].arrival)
            raise DeadlineExceeded(f"deadline passed before {uncomputed} of {len(items)} images were computed") from exc
        except Exception:
            self.stats.record_failure(time.monotonic() - items[0].arrival)
            raise
        if items:
            batches = {item.computed for item in items if item.computed is not None}
            self.stats.record_success(time.monotonic() - items[0].arrival, max(i.started - i.arrival for i in items),
                                      sum(end - start for start, end in batches))
        return outputs

    async def _next_batch(self) -> list[_Item] | None:
        async with self._changed:
            while not self._queue:
                if self._closed:
                    return None
                await self._changed.wait()
            if self.max_queue_delay_s > 0:
                while len(self._queue) < self.max_batch_size and not self._closed:
                    remaining = self._queue[0].arrival + self.max_queue_delay_s - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._changed.wait(), remaining)
                    except TimeoutError:
                        break
            batch: list[_Item] = []
            now = time.monotonic()
            size = self.cuts[min(len(self._queue), self.max_batch_size)]
            while self._queue and len(batch) < size:
                if batch and self._queue[0].image.dtype != batch[0].image.dtype:
                    break  # one input kind per batch (uint8 images or normalised float tensors): one tensor
                item = self._queue.popleft()
                if item.future.done():  # its request already gave up (deadline)
                    continue
                if item.deadline <= now:
                    item.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                    continue
                metrics.QUEUE_DURATION.labels(**self._labels).observe(now - item.arrival)
                item.started = now
                batch.append(item)
            metrics.QUEUE_DEPTH.labels(**self._labels).set(len(self._queue))
            return batch

    async def _work(self, infer: InferFn) -> None:
        while (batch := await self._next_batch()) is not None:
            if not batch:
                continue
            started = time.perf_counter()
            try:
                outputs = await infer([item.image for item in batch])
            except asyncio.CancelledError:  # close() timed out: answer this batch rather than leave it hanging
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(Unavailable("shut down before this image was computed", 1))
                raise
            except Exception as exc:
                log.exception("inference failed for a batch of %d on %s", len(batch), self._labels)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            elapsed = time.perf_counter() - started
            metrics.INFERENCE_DURATION.labels(**self._labels).observe(elapsed)
            metrics.BATCH_SIZE.labels(**self._labels).observe(len(batch))
            metrics.IMAGES.labels(**self._labels).inc(len(batch))
            self.stats.record_batch(len(batch), elapsed)
            span = (started, started + elapsed)
            for item, output in zip(batch, outputs, strict=True):
                item.computed = span
                if not item.future.done():
                    item.future.set_result(output)

    async def close(self, timeout: float) -> None:
        """Stop taking requests, finish what is queued (up to ``timeout``), stop the workers."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._workers:
            _, pending = await asyncio.wait(self._workers, timeout=timeout)
            for task in pending:
                task.cancel()
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(Unavailable("shut down before this image was computed", 1))
        self._queue.clear()
        metrics.QUEUE_DEPTH.labels(**self._labels).set(0)
