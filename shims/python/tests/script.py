"""A scripted Python engine for the tests (the asyncio twin of ``tests/src/engine.rs``'s
``ScriptEngine``): each request's chunks come from a script the test writes step by
step, and every call the driver makes is counted."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import tether


@dataclass
class Script:
    """One request's steps, and what the engine saw of it."""

    request_id: str
    steps: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    ctx: tether.GenerateContext | None = None
    task: asyncio.Task[Any] | None = None
    generates: int = 0
    aborts: int = 0
    #: Steps (tokens, terminals) the engine handed out.
    yielded: int = 0
    #: CancelledError / GeneratorExit the generator saw.
    cancelled_seen: int = 0
    exits_seen: int = 0
    #: The generator's `finally` ran, and how many aborts had arrived by then.
    closed: bool = False
    aborts_when_closed: int | None = None
    abort_ctx: tether.GenerateContext | None = None

    def tokens(self, *ids: int) -> Script:
        self.steps.put_nowait(("tokens", list(ids)))
        return self

    def empty(self) -> Script:
        """A token-less chunk (a handshake)."""
        self.steps.put_nowait(("tokens", []))
        return self

    def terminal(self, reason: tether.FinishReason, *ids: int) -> Script:
        self.steps.put_nowait(("terminal", (reason, list(ids))))
        return self

    def error(self, exc: BaseException) -> Script:
        self.steps.put_nowait(("error", exc))
        return self

    def hint(self) -> Script:
        """`ctx.notify_first_token()` from inside the generator."""
        self.steps.put_nowait(("hint", None))
        return self

    def end(self) -> Script:
        """End the generator without a terminal."""
        self.steps.put_nowait(("end", None))
        return self

    def queued(self) -> int:
        return self.steps.qsize()


class ScriptEngine:
    """The engine: ``generate`` plays the request's script; ``abort`` counts."""

    model = "script"

    def __init__(
        self,
        *,
        swallow_cancel: bool = False,
        swallow_exit: bool = False,
        on_abort: Callable[[Script], None] | None = None,
        setup_error: BaseException | None = None,
    ) -> None:
        self.scripts: dict[str, Script] = {}
        self.swallow_cancel = swallow_cancel
        self.swallow_exit = swallow_exit
        self.on_abort = on_abort
        self.setup_error = setup_error
        self.live = 0

    def script(self, request_id: str) -> Script:
        if request_id not in self.scripts:
            self.scripts[request_id] = Script(request_id)
        return self.scripts[request_id]

    def generate(self, request: tether.Request, ctx: tether.GenerateContext) -> AsyncIterator[tether.Chunk]:
        if self.setup_error is not None:
            raise self.setup_error
        return self._play(request, ctx)

    async def _play(self, request: tether.Request, ctx: tether.GenerateContext) -> AsyncIterator[tether.Chunk]:
        s = self.script(request.id)
        s.ctx, s.task = ctx, asyncio.current_task()
        s.generates += 1
        self.live += 1
        try:
            while True:
                try:
                    kind, arg = await s.steps.get()
                except asyncio.CancelledError:
                    s.cancelled_seen += 1
                    if self.swallow_cancel:
                        continue
                    raise
                if kind == "hint":
                    ctx.notify_first_token()
                    continue
                if kind == "end":
                    return
                if kind == "error":
                    raise arg
                chunk = (
                    tether.Chunk(arg)
                    if kind == "tokens"
                    else tether.Chunk(arg[1], finish_reason=arg[0])
                )
                try:
                    s.yielded += 1
                    yield chunk
                except GeneratorExit:
                    s.exits_seen += 1
                    if self.swallow_exit:
                        yield tether.Chunk([999])
                    raise
        finally:
            s.closed = True
            s.aborts_when_closed = s.aborts
            self.live -= 1

    async def abort(self, ctx: tether.GenerateContext) -> None:
        s = self.script(ctx.request_id)
        s.aborts += 1
        s.abort_ctx = ctx
        if self.on_abort is not None:
            self.on_abort(s)


class Records:
    """The adapter's observer: one record per request, or the test fails."""

    def __init__(self) -> None:
        self.by_id: dict[str, list[tether.Record]] = {}

    def __call__(self, record: tether.Record) -> None:
        self.by_id.setdefault(record.request_id, []).append(record)

    def one(self, request_id: str) -> tether.Record:
        got = self.by_id.get(request_id, [])
        assert len(got) == 1, f"{request_id}: {len(got)} records: {got}"
        return got[0]


async def settle(predicate: Callable[[], bool], *, guard: float = 5.0) -> None:
    """Let the loop run until ``predicate()`` holds: a few bare turns first, then 1 ms
    naps on the loop's clock (which a virtual clock jumps over), failing once
    ``guard`` seconds of that clock passed. The predicate decides; the naps only keep
    the loop from spinning while a deadline comes."""
    loop = asyncio.get_running_loop()
    for _ in range(100):
        if predicate():
            return
        await asyncio.sleep(0)
    give_up = loop.time() + guard
    while not predicate():
        if loop.time() > give_up:
            raise AssertionError(f"the condition did not hold within {guard} s of the loop's clock")
        await asyncio.sleep(0.001)


async def collect(stream: tether.ResponseStream) -> list[tether.Chunk]:
    return [chunk async for chunk in stream]


def tokens(*ids: int) -> tether.Chunk:
    return tether.Chunk(list(ids))


def terminal(reason: tether.FinishReason, *ids: int) -> tether.Chunk:
    return tether.Chunk(list(ids), finish_reason=reason)


class Harness:
    """An adapter over a ScriptEngine, with its records."""

    def __init__(self, **adapter: Any) -> None:
        engine_opts = {
            k: adapter.pop(k)
            for k in ("swallow_cancel", "swallow_exit", "on_abort", "setup_error")
            if k in adapter
        }
        self.engine = ScriptEngine(**engine_opts)
        self.records = Records()
        self.adapter = tether.Adapter(self.engine, observer=self.records, **adapter)

    async def start(self, request_id: str, **kw: Any) -> tuple[tether.ResponseStream, Script, tether.Context]:
        ctx = tether.Context(request_id)
        script = self.engine.script(request_id)
        stream = await self.adapter.generate(tether.Request([1, 2, 3], id=request_id), ctx, **kw)
        return stream, script, ctx

    async def clean(self) -> None:
        """Nothing left: every generator closed, every pump and abort task done, no abort
        owed (an engine's `abort` coroutine runs in a task named `tether:abort:<id>`)."""
        await settle(lambda: self.engine.live == 0 and self.adapter.unfinished_aborts == 0)
        await settle(lambda: not [t for t in asyncio.all_tasks() if t.get_name().startswith("tether:")])
