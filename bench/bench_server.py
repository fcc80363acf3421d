"""Load test of `monet serve` (loopback only, bounded in time).

64 clients send 1,000 mixed requests (completions and chat, streaming and
not, some with an expert mask, some cancelled midway) to a server started with
--parallel 8. Every greedy answer must equal its single-request answer
(computed first, one request at a time), every response must be well formed
and none lost; a cancelled stream must be a prefix of its answer. Prints
requests/s, generated tokens/s, p50/p99 latency and time to first token.

  python bench/bench_server.py [--model models/monet-vd-books] [--parallel 8]
         [--clients 64] [--requests 1000] [--time-limit 600] [--compare-parallel 1]

Exit status 1 when a response was lost, mixed up or malformed.
"""
import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(monet, model, parallel, threads, compute=None):
    args = [monet, "serve", "--model", model, "--port", "0", "--parallel", str(parallel)]
    if threads:
        args += ["--threads", str(threads)]
    if compute:
        args += ["--compute", compute]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        raise SystemExit(f"server did not start: {line!r}")
    host, port = line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, host, int(port)
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("server did not become healthy")


def server_metrics(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {l.split()[0]: float(l.split()[1]) for l in text.splitlines() if l and not l.startswith("#")}


def make_workload(n, seed, n_experts):
    """Request specs: (kind, prompt, max_tokens, masked, stream, cancel_after)."""
    rng = random.Random(seed)
    words = "the cat sat on a mat while the dog ran to the old house near river and tree".split()
    # 16 prompts, each with its own length limit: 64 distinct (kind, prompt, mask) answers to check against.
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 24))) for _ in range(16)]
    limits = [rng.choice([4, 8, 16, 24]) for _ in prompts]
    mask = {"components": [{"group": 0, "side": 1, "index": i} for i in range(0, n_experts, 3)]}
    specs = []
    for k in range(n):
        kind = "chat" if rng.random() < 0.3 else "completion"
        which = rng.randrange(len(prompts))
        prompt, max_tokens = prompts[which], limits[which]
        masked = rng.random() < 0.2
        stream = rng.random() < 0.5
        cancel_after = rng.randint(1, 4) if stream and rng.random() < 0.15 else None
        specs.append(dict(kind=kind, prompt=prompt, max_tokens=max_tokens, masked=masked, stream=stream,
                          cancel_after=cancel_after))
    return specs, mask


def body_of(spec, mask):
    b = {"model": "m", "max_tokens": spec["max_tokens"], "temperature": 0, "return_token_ids": True}
    if spec["kind"] == "chat":
        b["messages"] = [{"role": "user", "content": spec["prompt"]}]
    else:
        b["prompt"] = spec["prompt"]
    if spec["masked"]:
        b["expert_mask"] = mask
    if spec["stream"]:
        b["stream"] = True
    return b


class ResetBeforeAnswer(Exception):
    """The connection closed before any byte of the answer arrived."""


def send(conn, spec, mask, model_name):
    """One request; returns dict(ok, ids, text, finish, latency, ttft, error, cancelled)."""
    body = body_of(spec, mask)
    body["model"] = model_name
    path = "/v1/chat/completions" if spec["kind"] == "chat" else "/v1/completions"
    t0 = time.perf_counter()
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
    except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as e:
        raise ResetBeforeAnswer(type(e).__name__) from e
    out = dict(ok=False, ids=[], text="", finish=None, latency=None, ttft=None, error=None, cancelled=False)
    if r.status != 200:
        out["error"] = f"status {r.status}: {r.read()[:200]!r}"
        return out
    if not spec["stream"]:
        j = json.loads(r.read())
        ch = j["choices"][0]
        out.update(ok=True, ids=ch["token_ids"], finish=ch["finish_reason"],
                   text=ch["message"]["content"] if spec["kind"] == "chat" else ch["text"],
                   latency=time.perf_counter() - t0)
        if j["usage"]["completion_tokens"] != len(ch["token_ids"]):
            out.update(ok=False, error="usage does not count the tokens")
        return out
    chunks, done = 0, False
    buf = b""
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line or line.startswith(b":"):  # blank lines end events; ':' lines are SSE comments
            continue
        if not line.startswith(b"data: "):
            out["error"] = f"not an SSE data line: {line[:100]!r}"
            return out
        data = line[6:]
        if data == b"[DONE]":
            done = True
            if r.read().strip():  # the end of the chunked body; nothing may follow [DONE]
                out["error"] = "data after [DONE]"
                return out
            break
        j = json.loads(data)
        if "error" in j:
            out["error"] = f"error event: {j}"
            return out
        ch = j["choices"][0]
        if ch.get("token_ids"):
            if out["ttft"] is None:
                out["ttft"] = time.perf_counter() - t0
            out["ids"] += ch["token_ids"]
        piece = ch["delta"].get("content") if spec["kind"] == "chat" else ch.get("text")
        out["text"] += piece or ""
        if ch.get("finish_reason"):
            out["finish"] = ch["finish_reason"]
        chunks += 1
        if spec["cancel_after"] is not None and len(out["ids"]) >= spec["cancel_after"]:
            out.update(ok=True, cancelled=True, latency=time.perf_counter() - t0)
            conn.close()  # the client goes away midway
            return out
    out.update(ok=done and out["finish"] is not None, latency=time.perf_counter() - t0)
    if not done:
        out["error"] = "stream ended without [DONE]"
    return out


def key_of(spec):
    return (spec["kind"], spec["prompt"], spec["max_tokens"], spec["masked"])


def percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def run_load(host, port, specs, mask, answers, clients, time_limit, model_name):
    results = [None] * len(specs)
    retried = []
    next_k = [0]
    lock = threading.Lock()
    deadline = time.time() + time_limit

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=120)
        while time.time() < deadline:
            with lock:
                k = next_k[0]
                next_k[0] += 1
            if k >= len(specs):
                break
            try:
                try:
                    results[k] = send(conn, specs[k], mask, model_name)
                except ResetBeforeAnswer as e:
                    # A kept-alive connection the server closed as the request went out (the usual
                    # keep-alive race; nothing was answered): once more on a fresh connection, counted.
                    with lock:
                        retried.append(str(e))
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=120)
                    results[k] = send(conn, specs[k], mask, model_name)
            except (OSError, http.client.HTTPException, ValueError, KeyError, ResetBeforeAnswer) as e:
                results[k] = dict(ok=False, error=f"{type(e).__name__}: {e}", ids=[], cancelled=False)
            if results[k].get("cancelled") or not results[k]["ok"]:
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=120)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lost = sum(1 for r in results if r is None)
    malformed = [r["error"] for r in results if r is not None and not r["ok"]]
    mixed = 0
    for spec, r in zip(specs, results):
        if r is None or not r["ok"]:
            continue
        want = answers[key_of(spec)]
        if r["cancelled"]:
            mixed += r["ids"] != want["ids"][:len(r["ids"])]
        else:
            mixed += r["ids"] != want["ids"] or r["text"] != want["text"] or r["finish"] != want["finish"]
    done = [r for r in results if r is not None and r["ok"]]
    full = [r for r in done if not r["cancelled"]]
    gen_tokens = sum(len(r["ids"]) for r in done)
    ttfts = [r["ttft"] for r in done if r.get("ttft") is not None]
    return dict(wall=wall, retried=len(retried), lost=lost, malformed=malformed, mixed=mixed, requests=len(done),
                cancelled=sum(r["cancelled"] for r in done), rps=len(done) / wall, tps=gen_tokens / wall,
                p50=percentile([r["latency"] for r in full], 0.5), p99=percentile([r["latency"] for r in full], 0.99),
                ttft50=percentile(ttfts, 0.5), ttft99=percentile(ttfts, 0.99))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--monet", default=os.path.join(REPO, "build", "monet"))
    ap.add_argument("--model", default=os.path.join(REPO, "models", "monet-vd-books"))
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--compare-parallel", type=int, default=0, help="also run the load at this --parallel (e.g. 1)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=0, help="the server's --threads (0: all cores)")
    ap.add_argument("--time-limit", type=float, default=600, help="seconds for the load phase; unfinished = lost")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compute", help="the server's --compute (auto, f32, bf16; default: the server's)")
    a = ap.parse_args()
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    specs, mask = make_workload(a.requests, a.seed, cfg["moe_experts"])
    model_name = os.path.basename(os.path.normpath(a.model))
    failed = False
    rows = []
    for parallel in [a.parallel] + ([a.compare_parallel] if a.compare_parallel else []):
        proc, host, port = start_server(a.monet, a.model, parallel, a.threads, a.compute)
        try:
            # Single-request answers, one at a time (the greedy answers every loaded response must equal).
            answers = {}
            conn = http.client.HTTPConnection(host, port, timeout=120)
            for spec in specs:
                k = key_of(spec)
                if k not in answers:
                    single = dict(spec, stream=False, cancel_after=None)
                    answers[k] = send(conn, single, mask, model_name)
                    if not answers[k]["ok"]:
                        raise SystemExit(f"single request failed: {answers[k]['error']}")
            conn.close()
            before = server_metrics(host, port)
            r = run_load(host, port, specs, mask, answers, a.clients, a.time_limit, model_name)
            after = server_metrics(host, port)
            delta = {k: after[k] - before.get(k, 0.0) for k in after}
            r["server_cancelled"] = int(delta["monet_requests_cancelled_total"])
            # The engine's share of the load's wall time: low means the clients (or other processes) were the limit.
            r["engine_busy"] = delta["monet_engine_busy_seconds_total"]
            r["engine_tps"] = delta["monet_generated_tokens_total"] / max(delta["monet_engine_busy_seconds_total"], 1e-9)
        finally:
            t_stop = time.perf_counter()
            proc.terminate()
            try:
                proc.wait(timeout=120)
                print(f"server stopped {time.perf_counter() - t_stop:.1f} s after SIGTERM", flush=True)
            except subprocess.TimeoutExpired:
                print("server still running 120 s after SIGTERM: killed", flush=True)
                failed = True
                proc.kill()
                proc.wait()
        bad = r["lost"] or r["malformed"] or r["mixed"]
        failed |= bool(bad)
        print(f"--parallel {parallel}: {r['requests']} requests ({r['cancelled']} cancelled midway) in "
              f"{r['wall']:.1f} s; lost {r['lost']}, malformed {len(r['malformed'])}, mixed {r['mixed']}; "
              f"slots freed by the server on disconnect: {r['server_cancelled']}; retried after a connection reset "
              f"before any answer: {r['retried']}")
        for e in r["malformed"][:5]:
            print("  malformed:", e)
        rows.append((parallel, r))
    print()
    print(f"{'--parallel':>10} {'req/s':>8} {'gen tok/s':>10} {'p50 lat s':>10} {'p99 lat s':>10} "
          f"{'TTFT p50 s':>11} {'TTFT p99 s':>11} {'engine busy':>12} {'engine tok/s':>13}   (peer server: none here)")
    for parallel, r in rows:
        print(f"{parallel:>10} {r['rps']:>8.2f} {r['tps']:>10.1f} {r['p50']:>10.3f} {r['p99']:>10.3f} "
              f"{r['ttft50']:>11.3f} {r['ttft99']:>11.3f} {r['engine_busy'] / r['wall']:>11.0%} {r['engine_tps']:>13.1f}")
    print("engine busy: the server's time in batched steps over the load's wall time; engine tok/s: the load's "
          "generated tokens per second of engine time")
    if len(rows) == 2:
        print(f"batching gain (gen tok/s, --parallel {rows[0][0]} / {rows[1][0]}): {rows[0][1]['tps'] / rows[1][1]['tps']:.2f}x")
    print(f"{a.clients} clients, {a.requests} requests, model {a.model}; timings are noisy on a shared machine")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
