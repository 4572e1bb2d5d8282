#!/usr/bin/env python3
"""Client disconnects through nginx, proven end to end (run by `deploy/nginx/e2e`).

Starts 3 `tether serve --engine sim` workers (each with its own decode step, prefill
time and batch size) and one nginx built from `deploy/nginx/tether.conf` (plus three
test-only variants of its server block), then runs the cases below, each bounded in
count and time. A case counts the disconnects it makes and reads every worker's
/metrics before and after; its pass line, summed over the workers, is:

  tether_aborts_total delta           == disconnects made
  tether_engine_aborts_received delta == disconnects made   (the engine got each one)
  tether_engine_late_aborts delta     == 0                  (no double abort)
  tether_client_disconnects delta     == disconnects made
  tether_requests_in_flight           == 0 afterwards, engine slots and queue empty

Disconnect -> engine abort latency: the client notes the wall clock when it closes
(or resets) and the worker logs `engine abort received` with its own timestamp (same
machine, same clock); the access log ties the worker's request id to the client's
`x-request-id`.

Exit status 0 when every case passes (the negative control must fail its pass line),
1 otherwise. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h2.config
import h2.connection
import h2.events

# (decode step us, prefill ns per prompt token, batch size): three different workers,
# slow enough that a prefill is long and silent and a stream lasts seconds.
WORKERS = [(5_000, 250_000, 16), (8_000, 300_000, 16), (12_000, 350_000, 16)]
PREFILL_PROMPT = "p" * 1200  # 300-420 ms of silent prefill on these workers
SHORT_READ_TIMEOUT = 1  # seconds: case 6's proxy_read_timeout
LATENCY_TARGET_MS = 50.0

FAILURES: list[str] = []


def fail(msg: str) -> None:
    FAILURES.append(msg)
    print(f"  FAIL: {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- workers ------------------------------------------------------------------------


class Worker:
    def __init__(self, tether: str, index: int, cfg: tuple[int, int, int], logs: Path):
        self.tether, self.index, self.cfg, self.logs = tether, index, cfg, logs
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.generation = 0

    @property
    def name(self) -> str:
        return f"w{self.index + 1}"

    def start(self) -> None:
        step_us, prefill_ns, max_seqs = self.cfg
        self.generation += 1
        out = self.logs / f"{self.name}.{self.generation}.stdout"
        err = self.logs / f"{self.name}.{self.generation}.stderr"
        addr = f"127.0.0.1:{self.port}"
        env = dict(os.environ, RUST_LOG="warn,tether=info,tether::engine=debug")
        self.proc = subprocess.Popen(
            [self.tether, "serve", "--engine", "sim", "--addr", addr,
             "--step-us", str(step_us), "--prefill-ns", str(prefill_ns),
             "--max-seqs", str(max_seqs), "--max-tokens-limit", "100000",
             "--seed", str(self.index)],
            stdout=open(out, "w"), stderr=open(err, "w"), env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", out.read_text())
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited early:\n{err.read_text()}")
            time.sleep(0.05)
        raise SystemExit(f"{self.name} did not start within 30 s")

    def stderr_files(self) -> list[Path]:
        return sorted(self.logs.glob(f"{self.name}.*.stderr"))

    def metrics(self) -> dict[str, float]:
        return scrape(self.port)


def scrape(port: int) -> dict[str, float]:
    """Every sample of a worker's /metrics, summed by name; a few labelled ones kept."""
    status, _, body = request(port, "GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics on {port} answered {status}")
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + float(value)
        if name == "tether_requests_total" and 'outcome="finished"' in series:
            out["finished"] = out.get("finished", 0.0) + float(value)
    return out


COUNTERS = {
    "aborts": "tether_aborts_total",
    "engine_aborts": "tether_engine_aborts_received_total",
    "double_aborts": "tether_engine_late_aborts_total",
    "disconnects": "tether_client_disconnects_total",
    "accepted": "tether_engine_requests_accepted_total",
    "ended": "tether_requests_total",
    "finished": "finished",
}
GAUGES = {
    "in_flight": "tether_requests_in_flight",
    "live": "tether_engine_live_sequences",
    "queued": "tether_engine_queue_length",
}


def snapshot(workers: list[Worker]) -> dict[str, dict[str, float]]:
    return {w.name: w.metrics() for w in workers}


def settle(workers: list[Worker], timeout: float = 15.0) -> dict[str, dict[str, float]]:
    """Poll until every worker is idle (nothing in flight, no slot, no queue) and two
    scrapes in a row agree; bounded."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        # Only what the pass line reads (`/metrics` counts its own scrapes).
        snap = {n: {k: m.get(k, 0) for k in (*COUNTERS.values(), *GAUGES.values())}
                for n, m in snapshot(workers).items()}
        idle = all(m[g] == 0 for m in snap.values() for g in GAUGES.values())
        if idle and snap == last:
            return snap
        if time.monotonic() > deadline:
            fail(f"workers did not settle within {timeout:.0f} s: "
                 + ", ".join(f"{n} {gauges(m)}" for n, m in snap.items()))
            return snap
        last = snap
        time.sleep(0.05)


def gauges(m: dict[str, float]) -> dict[str, int]:
    return {k: int(m.get(v, 0)) for k, v in GAUGES.items()}


def deltas(before, after, names) -> dict[str, int]:
    return {k: int(sum(after[n].get(v, 0) - before[n].get(v, 0) for n in names))
            for k, v in COUNTERS.items()}


# --- nginx --------------------------------------------------------------------------


def render(conf: str, workers: list[Worker], ports: dict[str, int]) -> str:
    """The production file with the workers' and the listeners' ports, plus the test
    variants of its server block, each with one directive changed."""
    upstream_servers = "".join(
        f"    server 127.0.0.1:{w.port} max_fails=1 fail_timeout=10s;\n" for w in workers)
    conf, n = re.subn(r"(?m)^    server 127\.0\.0\.1:800\d [^\n]*\n(?:    server [^\n]*\n)*",
                      upstream_servers, conf)
    assert n == 1, "the upstream's server lines"
    server = conf[conf.index("server {"):]
    main = server.replace("listen 8080;", f"listen 127.0.0.1:{ports['main']};").replace(
        "listen 8081 http2;", f"listen 127.0.0.1:{ports['h2']} http2;")
    variants = [main]

    def variant(port: int, old: str, new: str) -> str:
        assert old in server, old
        v = server.replace(old, new)
        v = re.sub(r"listen 8080;\n(?:.*\n)*?    listen 8081 http2;",
                   f"listen 127.0.0.1:{port};", v)
        return v

    # Its own copy of the upstream: a read timeout marks a worker failed for
    # fail_timeout (right in production, where it means the worker is stuck), which
    # must not take the workers out of the other cases' upstream.
    upstream = conf[conf.index("upstream tether_workers {"):conf.index("server {")]
    short_upstream = upstream.replace("tether_workers", "tether_workers_short")
    short = variant(ports["short"], "proxy_read_timeout 600s;",
                    f"proxy_read_timeout {SHORT_READ_TIMEOUT}s;")
    variants.append(short.replace("proxy_pass http://tether_workers;",
                                  "proxy_pass http://tether_workers_short;"))
    variants.append(variant(ports["ignore"], "proxy_ignore_client_abort off;",
                            "proxy_ignore_client_abort on;"))
    buffered = variant(ports["buffered"], "proxy_buffering off;",
                       "proxy_buffering on;\n        proxy_ignore_headers X-Accel-Buffering;")
    variants.append(buffered)
    # nginx's defaults: HTTP/1.0 to the upstream (no keep-alive: its own upstream).
    defaults = variant(ports["defaults"], "proxy_buffering off;",
                       "proxy_buffering on;\n        proxy_ignore_headers X-Accel-Buffering;")
    defaults = defaults.replace("proxy_http_version 1.1;", "proxy_http_version 1.0;")
    variants.append(defaults)
    return conf[:conf.index("server {")] + short_upstream + "\n".join(variants)


def start_nginx(nginx: str, conf_text: str, work: Path) -> subprocess.Popen:
    (work / "tmp").mkdir(exist_ok=True)
    (work / "tether.conf").write_text(conf_text)
    top = f"""daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{ worker_connections 4096; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    include {work}/tether.conf;
}}
"""
    (work / "nginx.conf").write_text(top)
    check = subprocess.run([nginx, "-t", "-c", str(work / "nginx.conf")],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"nginx -t failed:\n{check.stderr}")
    proc = subprocess.Popen([nginx, "-c", str(work / "nginx.conf")],
                            stderr=open(work / "nginx.stderr", "w"))
    return proc


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout:.0f} s")


# --- HTTP/1.1 clients on raw sockets ------------------------------------------------


def request(port: int, method: str, path: str, body: bytes = b"",
            headers: dict[str, str] | None = None, timeout: float = 10.0):
    """A whole request on a fresh connection: (status, headers, body)."""
    s = send(port, method, path, body, headers, close=True)
    s.settimeout(timeout)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    hdrs = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    if hdrs.get(b"Transfer-Encoding", b"").lower() == b"chunked":
        rest = dechunk(rest)
    return status, hdrs, rest


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return out


def send(port, method, path, body=b"", headers=None, close=False) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return s


def completion(max_tokens: int, stream: bool, prompt: str = "hello") -> bytes:
    body = {"model": "sim", "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
    return json.dumps(body).encode()


class Stream:
    """A streamed completion on its own connection, read by hand: headers, then SSE
    events (`data:` lines) as they come; closed at a moment of the caller's choosing."""

    def __init__(self, port: int, rid: str, max_tokens: int, prompt: str = "hello",
                 stream: bool = True):
        self.rid = rid
        self.sock = send(port, "POST", "/v1/completions",
                         completion(max_tokens, stream, prompt), {"X-Request-Id": rid})
        self.buf = b""
        self.status = 0
        self.events = 0
        self.reads: list[int] = []  # events seen in each read after the headers
        self.done = False
        self.eof = False
        self.closed_at = 0.0

    def read_headers(self, timeout: float = 10.0) -> int:
        self.sock.settimeout(timeout)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"{self.rid}: connection closed before the headers")
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        if self.status != 200:
            raise RuntimeError(f"{self.rid}: answered {self.status}: {rest[:300]!r}")
        self.buf = b""
        self.count(rest)
        return self.status

    def count(self, data: bytes) -> None:
        if not data:
            return
        n = data.count(b"data: {")
        self.reads.append(n)
        self.events += n
        if b"data: [DONE]" in data:
            self.done = True

    def read_events(self, n: float, timeout: float = 10.0) -> None:
        """Read until `n` events in all, `[DONE]`, or the end of the connection (a
        reset counts as the end): `eof` says which."""
        self.sock.settimeout(timeout)
        try:
            while self.events < n and not self.done:
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.eof = True
                    return
                self.count(chunk)
        except ConnectionResetError:
            self.eof = True

    def read_to_end(self, timeout: float) -> None:
        """Read until `[DONE]` or the end of the connection."""
        self.read_events(float("inf"), timeout)

    def close(self) -> None:
        self.closed_at = time.time()
        self.sock.close()


# --- latency from the workers' logs --------------------------------------------------

TS = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z"
ABORT_LINE = re.compile(TS + r" DEBUG tether::engine: engine abort received "
                        r'request_id="?([^"\s]+)"? receipt="?(\w+)')
ACCESS_LINE = re.compile(r"tether::access: .*request_id=(\S+) client_request_id=(\S+)")


def epoch(ts: str) -> float:
    return dt.datetime.strptime(ts[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(
        tzinfo=dt.timezone.utc).timestamp()


def abort_times(workers: list[Worker]) -> dict[str, tuple[float, str]]:
    """client request id -> (wall time the engine received the abort, receipt)."""
    ids: dict[str, str] = {}
    aborts: dict[str, tuple[float, str]] = {}
    for w in workers:
        for f in w.stderr_files():
            for line in f.read_text(errors="replace").splitlines():
                if m := ACCESS_LINE.search(line):
                    ids[m.group(1)] = m.group(2)
                elif m := ABORT_LINE.search(line):
                    aborts[m.group(2)] = (epoch(m.group(1)), m.group(3))
    return {ids[r]: v for r, v in aborts.items() if r in ids}


def nearest_rank(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[round((len(xs) - 1) * q)]


# --- cases --------------------------------------------------------------------------


class Run:
    def __init__(self, workers: list[Worker], ports: dict[str, int]):
        self.workers, self.ports = workers, ports
        self.rows: list[dict] = []
        self.closes: dict[str, float] = {}
        self.latency: dict[str, tuple[float, float, int]] = {}

    def case(self, label: str, fn, expect_fail: bool = False, names=None, latency=False):
        names = names or [w.name for w in self.workers]
        print(f"\n== {label}", flush=True)
        t0 = time.monotonic()
        before = settle(self.workers)
        made, closes, sent = fn()
        after = settle(self.workers)
        d = deltas(before, after, names)
        row = {"case": label, "sent": sent, "made": made, **d,
               "in_flight_after": sum(int(after[n].get(GAUGES["in_flight"], 0)) for n in names),
               "seconds": round(time.monotonic() - t0, 1)}
        problems = judge(made, row)
        if expect_fail:
            if problems:
                print(f"  negative control failed its pass line, as it must: {'; '.join(problems)}")
                row["pass_line"] = "failed (as it must)"
            else:
                fail(f"{label}: the negative control passed the pass line: the e2e cannot tell")
                row["pass_line"] = "PASSED (wrong)"
        else:
            for p in problems:
                fail(f"{label}: {p}")
            row["pass_line"] = "ok" if not problems else "FAILED"
        if latency and closes:
            row["latency"] = self.latencies(label, closes)
        self.closes.update(closes)
        print("  " + json.dumps(row), flush=True)
        self.rows.append(row)
        return row

    def latencies(self, label: str, closes: dict[str, float]) -> dict:
        # The log lines are written before the metrics settle: they are all there.
        times = abort_times(self.workers)
        ms = []
        for rid, closed in closes.items():
            if rid not in times:
                fail(f"{label}: no `engine abort received` logged for {rid}")
                continue
            ms.append((times[rid][0] - closed) * 1000)
        if not ms:
            return {}
        out = {"n": len(ms), "p50_ms": round(nearest_rank(ms, 0.5), 2),
               "p99_ms": round(nearest_rank(ms, 0.99), 2), "max_ms": round(max(ms), 2)}
        print(f"  disconnect -> engine abort: {out}")
        return out


def judge(made: int, row: dict) -> list[str]:
    problems = []
    for key in ("aborts", "engine_aborts", "disconnects"):
        if row[key] != made:
            problems.append(f"{key} {row[key]} != disconnects made {made}")
    if row["accepted"] != row["sent"] or row["ended"] != row["sent"]:
        problems.append(f"the engines accepted {row['accepted']} and the workers ended "
                        f"{row['ended']} of {row['sent']} requests sent (a replay, or one lost)")
    if row["double_aborts"] != 0:
        problems.append(f"double aborts {row['double_aborts']}")
    if row["in_flight_after"] != 0:
        problems.append(f"in flight afterwards {row['in_flight_after']}")
    return problems


def wait_for(cond, what: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    fail(f"timed out waiting for {what}")
    return False


def total(run: Run, metric: str) -> float:
    return sum(w.metrics().get(metric, 0) for w in run.workers)


def case_queued(run: Run):
    """1: fill every worker's batch directly (bypassing nginx), queue 30 requests
    through nginx (half streamed, half unary), disconnect them, then the blockers."""
    blockers = []
    for w in run.workers:
        for j in range(w.cfg[2]):
            s = Stream(w.port, f"c1-blocker-{w.name}-{j}", 5000)
            s.read_headers()
            blockers.append(s)
    wait_for(lambda: total(run, GAUGES["live"]) == len(blockers), "the blockers to run")
    queued = [Stream(run.ports["main"], f"c1-q-{i}", 50, stream=i % 2 == 0) for i in range(30)]
    for s in queued[::2]:
        s.read_headers()
    wait_for(lambda: total(run, GAUGES["queued"]) == len(queued), "30 queued requests")
    closes = {}
    for s in queued:
        s.close()
        closes[s.rid] = s.closed_at
    wait_for(lambda: total(run, GAUGES["queued"]) == 0, "the queue to empty")
    for s in blockers:
        s.close()
    print(f"  {len(queued)} queued requests disconnected through nginx, then "
          f"{len(blockers)} running blockers directly")
    return len(queued) + len(blockers), closes, len(queued) + len(blockers)


def case_prefill(run: Run, n: int = 99):
    """2: disconnect 100 ms into a 300-420 ms prefill, before any token; 3 at a time
    (least_conn puts one on each worker), the next wave once every prefill step ended."""
    closes = {}
    tokens_seen = 0
    for wave in range(n // 3):
        streams = [Stream(run.ports["main"], f"c2-{wave}-{i}", 64, PREFILL_PROMPT)
                   for i in range(3)]
        for s in streams:
            s.read_headers()
        time.sleep(0.1)
        # All three are in the batch (no queue) and none has a token: prefilling.
        live, queued = total(run, GAUGES["live"]), total(run, GAUGES["queued"])
        if (live, queued) != (3, 0):
            fail(f"case 2: {live} live and {queued} queued at the disconnect, not 3 and 0")
        for s in streams:
            s.sock.setblocking(False)
            try:
                s.count(s.sock.recv(65536))
            except BlockingIOError:
                pass
            tokens_seen += s.events
            s.close()
            closes[s.rid] = s.closed_at
        time.sleep(0.45)  # the longest prefill step ends before the next wave
    if tokens_seen:
        fail(f"case 2: {tokens_seen} tokens arrived before the disconnect (not in prefill)")
    return len(closes), closes, len(closes)


def case_midstream(run: Run, n: int = 99):
    """3: read 3 events of each stream, then close; 33 streams at a time."""
    closes = {}
    for wave in range(n // 33):
        streams = [Stream(run.ports["main"], f"c3-{wave}-{i}", 5000) for i in range(33)]
        for s in streams:
            s.read_headers()
        for s in streams:
            s.read_events(3)
            if s.events < 3 or s.done:
                fail(f"case 3: {s.rid} ended before 3 events")
            s.close()
            closes[s.rid] = s.closed_at
    return len(closes), closes, len(closes)


def case_unary(run: Run, n: int = 30):
    """4: non-streaming requests of several seconds, the client leaving after 200 ms."""
    conns = [Stream(run.ports["main"], f"c4-{i}", 2000, stream=False) for i in range(n)]
    wait_for(lambda: total(run, GAUGES["live"]) + total(run, GAUGES["queued"]) == n,
             "the unary requests to reach the engines")
    time.sleep(0.2)
    closes = {}
    for s in conns:
        s.close()
        closes[s.rid] = s.closed_at
    return n, closes, n


def case_http2(run: Run, n: int = 10):
    """5: one HTTP/2 connection, n streamed requests; each stream is reset (RST_STREAM
    CANCEL) after 3 events while the connection stays open; a last request on the same
    connection must then complete."""
    sock = socket.create_connection(("127.0.0.1", run.ports["h2"]), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())

    def post(rid: str, body: bytes) -> int:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":path", "/v1/completions"),
                                (":scheme", "http"), (":authority", "127.0.0.1"),
                                ("content-type", "application/json"),
                                ("content-length", str(len(body))), ("x-request-id", rid)])
        conn.send_data(sid, body, end_stream=True)
        return sid

    rids = {post(f"c5-{i}", completion(5000, True)): f"c5-{i}" for i in range(n)}
    sock.sendall(conn.data_to_send())
    events = {sid: 0 for sid in rids}
    closes: dict[str, float] = {}
    last_sid, last_status, last_done = None, None, False
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not last_done:
        data = sock.recv(65536)
        if not data:
            fail("case 5: nginx closed the HTTP/2 connection")
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if ev.stream_id in events:
                    events[ev.stream_id] += ev.data.count(b"data: {")
                    rid = rids[ev.stream_id]
                    if events[ev.stream_id] >= 3 and rid not in closes:
                        conn.reset_stream(ev.stream_id, error_code=8)  # CANCEL
                        closes[rid] = time.time()
            elif isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == last_sid:
                last_status = dict(ev.headers).get(b":status")
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == last_sid:
                last_done = True
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in rids:
                fail(f"case 5: stream {rids[ev.stream_id]} ended before its reset")
        if len(closes) == n and last_sid is None:
            last_sid = post("c5-after", completion(4, False))
        sock.sendall(conn.data_to_send())
    if last_status != b"200" or not last_done:
        fail(f"case 5: the request after the resets got {last_status}, done={last_done}")
    else:
        print(f"  {n} streams reset on one connection; a request after them on the same "
              "connection answered 200")
    conn.close_connection()
    sock.sendall(conn.data_to_send())
    sock.close()
    return len(closes), closes, n + 1


def case_read_timeout(run: Run, n: int = 6):
    """6: unary generations of 10+ s behind proxy_read_timeout 1s: 504 for the client,
    nginx closes the upstream connection, the worker aborts; no retry elsewhere."""
    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: request(
            run.ports["short"], "POST", "/v1/completions", completion(2000, False),
            {"X-Request-Id": f"c6-{i}"}, timeout=30), range(n)))
    statuses = [r[0] for r in results]
    if statuses != [504] * n:
        fail(f"case 6: statuses {statuses}, expected 504 each")
    print(f"  {n} clients got 504 after {time.monotonic() - t0:.2f} s "
          f"(proxy_read_timeout {SHORT_READ_TIMEOUT}s)")
    return n, {}, n


def case_kill(run: Run, n: int = 6):
    """7: kill -9 one worker with streams in flight. Its clients get a truncated
    stream (no hang, no [DONE]); nothing is replayed on the others; the others' counts
    stay exact (the killed worker is outside the pass line). The worker is restarted."""
    streams = [Stream(run.ports["main"], f"c7-{i}", 5000) for i in range(n)]
    for s in streams:
        s.read_headers()
        s.read_events(3)
    victim = run.workers[-1]
    others = [w for w in run.workers if w is not victim]
    on_victim = int(victim.metrics()[GAUGES["in_flight"]])
    if on_victim == 0:
        fail(f"case 7: least_conn put none of the {n} streams on {victim.name}: nothing to kill")
    before = snapshot(others)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    t_kill = time.monotonic()
    truncated = []
    # The victim's streams end at once; the others go on producing.
    for s in streams:
        s.read_events(s.events + 2, timeout=10)
        if s.eof:
            truncated.append(s)
    waited = time.monotonic() - t_kill
    if len(truncated) != on_victim or any(s.done for s in truncated):
        fail(f"case 7: {len(truncated)} truncated streams, the victim had {on_victim}")
    print(f"  killed {victim.name} with {on_victim} streams; {len(truncated)} clients saw "
          f"their stream cut (no [DONE]) within {waited:.2f} s")
    closes = {}
    for s in streams:
        if s not in truncated:
            s.close()
            closes[s.rid] = s.closed_at
    after = settle(others)
    replayed = deltas(before, after, [w.name for w in others])["accepted"]
    if replayed != 0:
        fail(f"case 7: {replayed} requests accepted by the other workers after the kill")
    victim.start()
    wait_listening(victim.port)
    return len(closes), closes, n - on_victim


def case_ignore_abort(run: Run, n: int = 6):
    """8: negative control: `proxy_ignore_client_abort on`, non-streaming requests (a
    stream would still be cut: with buffering off, nginx's next write to the gone
    client fails and it closes the upstream anyway). The workers never hear of the
    disconnects: no abort, and the generations run to their end."""
    conns = [Stream(run.ports["ignore"], f"c8-{i}", 60, stream=False) for i in range(n)]
    wait_for(lambda: total(run, GAUGES["live"]) == n, "the requests to reach the engines")
    for s in conns:
        s.close()
    return n, {}, n


def case_buffering(run: Run, tokens: int = 100):
    """9: one stream through our config, through one with `proxy_buffering on` and the
    worker's X-Accel-Buffering ignored, and through nginx's defaults (those two plus
    HTTP/1.0 to the worker, so the body is close-delimited instead of chunked): events
    per read, counted."""
    out = {}
    for label, port in (("ours", run.ports["main"]), ("buffering_on", run.ports["buffered"]),
                        ("nginx_defaults", run.ports["defaults"])):
        s = Stream(port, f"c9-{label}", tokens)
        s.read_headers()
        s.read_to_end(timeout=30)
        s.close()
        out[label] = {"events": s.events, "reads": len(s.reads),
                      "events_per_read": round(s.events / max(len(s.reads), 1), 2),
                      "max_events_in_one_read": max(s.reads or [0])}
        print(f"  {label}: {out[label]}")
    ours, defaults = out["ours"], out["nginx_defaults"]
    # `tokens` token events, and the last one's finish event.
    if any(v["events"] != tokens + 1 for v in out.values()):
        fail(f"case 9: events {[v['events'] for v in out.values()]}, expected {tokens + 1}")
    if ours["max_events_in_one_read"] > 2 or ours["events_per_read"] > 1.1:
        fail(f"case 9: our config delivered events in bursts: {ours}")
    if defaults["events_per_read"] < 5:
        fail(f"case 9: nginx's buffering defaults did not batch events: {defaults}")
    return out


def run_load(run: Run, tether: str, requests: int = 2000) -> dict:
    """`tether load --url` through nginx: 2000 requests, 30 % client disconnects,
    every worker's /metrics summed."""
    print(f"\n== load: tether load --url through nginx, {requests} requests, 30 % disconnects",
          flush=True)
    before = settle(run.workers)
    cmd = [tether, "load", "--url", f"http://127.0.0.1:{run.ports['main']}",
           "--requests", str(requests), "--concurrency", "64", "--max-tokens", "16",
           "--stop", "0.1", "--kill", "0.1", "--drop", "0.1", "--json", "--no-progress"]
    for w in run.workers:
        cmd += ["--metrics-url", f"http://127.0.0.1:{w.port}/metrics"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    secs = time.monotonic() - t0
    after = settle(run.workers)
    d = deltas(before, after, [w.name for w in run.workers])
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        report = {}
    if proc.returncode != 0:
        fail(f"load: tether load --url exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    if d["double_aborts"] != 0 or d["engine_aborts"] != d["aborts"]:
        fail(f"load: engine aborts {d['engine_aborts']}, tether aborts {d['aborts']}, "
             f"double {d['double_aborts']}")
    # Unary requests that leave early may never reach a worker (the check
    # `cancellations_match_disconnects` counts them); none may reach two.
    if d["accepted"] != d["ended"] or d["ended"] > requests:
        fail(f"load: the engines accepted {d['accepted']} requests, the workers ended "
             f"{d['ended']}, {requests} were sent")
    summary = {"requests": requests, "seconds": round(secs, 1), **d,
               "checks": report.get("checks", report.get("http", {}).get("checks"))}
    print("  " + json.dumps(summary), flush=True)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tether", required=True)
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--conf", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--summary", help="write the results as JSON here")
    ap.add_argument("--only", help="run only these cases (comma-separated numbers; "
                    "for debugging: the summary and the latency target need them all)")
    args = ap.parse_args()
    t_start = time.monotonic()
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    workers = [Worker(args.tether, i, cfg, work) for i, cfg in enumerate(WORKERS)]
    nginx = None
    try:
        for w in workers:
            w.start()
        ports = {k: free_port() for k in ("main", "h2", "short", "ignore", "buffered", "defaults")}
        nginx = start_nginx(args.nginx, render(Path(args.conf).read_text(), workers, ports),
                            work)
        for p in ports.values():
            wait_listening(p)
        print("workers: " + ", ".join(
            f"{w.name} :{w.port} step {w.cfg[0] / 1000:g} ms, prefill {w.cfg[1] / 1000:g} "
            f"us/token, batch {w.cfg[2]}" for w in workers))
        print(f"nginx: main :{ports['main']}, http2 :{ports['h2']}, "
              f"read-timeout :{ports['short']}, ignore-abort :{ports['ignore']}, "
              f"buffered :{ports['buffered']}, nginx defaults :{ports['defaults']}")
        run = Run(workers, ports)
        only = set(args.only.split(",")) if args.only else None
        cases = [
            ("1", "1 queued in the engine", case_queued, {"latency": True}),
            ("2", "2 long prefill, no token yet", case_prefill, {"latency": True}),
            ("3", "3 mid-stream", case_midstream, {"latency": True}),
            ("4", "4 non-streaming", case_unary, {"latency": True}),
            ("5", "5 HTTP/2 stream reset", case_http2, {"latency": True}),
            ("6", "6 proxy_read_timeout -> 504", case_read_timeout, {}),
            ("7", "7 kill -9 of one worker", case_kill,
             {"names": [w.name for w in workers[:-1]], "latency": True}),
            ("8", "8 negative control: proxy_ignore_client_abort on", case_ignore_abort,
             {"expect_fail": True}),
        ]
        for key, label, fn, kw in cases:
            if only is None or key in only:
                run.case(label, lambda fn=fn: fn(run), **kw)
        buffering = load = None
        if only is None or "9" in only:
            print("\n== 9 buffering control", flush=True)
            buffering = case_buffering(run)
        if only is None or "load" in only:
            load = run_load(run, args.tether)

        # A clean stop: every worker exits 0 on SIGTERM (the engine's cleanup ok).
        for w in workers:
            w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                code = w.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                code = "no exit within 30 s"
            if code != 0:
                fail(f"{w.name} exited {code} after SIGTERM")
        wall = round(time.monotonic() - t_start, 1)
        print(f"\nwall time {wall} s")
        for row in run.rows:
            lat = row.get("latency", {})
            print(f"  {row['case']:<52} made {row['made']:>4}  aborts {row['aborts']:>4}  "
                  f"engine {row['engine_aborts']:>4}  double {row['double_aborts']}  "
                  f"disconnects {row['disconnects']:>4}  in-flight {row['in_flight_after']}  "
                  f"{row['pass_line']}"
                  + (f"  latency p50 {lat['p50_ms']} ms p99 {lat['p99_ms']} ms" if lat else ""))
        for key in ("2 long prefill, no token yet", "3 mid-stream"):
            row = next((r for r in run.rows if r["case"] == key), None)
            if row is None:
                continue  # --only left it out
            lat = row.get("latency", {})
            if not lat or lat["p99_ms"] >= LATENCY_TARGET_MS:
                fail(f"{key}: disconnect -> abort p99 {lat.get('p99_ms')} ms, target < "
                     f"{LATENCY_TARGET_MS} ms")
        if args.summary:
            Path(args.summary).write_text(json.dumps(
                {"wall_s": wall, "cases": run.rows, "buffering": buffering, "load": load},
                indent=2))
    finally:
        for w in workers:
            if w.proc and w.proc.poll() is None:
                w.proc.kill()
        if nginx and nginx.poll() is None:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(timeout=10)
            except subprocess.TimeoutExpired:
                nginx.kill()
    if FAILURES:
        print(f"\nnginx e2e: FAILED ({len(FAILURES)}):")
        for f in FAILURES:
            print(f"  - {f}")
        return 1
    print("nginx e2e: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
