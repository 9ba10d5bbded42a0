"""Memory shared by the front-ends and the executor: pixels (:class:`Arena`) and queue bounds (:class:`Ledger`).

Both are anonymous memory files (``memfd_create``), handed over on the executor's Unix socket
(SCM_RIGHTS): nothing is ever named in /dev/shm, so nothing can be left there, whoever dies when. A
file's memory goes once the last process holding it closes it: a front-end's arena when the front-end
and the executor's views of it are gone, the ledger with the executor that made it.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from service.batching import Admission, Reservation
from service.errors import Unavailable
from service.stats import InferenceStats

ARENA_BYTES = 1 << 30  # address space, not memory: a memfd's pages exist once written (the images in flight)
ALIGN = 64
MAX_FRONTENDS = 64  # Settings.workers' bound
LEDGER_ROWS = 1024  # model versions loaded in one executor's life (rows are never reused: see Ledger)
QUEUED, HELD, REFUSED, FIRST_FRONTEND = range(4)
ROW_CELLS = FIRST_FRONTEND + MAX_FRONTENDS


def memfd(name: str, size: int) -> int:
    """A new anonymous memory file of ``size`` bytes (no page is allocated until written)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


class Arena:
    """A front-end's pixel memory. Each request gets one block for all its images: the decoder writes
    into it, the executor's batcher copies from it into the batch, and the block comes back once the
    executor has answered the request (or is gone).

    First fit over a sorted free list, merged on free: a handful of blocks are in use at a time.
    """

    def __init__(self, size: int = ARENA_BYTES) -> None:
        self.fd = memfd("igcv2-arena", size)
        self.memory = mmap.mmap(self.fd, size)
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted by offset

    def allocate(self, nbytes: int) -> int:
        """The offset of a block of ``nbytes``; 503 when no block is free (more in flight than the queues hold)."""
        nbytes = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for i, (offset, length) in enumerate(self._free):
            if length >= nbytes:
                if length == nbytes:
                    del self._free[i]
                else:
                    self._free[i] = (offset + nbytes, length - nbytes)
                return offset
        raise Unavailable(f"no shared memory left for {nbytes} bytes of images ({self.size} in flight); retry", 1)

    def free(self, offset: int, nbytes: int) -> None:
        nbytes = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        i = bisect.bisect(self._free, (offset, nbytes))
        if i < len(self._free) and offset + nbytes == self._free[i][0]:  # merge with the next free block
            nbytes += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # ...and the previous one
            offset, nbytes = self._free[i - 1][0], self._free[i - 1][1] + nbytes
            i -= 1
            del self._free[i]
        self._free.insert(i, (offset, nbytes))

    def view(self, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.ndarray(shape, dtype, buffer=self.memory, offset=offset)

    def close(self) -> None:
        os.close(self.fd)


def view_of(fd: int) -> mmap.mmap:
    """The executor's mapping of a front-end's arena (its pages stay while a view of them lives)."""
    return mmap.mmap(fd, os.fstat(fd).st_size)


class Ledger:
    """The queue bound of every model version, shared by the executor and every front-end: per version,
    the images queued in the executor (or on their way there), the images held for requests front-ends
    are reading or decoding, and who holds them. Checked and taken in one step under a file lock (the
    kernel drops an ``flock`` when its holder dies; each process opens the lock file itself, since a lock
    belongs to an open file, and a descriptor passed over the socket would share one).

    Rows are never reused while the executor lives: a front-end may still give back room on a row of a
    version that was unloaded, which must not land on another version.
    """

    def __init__(self, fd: int, lock_path: Path) -> None:
        self.fd = fd
        self.memory = mmap.mmap(fd, LEDGER_ROWS * ROW_CELLS * 8)
        self.cells = memoryview(self.memory).cast("q")
        self._lock = open(lock_path, "ab")  # noqa: SIM115 (lives as long as the ledger; closed with it, or by the GC)

    @classmethod
    def create(cls, lock_path: Path) -> Ledger:
        """The executor's: a new ledger, whose descriptor it hands to every front-end."""
        return cls(memfd("igcv2-ledger", LEDGER_ROWS * ROW_CELLS * 8), lock_path)

    @classmethod
    def open(cls, fd: int, lock_path: Path) -> Ledger:
        """A front-end's view of the executor's ledger (``fd`` is taken: the mapping outlives it). Nothing here
        is ever closed by hand: a reservation still held when its executor died gives its room back into the
        old memory, which goes once the last such object does."""
        try:
            return cls(fd, lock_path)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[memoryview]:
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            yield self.cells
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def forget_frontend(self, frontend: int) -> None:
        """A front-end is gone: the room it held on every row comes back."""
        with self.locked() as cells:
            for base in range(0, LEDGER_ROWS * ROW_CELLS, ROW_CELLS):
                if held := cells[base + FIRST_FRONTEND + frontend]:
                    cells[base + HELD] -= held
                    cells[base + FIRST_FRONTEND + frontend] = 0

    def dequeued(self, row: int, n: int) -> None:
        """``n`` images counted as queued on ``row`` are no longer (computed, expired, withdrawn, refused)."""
        if n:
            with self.locked() as cells:
                cells[row * ROW_CELLS + QUEUED] -= n

    def close(self) -> None:
        """The executor's, at its end."""
        self.cells.release()
        self.memory.close()
        self._lock.close()
        os.close(self.fd)


class SharedReservation(Reservation):
    """A front-end's room for a request, and the block of its arena that the request's images go to. The
    block comes back with the room unless the request was sent (the executor's answer gives it back then)."""

    def __init__(self, admission: Admission, n: int, arena: Arena) -> None:
        super().__init__(admission, n)
        self.arena = arena
        self.block: tuple[int, int] | None = None  # (offset, bytes)

    def buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        self.free()
        nbytes = self.n * int(np.prod(shape)) * dtype.itemsize
        self.block = (self.arena.allocate(nbytes), nbytes)
        return self.arena.view(self.block[0], (self.n, *shape), dtype)

    def release(self) -> None:
        super().release()
        self.free()

    def free(self) -> None:
        if self.block is not None:
            self.arena.free(*self.block)
            self.block = None


class SharedAdmission(Admission):
    """A model version's bound counted in the :class:`Ledger`, as seen by one front-end (``frontend``) or by
    the executor (``frontend`` None).

    A front-end takes and gives back room as a single process does, and turns the room it holds into
    queued images in the same step as it sends them (:meth:`send`); the executor counts the images
    that leave its queue (:meth:`left`). So a request is never counted twice or not at all, and the
    bound holds across the front-ends to the image.
    """

    def __init__(
        self,
        ledger: Ledger,
        row: int,
        max_queue_size: int,
        labels: dict[str, str],
        frontend: int | None,
        stats: InferenceStats | None = None,
        arena: Arena | None = None,
    ) -> None:
        """``arena``: the front-end's, for its requests' images."""
        super().__init__(max_queue_size, labels, stats or InferenceStats())
        self.ledger = ledger
        self.arena = arena
        self.row = row
        self.base = row * ROW_CELLS
        self.mine = None if frontend is None else self.base + FIRST_FRONTEND + frontend

    def counts(self) -> tuple[int, int]:
        cells = self.ledger.cells
        return cells[self.base + QUEUED], cells[self.base + HELD]

    def take_if_room(self, n: int) -> tuple[int, int] | None:
        assert self.mine is not None, "the executor holds no room"
        with self.ledger.locked() as cells:
            queued, held = cells[self.base + QUEUED], cells[self.base + HELD]
            if queued + held + n > self.max_queue_size:
                return queued, held
            cells[self.base + HELD] += n
            cells[self.mine] += n
            return None

    def give_back(self, n: int) -> None:
        assert self.mine is not None, "the executor holds no room"
        with self.ledger.locked() as cells:
            cells[self.base + HELD] -= n
            cells[self.mine] -= n

    def reservation(self, n: int) -> Reservation:
        assert self.arena is not None, "only a front-end reserves"
        return SharedReservation(self, n, self.arena)

    def send(self, room: SharedReservation) -> tuple[int, int]:
        """The room a request held becomes its queued images as they leave for the executor; returns
        their block, which is the caller's to give back once the executor has answered."""
        assert self.mine is not None and room.block is not None, "a front-end sends what it reserved and wrote"
        with self.ledger.locked() as cells:
            cells[self.base + HELD] -= room.n
            cells[self.mine] -= room.n
            cells[self.base + QUEUED] += room.n
        block, room.n, room.block = room.block, 0, None
        return block

    def admit(self, reservation: Reservation | None, n: int) -> None:
        """In the executor: ``n`` images arrive, counted as queued by their front-end; 503 if this version
        is closing (and they no longer count)."""
        if self.closed:
            self.left(n)
            raise Unavailable("model version is shutting down or unloading; retry on another replica", 1)

    def left(self, n: int) -> None:
        self.ledger.dequeued(self.row, n)

    def record_refusal(self) -> None:
        with self.ledger.locked() as cells:
            cells[self.base + REFUSED] += 1

    @property
    def refused(self) -> int:
        """Requests the front-ends refused for want of room (failures in the statistics)."""
        return self.ledger.cells[self.base + REFUSED]
