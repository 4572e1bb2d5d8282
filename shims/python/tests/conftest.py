"""Every test runs on three event loops: asyncio's own, asyncio with a virtual clock
(a paused test clock: timers fire at once, in order, with ``loop.time()`` jumping to
their deadline), and uvloop."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Callable, Coroutine

import pytest
import uvloop


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop whose clock moves only when the loop would sleep: it
    then jumps to the next timer instead of waiting for it."""

    def __init__(self) -> None:
        super().__init__()
        self._virtual = 1000.0
        select = self._selector.select

        def virtual_select(timeout: float | None = None) -> Any:
            ready = select(0)
            if ready or timeout == 0:
                return ready
            if timeout is None:
                # Nothing scheduled: only another thread can wake the loop.
                return select(None)
            self._virtual += timeout
            return []

        self._selector.select = virtual_select  # type: ignore[method-assign]

    def time(self) -> float:
        return self._virtual


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "virtual": VirtualClockLoop,
    "uvloop": uvloop.new_event_loop,
}


class Unraisable:
    """Collects what Python could not raise (``sys.unraisablehook``) and what the loop's
    exception handler got: a test fails on either."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def hook(self, unraisable: Any) -> None:
        self.seen.append(f"{unraisable.exc_type.__name__}: {unraisable.exc_value}")

    def handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.seen.append(str(context.get("exception") or context.get("message")))


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """``run(coro)``: run ``coro`` to completion on the parametrized loop; fails if
    anything went unraised or reached the loop's exception handler."""
    factory = LOOPS[request.param]
    unraisable = Unraisable()

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        old = sys.unraisablehook
        sys.unraisablehook = unraisable.hook
        try:
            with asyncio.Runner(loop_factory=factory) as r:
                r.get_loop().set_exception_handler(unraisable.handler)
                result = r.run(coro)
        finally:
            sys.unraisablehook = old
        assert unraisable.seen == [], unraisable.seen
        return result

    runner.loop_name = request.param  # type: ignore[attr-defined]
    return runner
