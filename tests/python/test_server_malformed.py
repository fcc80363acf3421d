"""A corpus of malformed requests (truncated JSON, wrong types, huge and
negative numbers, invalid UTF-8, 10 MB bodies, unknown models, deep nesting,
slow and vanishing clients) sent to `monet serve` while valid traffic runs:
the server never crashes, every malformed request gets an OpenAI-shaped 4xx
(or its connection is dropped), and the valid answers stay exact."""
import json
import socket
import threading
import time

import pytest

from monet_ref import chat_templates
from monet_ref.make_checkpoint import make_checkpoint
from test_server_openai import ServerProcess, http

PROMPTS = [[1, 284, 259, 272, 292, 100, 7], [1, 10, 20, 30], [1, 250, 251, 5, 6]]


def corpus():
    """(name, raw request body) of completions requests the server must refuse with 4xx."""
    ok = {"model": "vd", "prompt": "the cat", "max_tokens": 4}
    bodies = []
    text = json.dumps(ok).encode()
    for cut in (1, 5, len(text) // 2, len(text) - 1):
        bodies.append(("truncated", text[:cut]))
    bodies += [("empty", b""), ("not json", b"hello"), ("array", b"[1,2,3]"), ("number", b"42"), ("null", b"null"),
               ("nested", b"[" * 100000 + b"]" * 100000), ("deep object", b'{"a":' * 50000 + b"1" + b"}" * 50000),
               ("invalid utf-8", b'{"model": "vd", "prompt": "\xff\xfe\xc3"}'),
               ("invalid utf-8 key", b'{"model": "vd", "\xc3\x28": 1, "prompt": "x"}'),
               ("lone surrogate", b'{"model": "vd", "prompt": "\\ud800"}'),
               ("nul", b'{"model": "vd", "prompt": "a\x00b"}')]
    wrong = {
        "model": [None, 5, ["vd"], "nope", ""],
        "prompt": [None, 5, {"a": 1}, [], [[]], [1.5], [-1], [2 ** 31], [2 ** 64], [True], [[1, "a"]], ["x", 5]],
        "max_tokens": [-1, 1.5, "4", 10 ** 20, -10 ** 20, 2 ** 63, 1e308, True, [4]],
        "temperature": [-1, 3, "0", float("nan"), 1e309],
        "top_p": [0, -0.5, 1.5, "1"], "top_k": [-2, 10 ** 12, 0.5], "min_p": [-0.1, 1, 2],
        "seed": [1.5, "7", 2 ** 70, [1]], "n": [0, -1, 17, 10 ** 9, 1.0],
        "stop": [5, [""], [5], ["a"] * 17, {"a": "b"}, "x" * 5000],
        "logprobs": [-1, 21, 10 ** 6, "5", True], "echo": [1, "true"], "stream": [1, "yes"],
        "stream_options": [{"include_usage": True}, 5], "user": [5],
        "expert_mask": [5, [], {"experts": [{"group": 99, "expert": 0}]}, {"experts": [{"group": 0, "expert": -1}]},
                        {"components": [{"group": 0, "side": 3, "index": 0}]}, {"experts": "x"}],
        "return_experts": [5, "yes", {"threshold": 2}, {"top": -1}, {"bogus": 1}],
        "return_token_ids": [1, "no"], "frobnicate": [1],
    }
    for key, values in wrong.items():
        for v in values:
            body = dict(ok)
            body[key] = v
            if key == "stream_options":
                body.pop("stream", None)
            raw = json.dumps(body, allow_nan=True).encode()
            bodies.append((f"{key}={str(v)[:30]}", raw))
    bodies.append(("prompt beyond the context", json.dumps({"model": "vd", "prompt": [1] * 5000}).encode()))
    bodies.append(("max_tokens beyond the context", json.dumps({"model": "vd", "prompt": [1] * 60,
                                                                 "max_tokens": 100}).encode()))
    bodies.append(("10 MB", b'{"model": "vd", "prompt": "' + b"a" * (10 << 20) + b'"}'))
    return bodies


def raw_request(port, head: bytes, body: bytes = b"", *, chunk=None, pause=0.0, close_early=False, timeout=30):
    """Sends bytes (optionally in slow chunks); returns the status code or None (connection dropped)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        data = head + body
        if chunk:
            for k in range(0, len(data), chunk):
                s.sendall(data[k:k + chunk])
                time.sleep(pause)
        else:
            s.sendall(data)
        if close_early:
            return None
        reply = b""
        while b"\r\n" not in reply:
            part = s.recv(4096)
            if not part:
                return None
            reply += part
        return int(reply.split(b" ", 2)[1])
    except (ConnectionError, socket.timeout, BrokenPipeError):
        return None
    finally:
        s.close()


def post_head(path, length, extra=b""):
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            .encode() + extra + b"\r\n")


@pytest.fixture(scope="module")
def served(monet_bin, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mal") / "vd")
    make_checkpoint(path, vocab=301, layers=2, groups=2, seed=5, tokenizer=True, max_pos=64,
                    chat_template=chat_templates.LLAMA2)
    s = ServerProcess(monet_bin, path, "--parallel", "4")
    yield s
    s.stop()


def greedy(base, prompt, stream=False):
    body = {"model": "vd", "prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    status, r = http(base + "/v1/completions", body, key=None)
    assert status == 200, r
    return r["choices"][0]["token_ids"], r["choices"][0]["text"]


def test_malformed_corpus_with_valid_traffic(served):
    port = int(served.url.rsplit(":", 1)[1])
    want = {tuple(p): greedy(served.base, p) for p in PROMPTS}
    valid_errors, valid_done = [], [0]
    stop = threading.Event()

    def valid_traffic():
        k = 0
        while not stop.is_set():
            p = PROMPTS[k % len(PROMPTS)]
            k += 1
            try:
                got = greedy(served.base, p)
            except AssertionError as e:
                valid_errors.append(str(e))
                continue
            if got != want[tuple(p)]:
                valid_errors.append(f"{p}: {got} != {want[tuple(p)]}")
            valid_done[0] += 1

    refused, unexpected = [], []

    def malformed(items):
        for name, body in items:
            status = raw_request(port, post_head("/v1/completions", len(body)), body)
            if status is None and not name.startswith("10 MB"):
                unexpected.append((name, "connection dropped"))
            elif status is not None and not 400 <= status < 500:
                unexpected.append((name, status))
            else:
                refused.append(name)

    def slow_and_vanishing():
        body = json.dumps({"model": "vd", "prompt": "the cat", "max_tokens": 3}).encode()
        # A slow client: the request a few bytes at a time (still answered).
        status = raw_request(port, post_head("/v1/completions", len(body)), body, chunk=8, pause=0.05)
        if status != 200:
            unexpected.append(("slow client", status))
        # Clients that go away: mid-headers, mid-body, after a lying Content-Length.
        raw_request(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le", close_early=True)
        raw_request(port, post_head("/v1/completions", len(body)), body[:10], close_early=True)
        raw_request(port, post_head("/v1/completions", 1000), body, close_early=True)
        # A connection that sends nothing, and a streamed request dropped after its headers are sent.
        s = socket.create_connection(("127.0.0.1", port))
        time.sleep(0.5)
        s.close()
        sbody = json.dumps({"model": "vd", "prompt": "the cat", "max_tokens": 40, "stream": True}).encode()
        raw_request(port, post_head("/v1/completions", len(sbody)), sbody, close_early=True)
        # Garbage instead of HTTP, a bad method and an unknown route.
        for head in (b"\x00\x01\x02garbage\r\n\r\n", b"BREW /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n"):
            status = raw_request(port, head)
            if status is not None and not 400 <= status < 500:
                unexpected.append((head[:20], status))

    items = corpus()
    threads = [threading.Thread(target=valid_traffic) for _ in range(3)]
    threads += [threading.Thread(target=malformed, args=(items[k::4],)) for k in range(4)]
    threads += [threading.Thread(target=slow_and_vanishing)]
    for t in threads:
        t.start()
    for t in threads[3:]:
        t.join()
    stop.set()
    for t in threads[:3]:
        t.join()

    assert served.proc.poll() is None, "the server died"
    assert unexpected == []
    assert len(refused) >= len(items) - 1
    assert valid_errors == [] and valid_done[0] >= 3
    assert http(served.base + "/health", key=None) == (200, {"status": "ok"})
    # Still exact after the storm.
    assert {tuple(p): greedy(served.base, p) for p in PROMPTS} == want
    # Errors are OpenAI-shaped.
    status, err = http(served.base + "/v1/completions", raw=b'{"model": "vd", "prompt": ', key=None)
    assert status == 400 and set(err["error"]) == {"message", "type", "param", "code"}
    status, err = http(served.base + "/v1/nothing", key=None)
    assert status == 404 and "error" in err
