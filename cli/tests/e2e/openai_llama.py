#!/usr/bin/env python3
"""End-to-end test of `tether serve --engine llama-cpp` with the official `openai`
Python client, on the tiny GGUF model `write_gguf` writes (random weights, a real BPE
vocabulary, a ChatML-like chat template; served as `ci-tiny`).

Run by `.ci/serve-e2e llama MODEL.gguf`. It checks: the model is listed under its
file's name; a streamed chat's text equals the unary one's (the model's own template
and tokenizer, greedy), and its usage counts the template's tokens; a seeded sampled
completion repeats and another seed differs; penalties are accepted; a stop string
taken from the model's own text ends it there with `stop`; a client that closes its
stream after 3 chunks aborts the engine; and /metrics agrees once settled: the aborts
sent equal those the engine received (the closed stream and the stop string), nothing
in flight, no sequence held.
"""

import argparse

import openai

from openai_e2e import check, settled_metrics

MODEL = "ci-tiny"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--idle-timeout", type=float, default=None, help="unused here")
    args = parser.parse_args()
    base = args.base_url.rstrip("/")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=args.api_key or "unused", max_retries=0, timeout=60)

    models = client.models.list()
    check([m.id for m in models.data] == [MODEL], "GET /v1/models lists the GGUF file's name")

    messages = [{"role": "user", "content": "hello there"}]
    greedy = {"ignore_eos": True}
    unary = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, extra_body=greedy)
    text = unary.choices[0].message.content
    check(unary.usage.completion_tokens == 16, "unary chat: 16 tokens")
    # <|im_start|> user \n hello there <|im_end|> \n <|im_start|> assistant \n: the
    # control tokens count one each, so the prompt is far shorter than its bytes.
    prompt_bytes = len("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
    check(
        6 < unary.usage.prompt_tokens < prompt_bytes,
        f"unary chat: the template's prompt in the model's tokens ({unary.usage.prompt_tokens})",
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, stream=True, extra_body=greedy,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    check(streamed == text, "chat stream: the same text as the unary reply, in pieces")

    sampled = dict(temperature=1.0, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3)
    extra = {"top_k": 40, "repetition_penalty": 1.1, "ignore_eos": True}
    a = client.completions.create(model=MODEL, prompt="the tether", max_tokens=12, seed=7, extra_body=extra, **sampled)
    b = client.completions.create(model=MODEL, prompt="the tether", max_tokens=12, seed=7, extra_body=extra, **sampled)
    c = client.completions.create(model=MODEL, prompt="the tether", max_tokens=12, seed=8, extra_body=extra, **sampled)
    check(a.choices[0].text == b.choices[0].text, "a seed repeats its text")
    check(a.choices[0].text != c.choices[0].text, "another seed draws another text")

    full = client.completions.create(model=MODEL, prompt="once", max_tokens=24, extra_body=greedy)
    whole = full.choices[0].text
    # Two characters of the model's text past its start (random weights also emit
    # bytes that are no UTF-8, which come out as U+FFFD: not those).
    starts = [i for i in range(4, len(whole) - 1) if "\ufffd" not in whole[i : i + 2]]
    check(bool(starts), f"the model's text has two clean characters ({whole!r})")
    stop = whole[starts[0] : starts[0] + 2]
    check(stop in whole, f"a stop string from the model's text ({stop!r})")
    cut = client.completions.create(model=MODEL, prompt="once", max_tokens=24, stop=[stop], extra_body=greedy)
    check(cut.choices[0].text == whole[: whole.index(stop)], "stop string: the text ends before it")
    check(cut.choices[0].finish_reason == "stop", "stop string: finish_reason stop")

    stream = client.completions.create(
        model=MODEL, prompt="a long story", max_tokens=1500, stream=True, extra_body=greedy,
    )
    seen = 0
    for _chunk in stream:
        seen += 1
        if seen == 3:
            break
    stream.close()
    check(seen == 3, "closed a long stream after 3 chunks")

    m = settled_metrics(base, 2)
    check(m["tether_requests_in_flight"] == 0, "metrics: nothing in flight")
    check(m["tether_engine_live_sequences"] == 0, "metrics: no sequence held")
    check(m["tether_aborts_total"] == 2, "metrics: two aborts sent (the closed stream, the stop string)")
    check(m["tether_engine_aborts_received_total"] == 2, "metrics: the engine received both")
    print("openai_llama: all checks passed")


if __name__ == "__main__":
    main()
