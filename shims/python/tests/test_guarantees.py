"""What tether guarantees a Python engine beyond a cooperative binding: each one a test,
on asyncio, asyncio with a virtual clock, and uvloop."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from typing import Any

import pytest

import tether
from conftest import LOOPS
from script import Harness, collect, settle, terminal, tokens

HOUR = 3600.0
SHORT = 0.05


class Warnings(logging.Handler):
    """Collects what tether logs on the ``tether`` logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Warnings:
        logging.getLogger("tether").addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("tether").removeHandler(self)


# -- abort exactly once, whatever the engine swallows -----------------------------------


def test_abort_is_sent_once_when_the_engine_swallows_cancelled_error(run):
    async def main():
        h = Harness(swallow_cancel=True)
        s, script, ctx = await h.start("r")
        await settle(lambda: script.ctx is not None)
        ctx.kill()
        assert await collect(s) == [terminal("cancelled")]
        # The engine was inside its generator: the pump's task was cancelled, and the
        # engine swallowed the CancelledError and went on waiting.
        await settle(lambda: script.cancelled_seen == 1)
        assert (script.aborts, script.closed) == (1, False)
        # Its next item goes nowhere; the pump closes the generator instead.
        script.tokens(5)
        await settle(lambda: script.closed)
        await h.clean()
        assert script.aborts == 1
        assert h.records.one("r").outcome == "cancelled"

    run(main())


def test_abort_is_sent_once_when_the_engine_swallows_generator_exit(run):
    async def main():
        with Warnings() as warned:
            h = Harness(swallow_exit=True, buffer=1)
            s, script, ctx = await h.start("r")
            # The item waits in the pipe (room for one); the pump is parked at its `yield`.
            script.tokens(1)
            await settle(lambda: script.yielded == 1)
            ctx.kill()
            assert await collect(s) == [terminal("cancelled")]
            # The engine yielded again instead of closing: the pump's second close took,
            # before its task ended (not asyncio's finalizer, some turns later).
            pump = script.task
            assert pump is not None
            closed_when_done: list[bool] = []
            pump.add_done_callback(lambda _: closed_when_done.append(script.closed))
            await settle(lambda: bool(closed_when_done))
            assert closed_when_done == [True]
            assert script.exits_seen == 1
            assert len(warned.messages) == 1
            assert "ignored GeneratorExit" in warned.messages[0]
            del s
            await h.clean()
            assert script.aborts == 1
            assert h.records.one("r").outcome == "cancelled"

    run(main())


class LeakyCleanupEngine:
    """The bug tether exists for: the engine frees a request's slot in `except
    Exception`, which `GeneratorExit` (a closed generator) and `CancelledError` slip
    past. Only its `abort` frees the slot reliably."""

    model = "leaky"

    def __init__(self) -> None:
        self.slots: set[str] = set()
        self.aborts: list[str] = []

    async def generate(self, request: tether.Request, ctx: tether.GenerateContext):
        self.slots.add(request.id)
        try:
            for i in range(1_000_000):
                await asyncio.sleep(0)
                yield tether.Chunk([i])
            yield tether.Chunk(finish_reason="length")
        except Exception:
            self.slots.discard(request.id)
            raise

    async def abort(self, ctx: tether.GenerateContext) -> None:
        self.aborts.append(ctx.request_id)
        self.slots.discard(ctx.request_id)


@pytest.mark.parametrize("ending", ["drop", "kill", "cancelled reader"])
def test_an_engine_whose_cleanup_misses_generator_exit_leaks_nothing(run, ending):
    async def main():
        engine = LeakyCleanupEngine()
        adapter = tether.Adapter(engine)
        ctx = tether.Context("r")
        s = await adapter.generate(tether.Request([1], id="r"), ctx)
        assert await s.__anext__() == tokens(0)
        if ending == "drop":
            s.close()
        elif ending == "kill":
            ctx.kill()
            await collect(s)
        else:
            reader = asyncio.ensure_future(collect(s))
            await asyncio.sleep(0)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
        await settle(lambda: not [t for t in asyncio.all_tasks() if t.get_name().startswith("tether:")])
        assert engine.slots == set()
        assert engine.aborts == ["r"]

    run(main())


# -- the generator is closed, however the request ends, after any deferred abort -----


@pytest.mark.parametrize("ending", ["terminal", "kill", "drop", "error", "finish", "timeout"])
def test_the_generator_is_closed_however_the_request_ends(run, ending):
    async def main():
        h = Harness(first_token_timeout=SHORT if ending == "timeout" else None)
        s, script, ctx = await h.start("r")
        if ending != "timeout":
            script.tokens(1)
            assert await s.__anext__() == tokens(1)
        if ending == "terminal":
            script.terminal("eos")
            await collect(s)
        elif ending == "kill":
            ctx.kill()
            await collect(s)
        elif ending == "drop":
            s.close()
        elif ending == "error":
            script.error(RuntimeError("engine fault"))
            await collect(s)
        elif ending == "finish":
            s.finish("stop")
            await collect(s)
        else:
            await collect(s)
        await settle(lambda: script.closed)
        await h.clean()
        assert len(h.records.by_id["r"]) == 1
        assert script.aborts == (0 if ending in ("terminal", "error") else 1)

    run(main())


def test_decode_kill_before_first_token_cancels_now_and_closes_only_after_the_abort(run):
    async def main():
        h = Harness(mode="decode", deferral_deadline=HOUR)
        s, script, ctx = await h.start("r")
        await settle(lambda: script.ctx is not None)
        ctx.kill()
        assert await collect(s) == [terminal("cancelled")]
        rec = h.records.one("r")
        # The consumer is done; the abort is still owed (the engine may be mid KV
        # transfer), so its generator stays open, drained off the consumer's path.
        assert (rec.outcome, rec.abort) == ("cancelled", "deferred")
        del s
        for _ in range(20):
            await asyncio.sleep(0)
        assert (script.aborts, script.closed) == (0, False)
        script.hint()
        await settle(lambda: script.closed)
        assert (script.aborts, script.aborts_when_closed) == (1, 1)
        await h.clean()

    run(main())


class SlowAbortEngine:
    """An engine whose `abort` takes a few loop turns (it awaits), so the driver's first
    poll of it finds it unfinished and moves it to a task of its own."""

    model = "slow-abort"

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.abort_tasks: list[Any] = []

    async def generate(self, request: tether.Request, ctx: tether.GenerateContext):
        yield tether.Chunk([1])
        await asyncio.Event().wait()

    async def abort(self, ctx: tether.GenerateContext) -> None:
        import weakref

        self.abort_tasks.append(weakref.ref(asyncio.current_task()))
        for _ in range(3):
            await asyncio.sleep(0)
        self.aborted.append(ctx.request_id)


def test_an_abort_that_takes_several_turns_completes_and_lets_go(run):
    import gc

    async def main():
        engine = SlowAbortEngine()
        adapter = tether.Adapter(engine)
        streams = []
        for rid in ("a", "b"):
            ctx = tether.Context(rid)
            s = await adapter.generate(tether.Request([1], id=rid), ctx)
            assert await s.__anext__() == tokens(1)
            ctx.kill()
            streams.append(s)
        for s in streams:
            assert await collect(s) == [terminal("cancelled")]
        await settle(lambda: engine.aborted == ["a", "b"])
        await settle(lambda: not [t for t in asyncio.all_tasks() if t.get_name().startswith("tether:")])
        for _ in range(10):
            await asyncio.sleep(0)
        gc.collect()
        # Each abort's task finished and nothing of tether's still holds it: the Rust
        # future that awaited it was woken, completed and dropped.
        assert [ref() for ref in engine.abort_tasks] == [None, None]
        assert adapter.unfinished_aborts == 0

    run(main())


def test_an_abort_decided_as_asyncio_run_returns_still_reaches_the_engine(run):
    """asyncio.run cancels every pending task when `main` returns: an abort task
    cancelled before its first step would never run the engine's `abort`."""
    h = Harness()

    async def main() -> Any:
        s, script, ctx = await h.start("r")
        script.tokens(1)
        assert await s.__anext__() == tokens(1)
        ctx.kill()
        return script

    with Warnings() as warned:
        script = run(main())
    assert script.aborts == 1
    assert warned.messages == []
    # `main` never read the owed terminal: the stream went with its frame.
    assert h.records.one("r").outcome == "dropped"


HANGING_ABORT = """
import asyncio, sys
import tether
loop_factory = {"asyncio": asyncio.new_event_loop, "uvloop": __import__("uvloop").new_event_loop}[sys.argv[1]]
began = []

class Engine:
    model = "hang"
    async def generate(self, request, ctx):
        yield tether.Chunk([1])
        await asyncio.Event().wait()
    async def abort(self, ctx):
        began.append(ctx.request_id)
        await asyncio.Event().wait()   # never finishes

async def main():
    ctx = tether.Context("r")
    s = await tether.Adapter(Engine()).generate(tether.Request([1], id="r"), ctx)
    await s.__anext__()
    ctx.kill()

with asyncio.Runner(loop_factory=loop_factory) as runner:
    runner.run(main())
print("began", began)
"""


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_an_abort_that_never_finishes_is_begun_then_cancelled_by_the_teardown(loop_name):
    """The held cancel is delivered once the engine's `abort` began: asyncio.run's
    teardown does not wait forever for an abort that never ends."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", HANGING_ABORT, loop_name], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "began ['r']"


# -- the consumer's task --------------------------------------------------------------


def test_cancelling_the_consumers_task_kills_the_request(run):
    async def main():
        h = Harness()
        s, script, ctx = await h.start("r")
        script.tokens(1)
        seen: list[tether.Chunk] = []

        async def consume() -> None:
            async for chunk in s:
                seen.append(chunk)

        consumer = asyncio.create_task(consume())
        await settle(lambda: len(seen) == 1)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        assert (ctx.is_killed(), ctx.cause) == (True, "caller")
        await settle(lambda: script.aborts == 1)
        del s
        await h.clean()
        rec = h.records.one("r")
        assert (rec.outcome, rec.abort, rec.output_tokens) == ("cancelled", "sent", 1)
        assert script.aborts == 1

    run(main())


def test_on_a_kill_on_drop_stream_a_cancelled_read_is_a_client_disconnect(run):
    async def main():
        h = Harness(kill_on_drop=True)
        s, script, ctx = await h.start("r")
        reader = asyncio.ensure_future(s.__anext__())
        await asyncio.sleep(0)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await settle(lambda: ctx.is_killed())
        assert ctx.cause == "client_disconnect"
        # The stream ended with the kill: a later read finds nothing.
        with pytest.raises(StopAsyncIteration):
            await s.__anext__()
        await h.clean()
        rec = h.records.one("r")
        assert (rec.outcome, rec.cause, rec.abort) == ("cancelled", "client_disconnect", "sent")
        assert script.aborts == 1

    run(main())


def test_asyncio_timeout_around_the_consumer_kills_the_request(run):
    async def main():
        h = Harness()
        s, script, ctx = await h.start("r")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(SHORT):
                await collect(s)
        assert ctx.is_killed()
        del s
        await h.clean()
        assert script.aborts == 1
        assert h.records.one("r").outcome == "cancelled"

    run(main())


def test_a_second_concurrent_read_is_refused(run):
    async def main():
        h = Harness()
        s, script, _ = await h.start("r")
        first = asyncio.ensure_future(s.__anext__())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="already being read"):
            s.__anext__()
        script.terminal("eos")
        assert await first == terminal("eos")
        await h.clean()

    run(main())


def test_a_kill_from_another_thread_wakes_a_pending_reader(run):
    import threading

    async def main():
        h = Harness()
        s, script, ctx = await h.start("r")
        reader = asyncio.ensure_future(s.__anext__())
        await asyncio.sleep(0)
        killer = threading.Thread(target=ctx.kill)
        killer.start()
        assert await reader == terminal("cancelled")
        killer.join()
        # The stream is its loop's: from another thread it refuses, typed.
        errors: list[BaseException] = []

        def misuse() -> None:
            try:
                s.finish("stop")
            except RuntimeError as exc:
                errors.append(exc)

        t = threading.Thread(target=misuse)
        t.start()
        t.join()
        assert len(errors) == 1 and "event loop's thread" in str(errors[0])
        await h.clean()
        assert script.aborts == 1

    run(main())


def test_the_record_is_on_the_stream_once_it_is_over(run):
    async def main():
        h = Harness()
        s, script, _ = await h.start("r")
        assert s.record is None
        script.tokens(1, 2).terminal("eos")
        await collect(s)
        rec = s.record
        assert rec is not None
        assert (rec.outcome, rec.finish_reason, rec.output_tokens) == ("finished", "eos", 2)
        assert rec.ttft is not None and rec.ttft >= 0
        await h.clean()

    run(main())


def test_context_waits_resolve_and_a_cancelled_one_leaves_nothing(run):
    async def main():
        ctx = tether.Context("c")
        assert ctx.id == "c" and ctx.cause is None
        stopped = asyncio.ensure_future(ctx.stopped())
        killed = asyncio.ensure_future(ctx.killed())
        await asyncio.sleep(0)
        assert ctx.waiters == 2
        ctx.stop("shutdown")
        await stopped
        assert not killed.done()
        assert (ctx.is_stopped(), ctx.is_killed(), ctx.cause) == (True, False, "shutdown")
        # A wait that is given up (a timeout around it) leaves no waker behind.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(killed), SHORT)
        killed.cancel()
        await settle(lambda: ctx.waiters == 0)
        ctx.kill()
        assert ctx.cause == "shutdown"  # the first cause wins
        await ctx.killed()  # already killed: resolves at once
        assert ctx.waiters == 0

    run(main())


class WaitsForStop:
    """An engine that yields one token, then waits for the request to be stopped."""

    model = "waits"

    def __init__(self) -> None:
        self.contexts: list[tether.Context] = []

    async def generate(self, request: tether.Request, ctx: tether.GenerateContext):
        self.contexts.append(ctx.context)
        yield tether.Chunk([1])
        await ctx.stopped()
        assert ctx.is_stopped() and not ctx.is_killed()
        yield tether.Chunk(finish_reason="cancelled")

    async def abort(self, ctx: tether.GenerateContext) -> None:
        pass


def test_an_engine_awaits_its_request_being_stopped(run):
    async def main():
        engine = WaitsForStop()
        ctx = tether.Context("r")
        s = await tether.Adapter(engine).generate(tether.Request([1], id="r"), ctx)
        assert await s.__anext__() == tokens(1)
        await settle(lambda: ctx.waiters == 1)
        ctx.stop()
        assert await collect(s) == [terminal("cancelled")]
        assert engine.contexts[0].waiters == 0

    run(main())


class Lifecycle:
    """An engine with the optional `start` and `cleanup` coroutines."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def start(self, worker_id: int) -> str:
        self.calls.append(f"start {worker_id}")
        return "lifecycle-model"

    async def cleanup(self) -> None:
        self.calls.append("cleanup")

    async def generate(self, request: tether.Request, ctx: tether.GenerateContext):
        yield tether.Chunk(finish_reason="length")

    async def abort(self, ctx: tether.GenerateContext) -> None:
        pass


def test_start_and_cleanup_reach_the_engine_and_name_its_model(run):
    async def main():
        engine = Lifecycle()
        adapter = tether.Adapter(engine)
        assert await adapter.start(7) == "lifecycle-model"
        await adapter.cleanup()
        await adapter.cleanup()
        assert engine.calls == ["start 7", "cleanup", "cleanup"]
        # Without `start`, the model is the engine's `model` attribute.
        assert await tether.Adapter(SlowAbortEngine()).start() == "slow-abort"

    run(main())


class Misbehaving:
    """An engine that yields after its terminal, and whose `abort` is a plain function
    that raises."""

    model = "misbehaving"

    def __init__(self) -> None:
        self.aborts = 0
        self.after_terminal = 0

    async def generate(self, request: tether.Request, ctx: tether.GenerateContext):
        if request.id == "late":
            yield tether.Chunk([1])
            await asyncio.Event().wait()
        yield tether.Chunk([1], finish_reason="eos")
        self.after_terminal += 1
        yield tether.Chunk([2])

    def abort(self, ctx: tether.GenerateContext) -> None:
        self.aborts += 1
        raise RuntimeError("abort exploded")


def test_nothing_follows_a_terminal_and_a_failing_abort_is_reported_once(run):
    async def main():
        with Warnings() as warned:
            engine = Misbehaving()
            adapter = tether.Adapter(engine)
            s = await adapter.generate(tether.Request([1], id="r"))
            assert await collect(s) == [terminal("eos", 1)]
            ctx = tether.Context("late")
            s = await adapter.generate(tether.Request([1], id="late"), ctx)
            assert await s.__anext__() == tokens(1)
            ctx.kill()
            assert await collect(s) == [terminal("cancelled")]
            await settle(lambda: bool(warned.messages))
            assert engine.aborts == 1
            assert warned.messages == ["the engine's abort failed: BackendUnknown: RuntimeError: abort exploded"]
            assert engine.after_terminal <= 1

    run(main())


class BusyEngine:
    """Computes for 0.3 ms (on the CPU, within one loop iteration) before each token."""

    model = "busy"

    async def generate(self, request: tether.Request, ctx: tether.GenerateContext):
        import time

        for i in range(3):
            until = time.perf_counter() + 0.0003
            while time.perf_counter() < until:
                pass
            yield tether.Chunk([i])
        yield tether.Chunk(finish_reason="length")

    async def abort(self, ctx: tether.GenerateContext) -> None:
        pass


def test_ttft_and_itl_are_measured_finer_than_a_millisecond(run):
    """uvloop's `loop.time()` has a 1 ms grain; TTFT and ITL are measured on
    `Instant` (the same clock, unrounded) on uvloop and asyncio alike."""

    async def main():
        s = await tether.Adapter(BusyEngine(), buffer=1).generate(tether.Request([1], id="r"))
        await collect(s)
        rec = s.record
        assert rec is not None and rec.ttft is not None
        return rec

    rec = run(main())
    if run.loop_name == "virtual":
        # A virtual clock stands still while the CPU works: it is the loop's clock.
        assert (rec.ttft, rec.itl_avg_ms) == (0.0, 0.0)
        return
    ttft_ms = rec.ttft * 1000
    assert ttft_ms >= 0.3
    # On a millisecond clock both would be whole milliseconds.
    assert abs(ttft_ms - round(ttft_ms)) > 1e-6, ttft_ms
    assert rec.itl_count == 2 and rec.itl_avg_ms >= 0.3
    assert abs(rec.itl_avg_ms * 2 - round(rec.itl_avg_ms * 2)) > 1e-6, rec.itl_avg_ms


# -- the engine's task ----------------------------------------------------------------


class TaskAwareEngine:
    """Checks, from inside `generate`, that it runs in a task of its own."""

    model = "task-aware"

    def __init__(self) -> None:
        self.task_names: list[str] = []

    async def generate(self, request: tether.Request, ctx: tether.GenerateContext):
        task = asyncio.current_task()
        assert task is not None
        self.task_names.append(task.get_name())
        yield tether.Chunk([1])
        async with asyncio.timeout(SHORT):
            await asyncio.Event().wait()

    async def abort(self, ctx: tether.GenerateContext) -> None:
        pass


def test_generate_runs_in_a_task_of_its_own_where_asyncio_timeout_works(run):
    async def main():
        engine = TaskAwareEngine()
        adapter = tether.Adapter(engine)
        s = await adapter.generate(tether.Request([1], id="r"))
        out = await collect(s)
        assert engine.task_names == ["tether:r"]
        assert asyncio.current_task().get_name() != "tether:r"
        assert out[0] == tokens(1)
        assert (out[1].finish_reason, out[1].error) == ("error", "BackendUnknown: TimeoutError: ")

    run(main())


# -- a loop closed in the middle of a cancellation ----------------------------------------


@pytest.mark.parametrize("loop_name", list(LOOPS))
@pytest.mark.parametrize("mode", ["agg", "decode"])
def test_closing_the_loop_during_a_cancellation_breaks_nothing(loop_name, mode):
    unraisable: list[str] = []
    old = sys.unraisablehook
    sys.unraisablehook = lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}")
    try:
        loop = LOOPS[loop_name]()
        seen: list[str] = []
        loop.set_exception_handler(lambda _, c: seen.append(str(c.get("exception") or c["message"])))
        h = Harness(mode=mode, deferral_deadline=SHORT, buffer=1)
        stream, script, ctx = loop.run_until_complete(h.start("r"))
        # The engine parks at a `yield` (an engine awaiting a future of the loop when it
        # closes is asyncio's own trouble, not tether's: `Queue.get` then complains).
        script.tokens(1)
        loop.run_until_complete(settle(lambda: script.yielded == 1))
        # The kill queues the abort (or, in decode mode, arms its deadline); the loop
        # closes before either can run, then the stream goes.
        ctx.kill()
        loop.close()
        stream.close()
        del stream
        ctx.kill()
        assert script.aborts == 0
        assert len(h.records.by_id["r"]) == 1
    finally:
        sys.unraisablehook = old
    assert unraisable == []
    assert not [m for m in seen if "closed" in m], seen


# -- many requests, every ending: the invariants hold for each -------------------------------


def test_a_mixed_load_keeps_every_invariant(run):
    async def main():
        rng = random.Random(7)
        h = Harness(mode=rng.choice(["agg", "decode"]), deferral_deadline=SHORT)
        plans = {}
        for i in range(60):
            rid = f"r{i}"
            plan = rng.choice(["finish", "stop", "kill", "drop", "error", "end"])
            plans[rid] = plan
            s, script, ctx = await h.start(rid)
            script.tokens(i)
            if plan == "finish":
                script.terminal("eos")
            elif plan == "error":
                script.error(ValueError("x"))
            elif plan == "end":
                script.end()
            first = await s.__anext__()
            assert first == tokens(i)
            if plan in ("stop", "kill"):
                getattr(ctx, plan)()
                if plan == "stop":
                    script.terminal("cancelled")
            if plan == "drop":
                s.close()
            else:
                out = await collect(s)
                assert sum(1 for c in out if c.is_terminal) == 1 and out[-1].is_terminal
        await settle(lambda: all(s.closed for s in h.engine.scripts.values()))
        await h.clean()
        for rid, plan in plans.items():
            script = h.engine.scripts[rid]
            rec = h.records.one(rid)
            # At most once; exactly once when the record says it was due.
            assert script.aborts == (1 if rec.abort in ("sent", "deferred") else 0), (rid, plan, rec)
            assert script.aborts_when_closed == script.aborts, (rid, plan)

    run(main())


# -- the contracts ---------------------------------------------------------------------------


def test_the_asyncio_runtime_passes_the_runtime_conformance_check(run):
    async def main():
        return await tether.run_runtime_conformance()

    assert run(main()) == 9


class Countdown:
    """A small well-behaved engine: `max_tokens` tokens, stops when told."""

    model = "countdown"

    def __init__(self) -> None:
        self.live = 0

    async def generate(self, request: tether.Request, ctx: tether.GenerateContext):
        n = request.max_tokens if request.max_tokens is not None else 16
        for i in range(n):
            if ctx.is_stopped():
                yield tether.Chunk(finish_reason="cancelled")
                return
            await asyncio.sleep(0)
            yield tether.Chunk([i])
        yield tether.Chunk(finish_reason="length")

    async def abort(self, ctx: tether.GenerateContext) -> None:
        pass


def test_a_python_engine_passes_the_conformance_kit(run):
    async def main():
        return await tether.run_conformance(Countdown)

    assert run(main()) == 6


# -- bad input: a typed error, never a crash ------------------------------------------------


def test_bad_input_gets_a_clear_typed_error(run):
    with pytest.raises(TypeError, match="has no `generate`"):
        tether.Adapter(object())
    with pytest.raises(ValueError):
        tether.Adapter(Countdown(), mode="sideways")
    with pytest.raises(ValueError, match="deferral_deadline"):
        tether.Adapter(Countdown(), deferral_deadline=-1.0)
    with pytest.raises(ValueError, match="first_token_timeout"):
        tether.Adapter(Countdown(), first_token_timeout=float("nan"))
    with pytest.raises(ValueError, match="unknown finish reason"):
        tether.Chunk(finish_reason="done")
    with pytest.raises(OverflowError):
        tether.Request([-1])
    with pytest.raises(ValueError, match="unknown cause"):
        tether.Context("c").kill("gremlins")

    class NotAGenerator(Countdown):
        def generate(self, request, ctx):  # type: ignore[override]
            return [tether.Chunk([1])]

    async def not_a_generator():
        adapter = tether.Adapter(NotAGenerator())
        with pytest.raises(tether.EngineError, match="not an async iterator") as err:
            await adapter.generate(tether.Request([1], id="r"))
        assert err.value.kind == "BackendUnknown"

    run(not_a_generator())

    class Bogus(Countdown):
        async def generate(self, request, ctx):
            yield {"token_ids": [1]}

    async def main():
        adapter = tether.Adapter(Bogus())
        out = await collect(await adapter.generate(tether.Request([1], id="r")))
        assert len(out) == 1 and out[0].error_kind == "BackendUnknown"
        assert "yielded dict, not a tether.Chunk" in out[0].error

    run(main())


def test_an_adapter_serves_one_loop(run):
    adapter = tether.Adapter(Countdown())

    async def use() -> None:
        await collect(await adapter.generate(tether.Request([1], id="r", max_tokens=1)))

    run(use())
    with pytest.raises(RuntimeError, match="bound to another event loop"):
        asyncio.run(use())
