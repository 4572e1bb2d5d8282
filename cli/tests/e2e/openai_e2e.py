#!/usr/bin/env python3
"""End-to-end test of `tether serve` with the official `openai` Python client.

Run by `.ci/serve-e2e` against `tether serve --engine sim --allow-chaos` on
127.0.0.1. It streams a chat completion and a completion, makes unary calls, closes
one stream after 3 chunks, checks that an engine error mid-stream raises, that bad
input is a 400/404 with an OpenAI error body, that a wrong API key is refused (with
`--api-key`: the server's key, which the client sends as its bearer token), that
/health and /health/canary are ok, that /metrics agrees: one abort, one cancelled
request, nothing in flight, no engine slot held; and finally (after the metrics, so
their counts stay as above) that a parameter the engine does not honour is refused by
name while its default is accepted (check_output_parameters).

It also measures and prints the time to the first SSE event of streamed requests
sent one after another on ONE reused keep-alive connection (the case where a
server without TCP_NODELAY holds the first event back for ~40 ms, until the
client's delayed ACK), with a generous sanity bound on the median; and, given
`--idle-timeout`, that a connection that sends nothing is closed by the server.
"""

import argparse
import socket
import sys
import time

import json
import urllib.error
import urllib.request

import openai

try:  # the HTTP client the openai package ships with (httpx, renamed httpx2 lately)
    import httpx2 as httpx
except ImportError:
    import httpx

MODEL = "sim"
# The median first-event time on a reused connection must stay below this: Nagle's
# algorithm meeting a delayed ACK costs 40 ms a request on Linux, a loaded 2-core CI
# box a few ms at worst.
FIRST_EVENT_P50_BOUND_MS = 30.0


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"  ok  {what}")


def http_get(url):
    """(status, body) of a GET, with the standard library only."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def parse_metrics(text):
    """Prometheus/OpenMetrics text -> {series: value} (labels as written)."""
    samples = {}
    lines = text.strip().splitlines()
    check(lines[-1] == "# EOF", "/metrics ends with # EOF")
    for line in lines:
        if line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        samples[series] = float(value)
    return samples


def total(samples, name, **labels):
    """The sum of the samples of `name` that carry every `labels` (k="v")."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    out = 0.0
    for series, value in samples.items():
        base, _, rest = series.partition("{")
        have = rest.rstrip("}").split(",") if rest else []
        if base == name and all(w in have for w in want):
            out += value
    return out


def stop_strings(client):
    """Multi-byte stop strings, matched across chunks (one byte token per chunk):
    SimEngine's `sim:echo` annotation makes the text the prompt. Returns the number of
    requests made (all finish) and of engine aborts they caused."""
    prompt = "物語の終わりです 🦀 and more text"
    echo = {"annotations": ["sim:echo"]}
    # Streaming chat-free completion: the text ends before the stop string.
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=500, stream=True, stop=["終わり", "🦀"], extra_body=echo,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    check(text == "物語の", f"stop string (stream): the text ends before it ({text!r})")
    check(reasons == ["stop"], f"stop string (stream): finish_reason stop ({reasons})")
    # Unary, four stop strings, the crab completes first.
    completion = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=500, stop=["never", "🦀", "more", "text"], extra_body=echo,
    )
    check(completion.choices[0].text == "物語の終わりです ", "stop string (unary): text before the crab")
    check(completion.choices[0].finish_reason == "stop", "stop string (unary): finish_reason stop")
    check(completion.usage.completion_tokens == len("物語の終わりです 🦀".encode()), "stop string (unary): usage up to the match")
    # No match: everything comes back, held-back text included.
    completion = client.completions.create(
        model=MODEL, prompt="hello wor", max_tokens=9, stop="world", extra_body=echo,
    )
    check(completion.choices[0].text == "hello wor", "stop string: held-back text sent when no match comes")
    check(completion.choices[0].finish_reason == "length", "stop string: no match, finish_reason length")
    # Two early finishes, one abort each; the last one ended by itself.
    return 3, 2


def settled_metrics(base, aborts, wait=15.0):
    """/metrics once it has settled: nothing in flight, no engine sequence held, and
    `aborts` aborts sent and received by the engine; the last reading after `wait`
    seconds otherwise (the caller's checks then say what did not settle)."""
    deadline = time.monotonic() + wait
    while True:
        m = parse_metrics(http_get(f"{base}/metrics")[1])
        settled = (
            m["tether_requests_in_flight"] == 0
            and m["tether_engine_live_sequences"] == 0
            and m["tether_engine_aborts_received_total"] == m["tether_aborts_total"]
            and m["tether_aborts_total"] == aborts
        )
        if settled or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def percentile(values, q):
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def reused_connection_latency(base, api_key=None, requests=20):
    """Time to the first `data:` line of `requests` streamed completions sent one after
    another on one keep-alive connection (after a warm-up request on it), in ms."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": True}
    times, ports = [], set()
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base, timeout=30, headers=headers) as http:
        warm = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        check(warm.status_code == 200, "latency: warm-up request on the connection")
        for _ in range(requests):
            start = time.perf_counter()
            first = None
            with http.stream("POST", "/v1/completions", json=body) as resp:
                stream = resp.extensions.get("network_stream")
                sock = stream.get_extra_info("socket") if stream is not None else None
                if sock is not None:
                    ports.add(sock.getsockname()[1])
                lines = []
                for line in resp.iter_lines():
                    if first is None and line.startswith("data:"):
                        first = (time.perf_counter() - start) * 1000.0
                    lines.append(line)
            if first is None or "data: [DONE]" not in lines:
                raise AssertionError(f"latency: a streamed request did not complete: {lines!r}")
            times.append(first)
    if ports:
        check(len(ports) == 1, f"latency: all {requests} streams reused one connection")
    return times


def idle_connection_closed(base, idle_timeout):
    """Open a connection, send nothing, and wait (bounded) for the server to close it;
    returns the seconds it took."""
    host, port = base.split("://", 1)[1].rsplit(":", 1)
    bound = idle_timeout + 15
    with socket.create_connection((host, int(port)), timeout=bound) as sock:
        start = time.monotonic()
        try:
            data = sock.recv(1024)
        except socket.timeout:
            raise AssertionError(f"idle connection still open after {bound}s")
        except ConnectionResetError:
            data = b""
        waited = time.monotonic() - start
    check(data == b"", "idle connection: closed without a byte sent")
    return waited


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    parser.add_argument(
        "--idle-timeout", type=float, default=None,
        help="the server's --idle-timeout in seconds: check that an idle connection is closed",
    )
    args = parser.parse_args()
    base = args.base_url.rstrip("/")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=args.api_key or "unused", max_retries=0, timeout=30)
    finished = 0

    if args.api_key:
        wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
        try:
            wrong.models.list()
            check(False, "a wrong API key is refused")
        except openai.AuthenticationError as e:
            check(
                e.status_code == 401 and e.body["code"] == "invalid_api_key",
                "a wrong API key: 401 invalid_api_key",
            )

    models = client.models.list()
    check([m.id for m in models.data] == [MODEL], "GET /v1/models lists the served model")

    # Streaming chat completion, with usage.
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    finished += 1
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(chunks[0].choices[0].delta.role == "assistant", "chat stream: the role comes first")
    check(len(content) == 12, f"chat stream: 12 tokens of text ({content!r})")
    check(reasons == ["length"], "chat stream: one finish_reason, length")
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12, "chat stream: usage chunk")

    # Streaming completion.
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, stream=True)
    chunks = list(stream)
    finished += 1
    text = "".join(c.choices[0].text for c in chunks)
    check(len(text) == 10, f"completion stream: 10 tokens of text ({text!r})")
    check(chunks[-1].choices[0].finish_reason == "length", "completion stream: finish_reason length")

    # Unary calls.
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=7
    )
    finished += 1
    check(chat.choices[0].message.role == "assistant", "unary chat: assistant message")
    check(chat.usage.completion_tokens == 7, "unary chat: usage")
    completion = client.completions.create(model=MODEL, prompt="abc", max_tokens=5)
    finished += 1
    check(completion.usage.prompt_tokens == 3, "unary completion: 3 byte tokens of prompt")
    check(len(completion.choices[0].text) == 5, "unary completion: 5 tokens of text")

    # A client that closes its stream after 3 chunks: the server must abort the engine.
    stream = client.completions.create(model=MODEL, prompt="a long story", max_tokens=20000, stream=True)
    seen = 0
    for _chunk in stream:
        seen += 1
        if seen == 3:
            break
    stream.close()
    check(seen == 3, "closed a long stream after 3 chunks")

    # An engine error mid-stream is raised by the client (no [DONE]).
    stream = client.completions.create(
        model=MODEL, prompt="x", max_tokens=10, stream=True,
        extra_body={"annotations": ["chaos:error@2"]},
    )
    got, raised = 0, None
    try:
        for _chunk in stream:
            got += 1
    except openai.APIError as e:
        raised = e
    check(raised is not None and got == 2, f"error mid-stream raised after 2 chunks ({raised!r})")

    # Bad input: 400 / 404 with an OpenAI error object.
    try:
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
        check(False, "negative max_tokens is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.body["param"] == "max_tokens", "negative max_tokens: 400, param max_tokens")
    try:
        client.completions.create(model="gpt-4", prompt="x")
        check(False, "unknown model is refused")
    except openai.NotFoundError as e:
        check(e.status_code == 404 and e.body["code"] == "model_not_found", "unknown model: 404 model_not_found")

    made, stop_aborts = stop_strings(client)
    finished += made

    status, body = http_get(f"{base}/health")
    check(status == 200 and json.loads(body)["status"] == "ok", "GET /health is ok")
    status, body = http_get(f"{base}/health/canary")
    check(status == 200 and json.loads(body)["status"] == "ok", "GET /health/canary is ok")

    # /metrics agrees with what happened (the abort may take a moment to land).
    m = settled_metrics(base, 1 + stop_aborts)
    check(m["tether_requests_in_flight"] == 0, "metrics: nothing in flight")
    check(m["tether_engine_live_sequences"] == 0, "metrics: no engine slot held")
    check(
        m["tether_aborts_total"] == 1 + stop_aborts,
        f"metrics: exactly {1 + stop_aborts} aborts sent (the closed stream, the stop strings)",
    )
    check(m["tether_engine_aborts_received_total"] == 1 + stop_aborts, "metrics: the engine received them")
    requests = lambda outcome: total(m, "tether_requests_total", outcome=outcome)
    check(requests("cancelled") == 1, "metrics: one cancelled request")
    check(
        m['tether_requests_total{outcome="cancelled",endpoint="completions",stream="true"}'] == 1,
        "metrics: the cancelled request was a streamed completion",
    )
    check(
        m['tether_cancellations_total{cause="client_disconnect",endpoint="completions",stream="true"}'] == 1,
        "metrics: cancelled by the client's disconnect",
    )
    check(requests("finished") == finished, f"metrics: {finished} finished requests")
    check(requests("failed") == 1, "metrics: one failed request (the injected error)")
    check(requests("dropped") == 0, "metrics: none dropped")
    check(requests("timed_out") == 0, "metrics: none timed out")
    check(m["tether_time_to_first_token_seconds_count"] >= finished, "metrics: time to first token observed")
    errors5xx = [k for k in m if k.startswith("tether_http_responses_total") and 'status="5' in k and m[k] > 0]
    check(not errors5xx, "metrics: no 5xx responses")
    check(m['tether_http_responses_total{endpoint="/v1/completions",status="400"}'] == 1, "metrics: one 400")
    check(m['tether_http_responses_total{endpoint="/v1/completions",status="404"}'] == 1, "metrics: one 404")
    if args.api_key:
        check(m['tether_http_responses_total{endpoint="/v1/models",status="401"}'] == 1, "metrics: one 401")
    check_output_parameters(client)

    # Last: the first event's latency on a reused keep-alive connection (printed).
    times = reused_connection_latency(base, args.api_key)
    p50, worst = percentile(times, 0.5), max(times)
    print(f"  first SSE event on a reused connection: p50 {p50:.2f} ms, max {worst:.2f} ms ({len(times)} requests)")
    check(p50 < FIRST_EVENT_P50_BOUND_MS, f"latency: p50 below {FIRST_EVENT_P50_BOUND_MS:.0f} ms (no Nagle stall)")

    if args.idle_timeout is not None:
        waited = idle_connection_closed(base, args.idle_timeout)
        print(f"  idle connection closed after {waited:.2f} s (--idle-timeout {args.idle_timeout:g} s)")
        check(waited >= args.idle_timeout * 0.9, "idle connection: not closed before the idle timeout")
    print("openai e2e: all checks passed")
    return 0


def check_output_parameters(client):
    """Parameters that change the output: SimEngine honours seed, min_tokens and
    ignore_eos only, so any other one at a non-default value is a 400 naming it, and
    the defaults that clients always send are accepted."""
    refused = [
        ("presence_penalty", lambda: client.completions.create(
            model=MODEL, prompt="x", max_tokens=3, presence_penalty=0.5)),
        ("temperature", lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0.7)),
        ("top_p", lambda: client.completions.create(
            model=MODEL, prompt="x", max_tokens=3, top_p=0.5, stream=True)),
        ("response_format", lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            response_format={"type": "json_object"})),
        ("top_k", lambda: client.completions.create(
            model=MODEL, prompt="x", max_tokens=3, extra_body={"top_k": 40})),
    ]
    for param, call in refused:
        try:
            call()
            check(False, f"{param}: a non-default value is refused")
        except openai.BadRequestError as e:
            check(
                e.status_code == 400 and e.body["param"] == param
                and e.body["code"] == "unsupported_parameter",
                f"{param}: a non-default value is a 400 naming it",
            )
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=1, top_p=1, presence_penalty=0, frequency_penalty=0,
        response_format={"type": "text"}, tool_choice="none",
    )
    check(chat.usage.completion_tokens == 4, "chat sending the defaults succeeds")
    completion = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=4, temperature=1, top_p=1, best_of=1,
        extra_body={"top_k": -1, "repetition_penalty": 1},
    )
    check(len(completion.choices[0].text) == 4, "completion sending the defaults succeeds")
    seeded = [
        client.completions.create(model=MODEL, prompt="abc", max_tokens=8, seed=seed).choices[0].text
        for seed in (5, 5, 6)
    ]
    check(seeded[0] == seeded[1] and seeded[0] != seeded[2], "sim honours seed: same seed, same text")


if __name__ == "__main__":
    sys.exit(main())
