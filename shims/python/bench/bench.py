"""Per-request and per-chunk cost of tether's asyncio driver, against the smallest
pure-Python wrapper doing the same bookkeeping, on asyncio and uvloop.

    python bench/bench.py                 # the table in BENCHMARKS.md ("Python engines")
    python bench/bench.py --quick         # a smoke run (CI)

Every variant drives the same engine, which yields ``tether.Chunk`` objects without
awaiting anything, so what is measured is the layer between engine and consumer:

- ``bare``: the consumer iterates the engine's generator itself (the floor);
- ``python``: a pure-Python wrapper with tether's bookkeeping: a state flag, first-token
  and inter-token timestamps, an outcome record, an abort task on cancellation, and
  ``aclose()`` of the engine's generator at the end; it runs the engine in the
  consumer's task (so a cancelled consumer throws into the engine);
- ``python task``: the same bookkeeping in tether's structure: the engine's generator in
  a task of its own per request, chunks handed over through an ``asyncio.Queue(16)``;
- ``tether``: ``Adapter.generate`` and the ``ResponseStream`` (engine in a task of its
  own, abort exactly once, one record per request), with the default ``buffer=16``
  (the engine's task runs up to 16 chunks ahead of the reader) and with ``buffer=1``
  (it waits for each chunk to be read: two task switches per chunk).

A request of ``n`` tokens has ``n + 1`` chunks (the tokens, then the terminal). The
per-request cost is the time of a 1-token request; the per-chunk cost is
``(t(1001 tokens) - t(1 token)) / 1000``. Each figure is the median of ``--repeat``
runs of ``--requests`` sequential requests (one at a time: no concurrency overlap),
the variants taking turns round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any, AsyncGenerator, AsyncIterator, Callable

import uvloop

import tether

PENDING, STREAMING, TERMINAL = 0, 1, 2


class Engine:
    model = "bench"

    async def generate(self, request: tether.Request, ctx: Any) -> AsyncGenerator[tether.Chunk, None]:
        for i in range(request.max_tokens or 0):
            yield tether.Chunk([i])
        yield tether.Chunk(finish_reason="length")

    async def abort(self, ctx: Any) -> None:
        pass


class PlainContext:
    """The pure-Python wrapper's context: a request id and a flag."""

    __slots__ = ("request_id", "stopped")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.stopped = False


class PythonWrapper:
    """The smallest pure-Python wrapper doing tether's bookkeeping (see the module doc)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.records: list[tuple[str, str, float | None, int]] = []
        self.aborts: set[asyncio.Task[None]] = set()

    async def generate(self, request: tether.Request, ctx: PlainContext) -> AsyncIterator[tether.Chunk]:
        state = PENDING
        started = time.monotonic()
        first = last = None
        gaps: list[float] = []
        tokens = 0
        outcome = "dropped"
        agen = self.engine.generate(request, ctx)
        try:
            async for chunk in agen:
                now = time.monotonic()
                n = len(chunk.token_ids)
                if n:
                    if first is None:
                        first = now
                        state = STREAMING
                    else:
                        gaps.append(now - last)  # type: ignore[operator]
                    last = now
                    tokens += n
                if chunk.finish_reason is not None:
                    state = TERMINAL
                    outcome = "finished"
                    yield chunk
                    return
                yield chunk
            outcome = "failed"
        except (asyncio.CancelledError, GeneratorExit):
            if state != TERMINAL:
                task = asyncio.get_running_loop().create_task(self.engine.abort(ctx))
                self.aborts.add(task)
                task.add_done_callback(self.aborts.discard)
                outcome = "cancelled"
            raise
        finally:
            ttft = None if first is None else first - started
            self.records.append((ctx.request_id, outcome, ttft, tokens))
            await agen.aclose()


class PythonTaskWrapper(PythonWrapper):
    """The same bookkeeping with tether's structure: the engine's generator runs in an
    ``asyncio.Task`` of its own per request and hands chunks over through an
    ``asyncio.Queue`` of 16, so a cancelled consumer never throws into the engine and
    ``current_task()`` in the engine is the request's."""

    async def generate(self, request: tether.Request, ctx: PlainContext) -> AsyncIterator[tether.Chunk]:
        queue: asyncio.Queue[Any] = asyncio.Queue(16)
        end = object()

        async def pump() -> None:
            agen = self.engine.generate(request, ctx)
            try:
                async for chunk in agen:
                    await queue.put(chunk)
                await queue.put(end)
            except Exception as exc:  # noqa: BLE001
                await queue.put(exc)
            finally:
                await agen.aclose()

        task = asyncio.get_running_loop().create_task(pump(), name=f"engine:{ctx.request_id}")
        state = PENDING
        started = time.monotonic()
        first = last = None
        gaps: list[float] = []
        tokens = 0
        outcome = "failed"
        try:
            while True:
                chunk = await queue.get()
                if chunk is end or isinstance(chunk, Exception):
                    return
                now = time.monotonic()
                n = len(chunk.token_ids)
                if n:
                    if first is None:
                        first = now
                        state = STREAMING
                    else:
                        gaps.append(now - last)  # type: ignore[operator]
                    last = now
                    tokens += n
                if chunk.finish_reason is not None:
                    state = TERMINAL
                    outcome = "finished"
                    yield chunk
                    return
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            if state != TERMINAL:
                abort = asyncio.get_running_loop().create_task(self.engine.abort(ctx))
                self.aborts.add(abort)
                abort.add_done_callback(self.aborts.discard)
                outcome = "cancelled"
            raise
        finally:
            ttft = None if first is None else first - started
            self.records.append((ctx.request_id, outcome, ttft, tokens))
            if not task.done():
                task.cancel()


async def drive_bare(engine: Engine, requests: int, tokens: int) -> None:
    for i in range(requests):
        req = tether.Request([1], id=f"r{i}", max_tokens=tokens)
        async for _ in engine.generate(req, None):
            pass


def drive_python(kind: type[PythonWrapper]) -> Callable[[Engine, int, int], Any]:
    async def drive(engine: Engine, requests: int, tokens: int) -> None:
        wrapper = kind(engine)
        for i in range(requests):
            rid = f"r{i}"
            req = tether.Request([1], id=rid, max_tokens=tokens)
            async for _ in wrapper.generate(req, PlainContext(rid)):
                pass
        assert len(wrapper.records) == requests

    return drive


def drive_tether(buffer: int) -> Callable[[Engine, int, int], Any]:
    async def drive(engine: Engine, requests: int, tokens: int) -> None:
        records = 0

        def observe(_: tether.Record) -> None:
            nonlocal records
            records += 1

        adapter = tether.Adapter(engine, observer=observe, buffer=buffer)
        for i in range(requests):
            rid = f"r{i}"
            req = tether.Request([1], id=rid, max_tokens=tokens)
            async for _ in await adapter.generate(req, tether.Context(rid)):
                pass
        assert records == requests

    return drive


VARIANTS: dict[str, Callable[[Engine, int, int], Any]] = {
    "bare": drive_bare,
    "python": drive_python(PythonWrapper),
    "python task": drive_python(PythonTaskWrapper),
    "tether buffer=1": drive_tether(1),
    "tether": drive_tether(16),
}


def run_once(loop_factory: Callable[[], asyncio.AbstractEventLoop], drive: Any, requests: int, tokens: int) -> float:
    """Seconds per request of one run (after a warm-up of a tenth as many)."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(drive(Engine(), max(1, requests // 10), tokens))
        t0 = time.perf_counter()
        runner.run(drive(Engine(), requests, tokens))
        return (time.perf_counter() - t0) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="1-token requests per run")
    parser.add_argument("--long-requests", type=int, default=200, help="1001-token requests per run")
    parser.add_argument("--repeat", type=int, default=7, help="rounds")
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.long_requests, args.repeat = 200, 5, 1
    loops = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    # Round-robin: each round runs every variant once, so a slow spell of the machine
    # falls on all of them alike; the figure is the median over the rounds.
    short: dict[tuple[str, str], list[float]] = {}
    long: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat):
        for loop_name, factory in loops.items():
            for name, drive in VARIANTS.items():
                key = (loop_name, name)
                short.setdefault(key, []).append(run_once(factory, drive, args.requests, 1))
                long.setdefault(key, []).append(run_once(factory, drive, args.long_requests, 1001))
    print(f"python {sys.version.split()[0]}, {args.repeat} rounds (median; min in brackets)")
    print(f"{'loop':8} {'variant':16} {'per request (µs)':>22} {'per chunk (µs)':>20}")
    for (loop_name, name), shorts in short.items():
        longs = long[(loop_name, name)]
        per_request = statistics.median(shorts)
        per_chunk = (statistics.median(longs) - per_request) / 1000
        chunk_min = (min(longs) - min(shorts)) / 1000
        print(
            f"{loop_name:8} {name:16} {per_request * 1e6:12.2f} [{min(shorts) * 1e6:6.2f}]"
            f" {per_chunk * 1e6:11.3f} [{chunk_min * 1e6:5.3f}]"
        )


if __name__ == "__main__":
    main()
