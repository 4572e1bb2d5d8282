"""tether for asyncio: the request lifecycle of Python engines and servers, proven in Rust.

An *engine* is any object with ``generate(request, ctx)`` (an ``async def`` generator of
:class:`Chunk`) and ``async def abort(ctx)``. An :class:`Adapter` drives it on the running
event loop: ``await adapter.generate(request, context)`` returns a :class:`ResponseStream`
that ends with exactly one terminal chunk, and the engine's ``abort`` is called at most
once, never after its terminal, however the request ends.
"""

from __future__ import annotations

from typing import AsyncIterator, Literal, Protocol

from ._errors import EngineError
from ._native import (
    Adapter,
    Chunk,
    Context,
    GenerateContext,
    Record,
    Request,
    ResponseStream,
    run_conformance,
    run_runtime_conformance,
)


#: A terminal chunk's reason.
FinishReason = Literal["eos", "length", "stop", "cancelled", "content_filter", "error"]
#: Why a request was stopped or killed.
Cause = Literal["caller", "client_disconnect", "shutdown", "timeout"]
#: The disaggregation role an adapter serves.
Mode = Literal["agg", "prefill", "decode"]


class Engine(Protocol):
    """What an :class:`Adapter` drives (a structural type: no base class needed).

    ``generate`` runs in an ``asyncio.Task`` of its own per request (named
    ``tether:<request id>``); ``abort`` in a task named ``tether:abort:<request id>``,
    at most once per request and never after the engine's terminal was read."""

    def generate(self, request: Request, ctx: GenerateContext) -> AsyncIterator[Chunk]: ...

    async def abort(self, ctx: GenerateContext) -> None: ...


__all__ = [
    "Adapter",
    "Cause",
    "FinishReason",
    "Mode",
    "Chunk",
    "Context",
    "Engine",
    "EngineError",
    "GenerateContext",
    "Record",
    "Request",
    "ResponseStream",
    "run_conformance",
    "run_runtime_conformance",
]
