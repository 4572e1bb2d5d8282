#!/usr/bin/env python3
"""Connection-level stress of a running `tether serve` (not part of `cargo test`).

Two scenarios, each printing what the server did:

- `slowloris`: N connections each send a request head one byte every `--interval`
  seconds and never finish it. A server with a header-read timeout closes them
  (`--header-read-timeout`, 10 s by default); one without keeps them forever.
- `idle`: N connections that send nothing at all. Against a server started under
  `ulimit -n 1024`, a server without a connection limit runs out of file
  descriptors and stops accepting (new clients, /metrics scrapes included, hang in
  the listen backlog); with `--max-connections` the ones beyond the limit get an
  immediate 503 and are closed, and the idle ones are closed after `--idle-timeout`.

Meanwhile a prober scrapes /metrics on a fresh connection every second and reports
how each scrape went. Standard library only.

    conn_stress.py --addr 127.0.0.1:8000 slowloris --conns 200 --seconds 15
    conn_stress.py --addr 127.0.0.1:8000 idle --conns 1100 --seconds 15
"""

import argparse
import asyncio
import statistics
import time

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: tether\r\nContent-Type: application/json\r\nX-Padding: " + b"a" * 200


class Conn:
    def __init__(self):
        self.opened = False
        self.closed_at = None  # seconds after the start, when the server closed it
        self.response = b""
        self.error = None


async def watch(reader, conn, start):
    """Read until the server closes the connection; keep what it sent."""
    try:
        while True:
            data = await reader.read(4096)
            if not data:
                break
            conn.response += data
    except (ConnectionError, OSError) as e:
        conn.error = type(e).__name__
    conn.closed_at = time.monotonic() - start


async def slowloris_one(host, port, conn, start, seconds, interval, opening):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, asyncio.TimeoutError) as e:
        conn.error = f"connect: {type(e).__name__}"
        return
    finally:
        opening.release()
    conn.opened = True
    watcher = asyncio.create_task(watch(reader, conn, start))
    for byte in HEAD:
        if watcher.done() or time.monotonic() - start > seconds:
            break
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except (ConnectionError, OSError):
            break
        await asyncio.sleep(interval)
    remaining = seconds - (time.monotonic() - start)
    if remaining > 0 and not watcher.done():
        await asyncio.wait([watcher], timeout=remaining)
    watcher.cancel()
    writer.close()


async def idle_one(host, port, conn, start, seconds, opening):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, asyncio.TimeoutError) as e:
        conn.error = f"connect: {type(e).__name__}"
        return
    finally:
        opening.release()
    conn.opened = True
    watcher = asyncio.create_task(watch(reader, conn, start))
    remaining = seconds - (time.monotonic() - start)
    if remaining > 0:
        await asyncio.wait([watcher], timeout=remaining)
    watcher.cancel()
    writer.close()


async def probe(host, port, start, seconds, out, opened):
    """GET /metrics on a fresh connection every second, once every connection of the
    scenario was tried: (t, status line or error, ms)."""
    await opened()
    while time.monotonic() - start < seconds:
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: tether\r\nConnection: close\r\n\r\n")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(64), 2)
            status = data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed without a response"
            writer.close()
        except (OSError, asyncio.TimeoutError) as e:
            status = f"no answer ({type(e).__name__})"
        out.append((t0 - start, status, (time.monotonic() - t0) * 1000))
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))


def summary(conns, seconds):
    opened = [c for c in conns if c.opened]
    closed = [c for c in opened if c.closed_at is not None and c.closed_at < seconds]
    refused = [c for c in opened if c.response.startswith(b"HTTP/1.1 503")]
    other = [c for c in opened if c.response and not c.response.startswith(b"HTTP/1.1 503")]
    print(f"  connections opened: {len(opened)} of {len(conns)}")
    errors = sorted({c.error for c in conns if c.error})
    if errors:
        print(f"  client-side errors: {errors}")
    print(f"  closed by the server within {seconds}s: {len(closed)}")
    if closed:
        at = [c.closed_at for c in closed]
        print(f"    closed at (s): min {min(at):.2f}, median {statistics.median(at):.2f}, max {max(at):.2f}")
    print(f"  answered 503: {len(refused)}")
    if refused:
        print("    first 503:", refused[0].response.decode(errors="replace").replace("\r\n", " | "))
    if other:
        print(f"  other responses: {len(other)}, e.g. {other[0].response[:80]!r}")


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", required=True, help="HOST:PORT")
    parser.add_argument("scenario", choices=["slowloris", "idle"])
    parser.add_argument("--conns", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--interval", type=float, default=1.0, help="slowloris: seconds between bytes")
    args = parser.parse_args()
    host, port = args.addr.rsplit(":", 1)
    port = int(port)
    start = time.monotonic()
    conns = [Conn() for _ in range(args.conns)]
    probes = []
    # Released once per connection tried: the prober waits for all of them, so it
    # measures the server with every connection in place (not racing the ramp-up).
    opening = asyncio.Semaphore(0)

    async def opened():
        for _ in conns:
            await opening.acquire()

    if args.scenario == "slowloris":
        tasks = [slowloris_one(host, port, c, start, args.seconds, args.interval, opening) for c in conns]
    else:
        tasks = [idle_one(host, port, c, start, args.seconds, opening) for c in conns]
    await asyncio.gather(probe(host, port, start, args.seconds, probes, opened), *tasks)
    print(f"{args.scenario}: {args.conns} connections for {args.seconds}s")
    summary(conns, args.seconds)
    print("  /metrics probes (t s: answer, ms):")
    for t, status, ms in probes:
        print(f"    {t:5.1f}: {status} ({ms:.1f} ms)")


if __name__ == "__main__":
    asyncio.run(main())
