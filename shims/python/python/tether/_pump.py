"""The pump: one asyncio task per request that runs the engine's generator.

Internal to tether (the Rust driver starts it); see ``src/engine.rs`` for the protocol
with its ``Sink``.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from ._errors import EngineError


async def pump(agen: Any, sink: Any, iterator: bool) -> None:
    """Pull the engine's items into ``sink`` until the generator ends or the driver
    drops the stream, then close the generator (``aclose``), however it ended.

    ``iterator``: ``agen`` has ``__anext__`` already (the driver checked); otherwise it
    is an awaitable or an async iterable, resolved here, in the engine's task."""
    close = True
    try:
        if not iterator:
            if inspect.isawaitable(agen):
                # `async def generate(...)` that returns an async iterable.
                agen = await agen
            if not hasattr(agen, "__anext__"):
                agen = agen.__aiter__()
        anext = agen.__anext__
        push = sink.push
        while True:
            item = await anext()
            wait = push(item)
            if wait is not None and (wait is False or not await wait):
                return
    except StopAsyncIteration:
        # Exhausted: there is nothing left to close.
        close = False
        sink.end()
    except asyncio.CancelledError:
        if not sink.closed:
            sink.end(EngineError("the engine's task was cancelled", "BackendCancelled"))
        raise
    except GeneratorExit:
        # The pump itself is being closed (its loop is gone, or it was collected while
        # suspended): nothing may be awaited now. asyncio's async-generator hooks
        # finalize the engine's generator.
        close = False
        if not sink.closed:
            sink.end(EngineError("the engine's task was closed", "BackendCancelled"))
        raise
    except Exception as exc:  # noqa: BLE001 - every engine failure is an error terminal
        sink.end(exc)
    except BaseException as exc:
        # KeyboardInterrupt, SystemExit: end the stream, then let it go.
        sink.end(EngineError(f"{type(exc).__name__} in the engine", "BackendUnknown"))
        raise
    finally:
        if close:
            await _close(agen, sink)


async def _close(agen: Any, sink: Any) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except RuntimeError as exc:
        # "async generator ignored GeneratorExit": the engine yielded again instead of
        # closing. CPython finishes the generator all the same (its `finally` has run
        # by the time this returns); the engine is told in the log.
        sink.warn(f"closing the engine's generator failed: {exc}")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001
        sink.warn(f"closing the engine's generator raised {type(exc).__name__}: {exc}")


class AbortTask(asyncio.Task):  # type: ignore[type-arg]
    """The task that runs an engine's ``abort``: never cancelled before its coroutine
    started. ``asyncio.run`` cancels every pending task when ``main`` returns; an
    ordinary task cancelled before its first step never runs its coroutine at all, so
    an abort decided just before would never reach the engine (the "unowned
    ``create_task(abort)``" bug). A cancel that arrives first is held until the
    engine's ``abort`` has begun, then delivered at the next loop turn (at its first
    ``await``, if it has one by then)."""

    _started = False
    _held: "tuple[Any, ...] | None" = None

    def cancel(self, *args: Any, **kwargs: Any) -> bool:
        if self._started or self.done():
            return super().cancel(*args, **kwargs)
        self._held = args
        return True


async def run_abort(coroutine: Any) -> Any:
    """The body of an :class:`AbortTask`: the engine's ``abort`` coroutine."""
    task = asyncio.current_task()
    if isinstance(task, AbortTask):
        task._started = True
        held = task._held
        if held is not None:
            # Delivered at the next loop turn: an abort done in its first step is not
            # cancelled, one that awaits gets the CancelledError there.
            asyncio.get_running_loop().call_soon(lambda: task.cancel(*held))
    return await coroutine
