"""edge/deadline.py on a real event loop: fires once, on time; activity pushes only quiet kinds."""

from __future__ import annotations

import asyncio

from nextproxy.edge.deadline import Deadline, Timer
from tests.edge.fakes import run


async def _collect(seconds: float) -> list[Timer]:
    fired: list[Timer] = []
    deadline = Deadline(asyncio.get_running_loop(), fired.append)
    deadline.set(seconds, Timer.IDLE)
    await asyncio.sleep(seconds * 4)
    return fired


def test_a_deadline_fires_once_with_its_kind() -> None:
    assert run(_collect(0.02)) == [Timer.IDLE]


def test_touch_pushes_quiet_kinds_and_leaves_fixed_ones() -> None:
    async def scenario() -> tuple[list[Timer], list[Timer]]:
        loop = asyncio.get_running_loop()
        quiet: list[Timer] = []
        fixed: list[Timer] = []
        idle = Deadline(loop, quiet.append)
        head = Deadline(loop, fixed.append)
        idle.set(0.05, Timer.IDLE)
        head.set(0.05, Timer.HEAD)
        for _ in range(5):  # activity for 0.1 s: longer than either deadline
            await asyncio.sleep(0.02)
            idle.touch(0.05)
            head.touch(0.05)
        return quiet, fixed

    quiet, fixed = run(scenario())
    assert quiet == []  # pushed out by every touch
    assert fixed == [Timer.HEAD]  # a head deadline is not extended by more bytes


def test_switch_only_replaces_the_named_kind() -> None:
    async def scenario() -> list[Timer | None]:
        deadline = Deadline(asyncio.get_running_loop(), lambda kind: None)
        kinds: list[Timer | None] = []
        deadline.set(10, Timer.RESPONSE)
        deadline.switch(Timer.IDLE, Timer.HEAD, 10)  # not IDLE: unchanged
        kinds.append(deadline.kind)
        deadline.set(10, Timer.IDLE)
        deadline.switch(Timer.IDLE, Timer.HEAD, 10)
        kinds.append(deadline.kind)
        deadline.close()
        return kinds

    assert run(scenario()) == [Timer.RESPONSE, Timer.HEAD]


def test_moving_a_deadline_earlier_fires_at_the_earlier_time() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        fired = loop.create_future()
        deadline = Deadline(loop, lambda kind: fired.set_result(loop.time()))
        start = loop.time()
        deadline.set(5, Timer.IDLE)
        deadline.set(0.02, Timer.PONG)
        return await asyncio.wait_for(fired, 2) - start

    assert run(scenario()) < 1


def test_close_cancels_and_lets_go_of_the_callback() -> None:
    class Owner:
        def __init__(self) -> None:
            self.fired = 0

        def expired(self, kind: Timer) -> None:
            self.fired += 1

    async def scenario() -> tuple[int, bool]:
        owner = Owner()
        deadline = Deadline(asyncio.get_running_loop(), owner.expired)
        deadline.set(0.01, Timer.IDLE)
        deadline.close()
        await asyncio.sleep(0.05)
        holds_owner = getattr(deadline._on_expiry, "__self__", None) is owner
        return owner.fired, holds_owner

    assert run(scenario()) == (0, False)
