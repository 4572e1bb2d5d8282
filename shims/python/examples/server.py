"""A Starlette server over a Python engine, with tether owning each request's life.

    pip install starlette uvicorn          # plus tether (README: "Python engines")
    python examples/server.py --port 8000
    curl -N localhost:8000/v1/completions -d '{"prompt_tokens": [1, 2, 3], "max_tokens": 5}'

``POST /v1/completions`` streams server-sent events, one per chunk, then ``[DONE]``.
When the client goes away mid-stream, Starlette stops reading the response; tether's
kill-on-drop turns that into a kill with cause ``client_disconnect`` and calls the
engine's ``abort`` exactly once. ``GET /stats`` shows the engine's live requests, the
aborts it received and the outcomes tether recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import tether


class CountingEngine:
    """A stand-in engine: counts up from the prompt's last token, one token every
    ``step`` seconds, and honours aborts (it ends with ``cancelled``)."""

    model = "counting"

    def __init__(self, step: float = 0.01) -> None:
        self.step = step
        self.live = 0
        self.aborts: Counter[str] = Counter()
        self._aborted: set[str] = set()

    async def generate(self, request: tether.Request, ctx: tether.GenerateContext) -> AsyncIterator[tether.Chunk]:
        self.live += 1
        try:
            start = (request.token_ids or [0])[-1]
            limit = request.max_tokens if request.max_tokens is not None else 16
            for i in range(limit):
                if ctx.request_id in self._aborted:
                    yield tether.Chunk(finish_reason="cancelled", completion_tokens=i)
                    return
                await asyncio.sleep(self.step)
                yield tether.Chunk([start + i + 1])
            yield tether.Chunk(finish_reason="length", completion_tokens=limit)
        finally:
            self.live -= 1
            self._aborted.discard(ctx.request_id)

    async def abort(self, ctx: tether.GenerateContext) -> None:
        self.aborts[ctx.request_id] += 1
        self._aborted.add(ctx.request_id)


def app(engine: CountingEngine | None = None) -> Starlette:
    """The server's ASGI app (its adapter binds to the loop that serves it)."""
    engine = engine or CountingEngine()
    outcomes: Counter[str] = Counter()
    causes: Counter[str] = Counter()

    def observe(record: tether.Record) -> None:
        outcomes[record.outcome] += 1
        if record.cause is not None:
            causes[record.cause] += 1

    adapter = tether.Adapter(
        engine,
        kill_on_drop=True,  # an HTTP edge: the client leaving is a kill
        cancel_grace=2.0,
        observer=observe,
    )
    ids = iter(range(1, 1 << 62))

    async def completions(request: Request) -> Response:
        try:
            body = await request.json()
            prompt = [int(t) for t in body.get("prompt_tokens", [])]
            max_tokens = body.get("max_tokens")
            req = tether.Request(prompt, id=f"cmpl-{next(ids)}", max_tokens=max_tokens)
        except (ValueError, TypeError, OverflowError) as exc:
            return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error"}}, 400)
        try:
            stream = await adapter.generate(req)
        except tether.EngineError as exc:
            return JSONResponse({"error": {"message": str(exc), "type": exc.kind}}, 400)

        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in stream:
                    event: dict[str, Any] = {"id": req.id, "token_ids": chunk.token_ids}
                    if chunk.finish_reason is not None:
                        event["finish_reason"] = chunk.finish_reason
                    if chunk.error is not None:
                        event["error"] = chunk.error
                    yield f"data: {json.dumps(event)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                # Over, or abandoned by a client that left: kill-on-drop decides which.
                stream.close()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def stats(_: Request) -> Response:
        return JSONResponse(
            {
                "live": engine.live,
                "aborts": sum(engine.aborts.values()),
                "aborted_twice": sorted(r for r, n in engine.aborts.items() if n > 1),
                "outcomes": dict(outcomes),
                "causes": dict(causes),
                "unfinished_aborts": adapter.unfinished_aborts,
            }
        )

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/stats", stats),
        ]
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--step", type=float, default=0.01, help="seconds per token")
    args = parser.parse_args()
    uvicorn.run(app(CountingEngine(args.step)), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
