"""The readers' view of the evaluator's linger window and commit: who waits, and for how
long the evaluator waits for them (scheduler passes, no clock)."""

from __future__ import annotations

import trio
import trio.testing

from daemon.runtime.read_pacing import ROUNDS, ReadPacing


async def test_a_reader_does_not_wait_when_nothing_opens() -> None:
    pacing = ReadPacing()
    assert not pacing.lingering
    assert await pacing.hold() is False


async def test_a_reader_waits_for_a_window_that_opens_just_after_its_hand_over() -> None:
    """The evaluator is woken by the frame the reader just handed over, but runs after
    it: the reader waits for the window it opens to close, rather than for the socket
    (where each next frame would wake it)."""
    pacing = ReadPacing()
    queue: list[str] = []

    async def reader() -> None:
        assert await pacing.hold() is True
        queue.append("frame")
        pacing.handed_over()

    async def evaluator() -> None:
        await trio.lowlevel.checkpoint()  # woken by the hand-over: runs in the next pass
        pacing.open()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(evaluator)
        await trio.testing.wait_all_tasks_blocked()
        assert pacing.lingering
        assert queue == []  # held
        await pacing.close()
        assert queue == ["frame"]  # before the take


async def test_a_reader_waits_until_the_window_closes_and_hands_over_before_the_take() -> None:
    pacing = ReadPacing()
    taken: list[str] = []
    queue: list[str] = []

    async def reader() -> None:
        assert await pacing.hold() is True
        for _ in range(2):  # the read and the hand-over take scheduler passes
            await trio.lowlevel.checkpoint()
        queue.append("frame")
        pacing.handed_over()

    async with trio.open_nursery() as nursery:
        pacing.open()
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert pacing.lingering
        assert queue == []  # held
        await pacing.close()
        taken += queue  # what the evaluator takes right after closing
    assert taken == ["frame"]
    assert not pacing.lingering


async def test_the_evaluator_does_not_wait_long_for_a_reader_held_up_elsewhere() -> None:
    pacing = ReadPacing()
    stuck = trio.Event()

    async def reader() -> None:
        await pacing.hold()
        await stuck.wait()  # e.g. a full queue: it never hands over in time

    async with trio.open_nursery() as nursery:
        pacing.open()
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5), trio.testing.assert_checkpoints():
            await pacing.close()  # returns after ROUNDS passes at most
        stuck.set()
    assert ROUNDS >= 3


async def test_a_close_of_no_rounds_wakes_the_readers_without_waiting_for_them() -> None:
    """After a commit that a linger window follows, the evaluator does not wait for the
    readers it wakes: what they read joins that window anyway."""
    pacing = ReadPacing()
    woken: list[bool] = []

    async def reader() -> None:
        assert await pacing.hold() is True
        woken.append(True)
        pacing.handed_over()

    async with trio.open_nursery() as nursery:
        pacing.open()
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        with trio.testing.assert_no_checkpoints():
            await pacing.close(0)
        assert woken == []  # not run yet
        assert not pacing.lingering
    assert woken == [True]
