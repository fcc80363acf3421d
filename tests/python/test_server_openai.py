"""`monet serve`'s OpenAI-compatible API, driven with the official `openai`
client: greedy ids equal the float64 reference, streaming equals
non-streaming, chat uses the template as `monet chat --render`, masks and
expert reports match the CLI, logprobs match the reference's log-softmax,
concurrent requests answer as single ones, and bad requests get OpenAI-shaped
errors."""
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import require
from monet_ref import chat_templates, reference
from monet_ref.make_checkpoint import make_checkpoint

API_KEY = "test-key"
PROMPT = [1, 284, 259, 272, 292, 100, 7]
EOS = 2


class ServerProcess:
    def __init__(self, monet_bin, model, *extra):
        self.proc = subprocess.Popen([monet_bin, "serve", "--model", model, "--port", "0", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert "monet viewer on http://" in line, line + self.proc.stderr.read()
        self.url = line.split("http://", 1)[1].split("/", 1)[0]
        self.base = f"http://{self.url}"
        deadline = time.time() + 60
        while True:
            status, _ = http(self.base + "/health")
            if status == 200:
                break
            assert status == 503 and time.time() < deadline, status
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def http(url, body=None, key=API_KEY, raw=None, method=None):
    """(status, parsed JSON or text) of a request; never raises for HTTP errors."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            payload = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        payload, status = e.read().decode(), e.code
    except (urllib.error.URLError, ConnectionError):
        return None, None
    try:
        return status, json.loads(payload)
    except json.JSONDecodeError:
        return status, payload


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("srv") / "vd")
    make_checkpoint(path, vocab=301, layers=3, groups=2, kv_heads=2, seed=11, tokenizer=True, max_pos=128,
                    chat_template=chat_templates.LLAMA2)
    return path


@pytest.fixture(scope="module")
def server(monet_bin, model):
    s = ServerProcess(monet_bin, model, "--parallel", "4", "--api-key", API_KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = require("openai", "the OpenAI API tests use the official client")
    return openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def reference_greedy(path, prompt, n, masks=None):
    model = reference.load(path)
    ids = list(prompt)
    for _ in range(n):
        logits, _ = reference.forward(model, ids, masks=masks)
        nxt = int(np.argmax(logits[-1]))
        if nxt == EOS:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def complete_ids(client, prompt, n=12, **extra):
    r = client.completions.create(model="vd", prompt=prompt, max_tokens=n, temperature=0,
                                  extra_body={"return_token_ids": True, **extra})
    return r.choices[0].model_extra["token_ids"], r


def test_health_models_and_tokenize(server, client, model):
    assert http(server.base + "/health", key=None) == (200, {"status": "ok"})
    models = client.models.list()
    assert [m.id for m in models.data] == ["vd"]
    status, tok = http(server.base + "/tokenize", {"content": "the cat"})
    want = subprocess.run([os.environ.get("MONET_BIN", os.path.join(os.path.dirname(__file__), "../../build/monet")),
                           "tokenize", "--model", model, "--text", "the cat"], capture_output=True, text=True).stdout
    assert status == 200 and tok["tokens"] == [int(x) for x in want.strip().split(",")]
    status, text = http(server.base + "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and text["content"] == "the cat"
    status, metrics = http(server.base + "/metrics")
    assert status == 200 and "monet_generated_tokens_total" in metrics and "monet_busy_slots" in metrics


def test_greedy_matches_reference(server, client, model):
    want = reference_greedy(model, PROMPT, 24)
    got, r = complete_ids(client, PROMPT, 24)
    assert got == want and len(got) >= 12
    assert r.usage.prompt_tokens == len(PROMPT) and r.usage.completion_tokens == len(got)
    assert r.choices[0].finish_reason == ("length" if len(got) == 24 else "stop")
    # The text is the tokens' text.
    status, text = http(server.base + "/detokenize", {"tokens": got})
    assert r.choices[0].text == text["content"]


def test_stream_equals_non_stream(client):
    for prompt in ("the cat sat", PROMPT):
        full = client.completions.create(model="vd", prompt=prompt, max_tokens=20, temperature=0)
        pieces, finish = [], None
        for chunk in client.completions.create(model="vd", prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                               stream_options={"include_usage": True}):
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            else:
                assert chunk.usage.completion_tokens == full.usage.completion_tokens
        assert "".join(pieces) == full.choices[0].text
        assert finish == full.choices[0].finish_reason
    msgs = [{"role": "user", "content": "hello there"}]
    full = client.chat.completions.create(model="vd", messages=msgs, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="vd", messages=msgs, max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content


def test_sampling_is_seeded(client):
    a = client.completions.create(model="vd", prompt="the", max_tokens=16, temperature=1.0, seed=7, n=2)
    b = client.completions.create(model="vd", prompt="the", max_tokens=16, temperature=1.0, seed=7, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len(a.choices) == 2 and a.choices[1].index == 1


def test_chat_uses_the_template(monet_bin, client, model, tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps(msgs))
    rendered = subprocess.run([monet_bin, "chat", "--model", model, "--render", str(conv), "--add-generation-prompt"],
                              capture_output=True, text=True, check=True).stdout
    ids = rendered.rsplit("\n", 2)[1]
    expected = subprocess.run([monet_bin, "generate", "--model", model, "--ids", ids, "-n", "12", "--temperature", "0"],
                              capture_output=True, check=True).stdout.decode().rstrip("\n")
    r = client.chat.completions.create(model="vd", messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids.split(","))


def test_expert_mask_as_cli(monet_bin, client, model, tmp_path):
    mask = {"components": [{"group": 0, "side": 1, "index": i} for i in range(0, 32, 2)],
            "experts": [{"group": 1, "expert": 5 * 32 + 9}]}
    (tmp_path / "mask.json").write_text(json.dumps(mask))
    ids = ",".join(map(str, PROMPT))
    cli = subprocess.run([monet_bin, "generate", "--model", model, "--ids", ids, "-n", "16", "--temperature", "0",
                          "--print-ids", "--mask", str(tmp_path / "mask.json")], capture_output=True, text=True,
                         check=True).stdout.strip()
    masked, _ = complete_ids(client, PROMPT, 16, expert_mask=mask)
    plain, _ = complete_ids(client, PROMPT, 16)
    assert masked == [int(x) for x in cli.split(",") if x]
    assert masked != plain


def test_return_experts_as_cli(monet_bin, client, model):
    got, r = complete_ids(client, PROMPT, 10, return_experts={"threshold": 0.01, "top": 0})
    experts = r.choices[0].model_extra["experts"]
    assert [e["token_id"] for e in experts] == got
    out = subprocess.run([monet_bin, "experts", "--model", model, "--ids", ",".join(map(str, PROMPT + got)),
                          "--threshold", "0.01", "--json"], capture_output=True, text=True, check=True).stdout
    cli = json.loads(out)["tokens"][len(PROMPT):]
    assert len(cli) == len(experts)
    for mine, theirs in zip(experts, cli):
        assert len(mine["groups"]) == len(theirs["groups"])
        for gm, gt in zip(mine["groups"], theirs["groups"]):
            assert gm["count"] == gt["count"]
            assert [e["id"] for e in gm["experts"]] == [e["id"] for e in gt["experts"]]
            np.testing.assert_allclose([e["p"] for e in gm["experts"]], [e["p"] for e in gt["experts"]], atol=1e-6)
    # Streamed: the same experts, one token per chunk.
    streamed = []
    for chunk in client.completions.create(model="vd", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                           extra_body={"return_experts": {"threshold": 0.01, "top": 0}}):
        streamed += (chunk.choices[0].model_extra or {}).get("experts") or []
    assert streamed == experts


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def test_logprobs_match_reference(monet_bin, client, model, tmp_path):
    ref = reference.load(model)
    r = client.completions.create(model="vd", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=5, echo=True,
                                  extra_body={"return_token_ids": True})
    got = r.choices[0].model_extra["token_ids"]
    seq = PROMPT + got
    logits, _ = reference.forward(ref, seq)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(seq) and lp.token_logprobs[0] is None
    for t in range(1, len(seq)):
        want = log_softmax(logits[t - 1])
        assert abs(lp.token_logprobs[t] - want[seq[t]]) < 1e-4
        # Keyed by token text (tokens of the same text share a key): each is one of the reference's top 5.
        best = np.sort(want)[::-1][:5]
        assert max(lp.top_logprobs[t].values()) == pytest.approx(best[0], abs=1e-4)
        assert all(np.abs(best - v).min() < 1e-4 for v in lp.top_logprobs[t].values())
    # Chat logprobs (a list per token): each generated token's logprob and its 3 most likely alternatives.
    msgs = [{"role": "user", "content": "hi"}]
    c = client.chat.completions.create(model="vd", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"return_token_ids": True})
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps(msgs))
    rendered = subprocess.run([monet_bin, "chat", "--model", model, "--render", str(conv), "--add-generation-prompt"],
                              capture_output=True, text=True, check=True).stdout
    prompt = [int(x) for x in rendered.rsplit("\n", 2)[1].split(",")]
    ids = c.choices[0].model_extra["token_ids"]
    content = c.choices[0].logprobs.content
    assert len(content) == len(ids) >= 1
    logits, _ = reference.forward(ref, prompt + ids)
    for k, item in enumerate(content):
        want = log_softmax(logits[len(prompt) + k - 1])
        assert item.logprob == pytest.approx(want[ids[k]], abs=1e-4)
        np.testing.assert_allclose([x.logprob for x in item.top_logprobs], np.sort(want)[::-1][:3], atol=1e-4)


def test_concurrent_equals_single(client):
    prompts = [PROMPT, [1, 10, 20, 30], [1, 250, 251], "the cat", "a dog ran", [1, 5] * 10, "hello", [1, 99, 98, 97]]
    single = [complete_ids(client, p, 16)[0] for p in prompts]
    results = [None] * (3 * len(prompts))

    def run(k):
        results[k] = complete_ids(client, prompts[k % len(prompts)], 16)[0]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == single * 3


def test_errors_are_openai_shaped(server, client):
    openai = require("openai", "the OpenAI API tests use the official client")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0).models.list()
    bad = [
        {"model": "vd", "prompt": "x", "max_tokens": -1},
        {"model": "vd", "prompt": "x", "max_tokens": 10 ** 30},
        {"model": "vd", "prompt": "x", "max_tokens": "5"},
        {"model": "vd", "prompt": "x", "temperature": -0.5},
        {"model": "vd", "prompt": "x", "top_p": 0},
        {"model": "vd", "prompt": "x", "n": 0},
        {"model": "vd", "prompt": "x", "stop": [""]},
        {"model": "vd", "prompt": [1, 99999]},
        {"model": "vd", "prompt": []},
        {"model": "vd", "prompt": "x", "logprobs": 99},
        {"model": "vd", "prompt": "x", "frobnicate": 1},
        {"model": "vd", "prompt": "x", "stream_options": {"include_usage": True}},
        {"model": "vd", "prompt": "x", "expert_mask": {"experts": [{"group": 9, "expert": 0}]}},
        {"model": "vd", "prompt": [1] * 200, "max_tokens": 1},
        {"model": "vd", "prompt": [1] * 100, "max_tokens": 100},
        {"prompt": "x"},
    ]
    for body in bad:
        status, err = http(server.base + "/v1/completions", body)
        assert status == 400, body
        assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"], err
    status, err = http(server.base + "/v1/chat/completions", {"model": "vd", "messages": [{"role": "robot", "content": "x"}]})
    assert status == 400 and err["error"]["param"] == "messages"
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]
    status, err = http(server.base + "/v1/chat/completions", {"model": "vd", "messages": [{"role": "user", "content": image}]})
    assert status == 400 and "vision tower" in err["error"]["message"]
    status, err = http(server.base + "/v1/completions", raw=b'{"model": "vd", "prompt": "x"')
    assert status == 400 and "JSON" in err["error"]["message"]
    status, err = http(server.base + "/v1/completions", raw=b'{"model": "vd", "prompt": "\xff\xfe"}')
    assert status == 400
    status, err = http(server.base + "/v1/completions", raw=b" " * (9 << 20))
    assert status in (413, None)  # refused (the server may close the connection while the body is sent)
    assert http(server.base + "/v1/models", key=None)[0] == 401
    # Still serving.
    assert complete_ids(client, PROMPT, 4)[0] == complete_ids(client, PROMPT, 4)[0]


def test_sigterm_finishes_requests_in_flight(monet_bin, model):
    openai = require("openai", "the OpenAI API tests use the official client")
    s = ServerProcess(monet_bin, model, "--parallel", "2")
    c = openai.OpenAI(base_url=s.base + "/v1", api_key="x", max_retries=0, timeout=60)
    stream = c.completions.create(model="vd", prompt=PROMPT, max_tokens=100, temperature=0, stream=True,
                                  extra_body={"return_token_ids": True})
    first = next(iter(stream))
    s.proc.send_signal(signal.SIGTERM)
    ids = list(first.choices[0].model_extra["token_ids"])
    finish = None
    for chunk in stream:
        ids += (chunk.choices[0].model_extra or {}).get("token_ids") or []
        finish = chunk.choices[0].finish_reason or finish
    assert finish in ("length", "stop")
    assert ids == reference_greedy(model, PROMPT, 100)[:len(ids)] and len(ids) > 1
    assert s.proc.wait(timeout=30) == 0


def test_image_url_data_urls(monet_bin, tmp_path):
    """VisionMonet: an image_url part (a data: URL) answers as `monet chat --image`; remote URLs are refused."""
    import base64
    from monet_ref import make_checkpoint as mc
    photo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "images",
                         "grace_hopper.jpg")
    ckpt = str(tmp_path / "llava")
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    mc.make_llava_checkpoint(ckpt, vocab=320, tokenizer=True, chat_template=template)
    chat = subprocess.run([monet_bin, "chat", "--model", ckpt, "--image", photo, "-n", "8", "--temperature", "0"],
                          input="what is this\n", capture_output=True, text=True, check=True).stdout
    s = ServerProcess(monet_bin, ckpt, "--parallel", "2")
    try:
        url = "data:image/jpeg;base64," + base64.b64encode(open(photo, "rb").read()).decode()
        body = {"model": os.path.basename(ckpt), "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "what is this"}]}]}
        status, r = http(s.base + "/v1/chat/completions", body)
        assert status == 200, r
        assert r["choices"][0]["message"]["content"] + "\n" == chat
        assert r["usage"]["prompt_tokens"] > 16  # the image's patches are positions of the prompt
        for bad_url in ("https://example.com/cat.png", "http://127.0.0.1/x.png", "file:///etc/passwd",
                        "data:image/png;base64,@@@@", "data:image/png;base64,aGVsbG8="):
            body["messages"][0]["content"][0]["image_url"]["url"] = bad_url
            status, err = http(s.base + "/v1/chat/completions", body)
            assert status == 400 and err["error"]["param"] == "messages", (bad_url, err)
        assert "not fetched" in http(s.base + "/v1/chat/completions", dict(body, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]))[1][
            "error"]["message"]
    finally:
        s.stop()


DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models",
                             "monet-vd-books")


def metrics(base):
    status, text = http(base + "/metrics")
    assert status == 200, text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def test_non_streaming_client_gone_frees_its_slot(monet_bin):
    """A non-streamed request still generating after a moment is answered
    through a chunked body (the same JSON), so that the server watches the
    connection: a client that closes it has its choices cancelled, and the
    only slot (--parallel 1) serves the next request instead of finishing
    sixteen long choices nobody reads."""
    from http.client import HTTPConnection
    import socket
    openai = require("openai", "the OpenAI API tests use the official client")
    s = ServerProcess(monet_bin, DEFAULT_MODEL, "--parallel", "1")
    try:
        host, port = s.url.rsplit(":", 1)
        # A slow answer (chunked) is the same JSON response.
        body = {"model": "monet-vd-books", "prompt": "The whale", "max_tokens": 40, "n": 8, "temperature": 1.0,
                "seed": 3}
        conn = HTTPConnection(host, int(port), timeout=600)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        conn.close()
        assert r.status == 200 and r.getheader("Transfer-Encoding") == "chunked", (r.status, r.getheaders())
        assert len(json.loads(raw)["choices"]) == 8
        c = openai.OpenAI(base_url=s.base + "/v1", api_key="x", max_retries=0, timeout=600)
        got = c.completions.create(model="monet-vd-books", prompt="The whale", max_tokens=40, n=8, temperature=1.0,
                                   seed=3)
        assert [ch.text for ch in got.choices] == [ch["text"] for ch in json.loads(raw)["choices"]]

        before = metrics(s.base)
        long = dict(body, max_tokens=400, n=16)
        sock = socket.create_connection((host, int(port)))
        payload = json.dumps(long).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        head = b""
        while b"\r\n\r\n" not in head:  # the 200 of the chunked answer: the request is generating
            data = sock.recv(4096)
            assert data, head
            head += data
        assert head.startswith(b"HTTP/1.1 200"), head
        sock.close()
        deadline = time.time() + 120
        while True:
            m = metrics(s.base)
            if m["monet_requests_cancelled_total"] > before["monet_requests_cancelled_total"] and \
                    m["monet_busy_slots"] == 0 and m["monet_queue_length"] == 0:
                break
            assert time.time() < deadline, m
            time.sleep(0.05)
        # Far fewer tokens than the 16 x 400 asked for were generated: the choices were cancelled, not finished.
        generated = m["monet_generated_tokens_total"] - before["monet_generated_tokens_total"]
        assert generated < 16 * 400 / 2, generated
        status, r = http(s.base + "/v1/completions", {"model": "monet-vd-books", "prompt": "A", "max_tokens": 2})
        assert status == 200 and r["choices"][0]["finish_reason"] in ("length", "stop"), r
    finally:
        s.stop()
