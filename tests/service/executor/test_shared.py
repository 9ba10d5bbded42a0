"""The arena (a front-end's pixel memory) and the ledger (one queue bound for every process), on real memfds."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from service.batching import Admission
from service.errors import TooLarge, Unavailable
from service.executor.shared import (
    ALIGN,
    FIRST_FRONTEND,
    HELD,
    QUEUED,
    ROW_CELLS,
    Arena,
    Ledger,
    SharedAdmission,
    SharedReservation,
    view_of,
)
from service.stats import InferenceStats

LABELS = {"model": "m", "version": "1"}


def test_arena_blocks_are_reused_first_fit_and_merge_when_freed() -> None:
    arena = Arena(16 * ALIGN)
    a, b, c = arena.allocate(1), arena.allocate(ALIGN + 1), arena.allocate(ALIGN)
    assert (a, b, c) == (0, ALIGN, 3 * ALIGN), "rounded up to whole aligned blocks"
    arena.free(b, ALIGN + 1)
    assert arena.allocate(2 * ALIGN) == ALIGN, "the freed block fits again"
    arena.free(ALIGN, 2 * ALIGN)
    arena.free(a, 1)
    arena.free(c, ALIGN)
    assert arena._free == [(0, 16 * ALIGN)], "neighbours merge back into one block"
    with pytest.raises(Unavailable, match="no shared memory left"):
        arena.allocate(17 * ALIGN)
    arena.close()


def test_what_a_front_end_writes_in_its_arena_the_executor_reads_in_its_own_mapping() -> None:
    arena = Arena(1 << 20)
    offset = arena.allocate(2 * 28 * 28)
    images = arena.view(offset, (2, 28, 28, 1), np.dtype(np.uint8))
    images[...] = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(images.shape)
    mapping = view_of(os.dup(arena.fd))  # the executor's side: its own descriptor and mapping
    seen = np.ndarray((2, 28, 28, 1), np.uint8, buffer=mapping, offset=offset)
    np.testing.assert_array_equal(seen, images)
    del seen
    mapping.close()
    arena.close()


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger.create(tmp_path / "ledger.lock")


def frontend(ledger: Ledger, index: int, tmp_path: Path, size: int = 10) -> SharedAdmission:
    """A front-end's view of row 3, through a ledger opened as another process would (its own lock)."""
    own = Ledger.open(os.dup(ledger.fd), tmp_path / "ledger.lock")
    return SharedAdmission(own, 3, size, LABELS, index, arena=Arena(1 << 20))


def test_one_bound_for_every_front_end(ledger: Ledger, tmp_path: Path) -> None:
    first, second = frontend(ledger, 0, tmp_path), frontend(ledger, 1, tmp_path)
    executor = SharedAdmission(ledger, 3, 10, LABELS, None, InferenceStats())
    room = first.reserve(6)
    with pytest.raises(Unavailable, match=r"queue full \(0 of 10 images waiting, 6 more held"):
        second.reserve(5)
    held = second.reserve(4)
    assert isinstance(room, SharedReservation) and executor.counts() == (0, 10)
    room.buffer((28, 28, 1), np.dtype(np.uint8))
    block = first.send(room)  # held room turns into queued images in one step
    assert room.n == 0 and block[1] == 6 * 28 * 28 and executor.counts() == (6, 4)
    room.release()  # after sending: nothing more to give back
    assert executor.counts() == (6, 4)
    executor.left(6)  # the executor batched them
    held.release()
    assert executor.counts() == (0, 0)
    with pytest.raises(TooLarge):
        second.reserve(11)
    assert executor.refused == 2, "both front-ends' refusals count as the version's failures"


def test_a_front_end_that_dies_gives_its_room_back(ledger: Ledger, tmp_path: Path) -> None:
    first, second = frontend(ledger, 0, tmp_path), frontend(ledger, 5, tmp_path)
    first.reserve(3)
    second.reserve(4)
    ledger.forget_frontend(0)
    assert second.counts() == (0, 4) and ledger.cells[3 * ROW_CELLS + FIRST_FRONTEND] == 0


def test_the_door_holds_room_as_a_single_process_does(ledger: Ledger, tmp_path: Path) -> None:
    """Same door, hold and admission as :class:`Admission`; only the counts live elsewhere."""
    shared, local = frontend(ledger, 0, tmp_path), Admission(10, LABELS, InferenceStats())
    for admission in (shared, local):
        room = admission.door()
        admission.hold(room)
        assert room.n == 1 and admission.counts() == (0, 1)
        for _ in range(6):
            admission.reserve(4).release()
        first = admission.door()
        admission.hold(first)
        admission.hold(admission.door())
        with pytest.raises(Unavailable, match="9 more held"):
            admission.door()
        assert admission.counts() == (0, 9)


def test_an_executor_closing_refuses_what_arrives_and_uncounts_it(ledger: Ledger, tmp_path: Path) -> None:
    first = frontend(ledger, 0, tmp_path)
    executor = SharedAdmission(ledger, 3, 10, LABELS, None, InferenceStats())
    room = first.reserve(2)
    room.buffer((1,), np.dtype(np.uint8))
    first.send(room)
    executor.closed = True
    with pytest.raises(Unavailable, match="shutting down"):
        executor.admit(None, 2)
    assert executor.counts() == (0, 0)


def hammer(fd: int, lock: str, index: int, rounds: int, taken: multiprocessing.Value) -> None:
    admission = SharedAdmission(Ledger.open(os.dup(fd), Path(lock)), 7, 1, LABELS, index, arena=Arena(ALIGN))
    for _ in range(rounds):
        if admission.take_if_room(1) is None:
            with taken.get_lock():
                taken.value += 1
            admission.give_back(1)


def test_processes_taking_room_at_once_never_lose_a_count(ledger: Ledger, tmp_path: Path) -> None:
    """Two processes race for the one place of a bound of 1: without the lock their read-add-write steps
    interleave and the counts drift (a place held twice, or lost for good)."""
    context = multiprocessing.get_context("fork")
    taken = context.Value("q", 0)
    workers = [
        context.Process(target=hammer, args=(ledger.fd, str(tmp_path / "ledger.lock"), i, 20_000, taken))
        for i in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    cells = ledger.cells
    assert cells[7 * ROW_CELLS + HELD] == 0 and cells[7 * ROW_CELLS + QUEUED] == 0
    assert cells[7 * ROW_CELLS + FIRST_FRONTEND] == cells[7 * ROW_CELLS + FIRST_FRONTEND + 1] == 0
    assert taken.value > 1000, "the processes should each have got the place many times"
