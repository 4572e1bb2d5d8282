"""The Starlette example (``examples/server.py``) served for real by uvicorn, driven by
``httpx``: a client that disconnects mid-stream gets its request aborted exactly once."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import server  # noqa: E402


@pytest.fixture(params=["asyncio", "uvloop"])
def base_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The example app on a loopback port, served by uvicorn on its own thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(server.app(server.CountingEngine(step=0.005)), loop=request.param, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    guard = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < guard, "uvicorn did not start within 10 s"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(10)
    assert not thread.is_alive(), "uvicorn did not stop within 10 s"


def stats_when(client: httpx.Client, done: Any, guard: float = 10.0) -> dict[str, Any]:
    """``/stats`` once ``done(stats)`` holds (the server finishes a request after the
    client has gone, on its own time); fails after ``guard`` seconds."""
    give_up = time.monotonic() + guard
    while True:
        stats = client.get("/stats").json()
        if done(stats):
            return stats
        assert time.monotonic() < give_up, f"stats never settled: {stats}"
        time.sleep(0.01)


def events(lines: Iterator[str]) -> Iterator[Any]:
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def test_a_whole_stream_is_one_terminal_and_no_abort(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as client:
        with client.stream("POST", "/v1/completions", json={"prompt_tokens": [10], "max_tokens": 3}) as r:
            assert r.status_code == 200
            got = list(events(r.iter_lines()))
        assert [e["token_ids"] for e in got[:3]] == [[11], [12], [13]]
        assert got[3]["finish_reason"] == "length" and got[4] == "[DONE]"
        stats = stats_when(client, lambda s: s["live"] == 0)
        assert (stats["aborts"], stats["outcomes"]) == (0, {"finished": 1})


def test_a_client_disconnect_aborts_the_engine_exactly_once(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as client:
        with client.stream("POST", "/v1/completions", json={"prompt_tokens": [1], "max_tokens": 100_000}) as r:
            it = events(r.iter_lines())
            assert [next(it)["token_ids"], next(it)["token_ids"]] == [[2], [3]]
        # The `with` closed the connection mid-stream.
        stats = stats_when(client, lambda s: s["live"] == 0 and s["outcomes"])
        assert stats["aborts"] == 1
        assert stats["aborted_twice"] == []
        assert stats["outcomes"] == {"cancelled": 1}
        assert stats["causes"] == {"client_disconnect": 1}
        assert stats["unfinished_aborts"] == 0


def test_many_clients_leaving_at_once_each_abort_once(base_url: str) -> None:
    n = 8

    def leave_early() -> None:
        with httpx.Client(base_url=base_url) as c:
            with c.stream("POST", "/v1/completions", json={"prompt_tokens": [5], "max_tokens": 100_000}) as r:
                next(events(r.iter_lines()))

    threads = [threading.Thread(target=leave_early) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    with httpx.Client(base_url=base_url) as client:
        stats = stats_when(client, lambda s: s["live"] == 0 and sum(s["outcomes"].values()) == n)
        assert (stats["aborts"], stats["aborted_twice"]) == (n, [])
        assert stats["outcomes"] == {"cancelled": n}
        assert stats["causes"] == {"client_disconnect": n}


def test_bad_json_fields_get_a_400(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as client:
        r = client.post("/v1/completions", json={"prompt_tokens": [-1]})
        assert r.status_code == 400
        assert "error" in r.json()
