"""7. Online serving: an open-loop load generator against `python -m runtime serve`, as vLLM's and
SGLang's serving benchmarks drive a server.

server   `python -m runtime serve` in a subprocess on a free port; N token-id prompts with long-tailed
         (log-normal) prompt and output lengths sent to /v1/completions (temperature 0,
         max_tokens = the output length, streamed) with Poisson arrivals at each rate (inf: all at
         once, saturation), from a fully asynchronous client (httpx.AsyncClient, SSE)
offline  the same requests through `engine.generate` in this process (what `runtime generate` does)
Per rate: request and output-token throughput, time to first token and inter-token latency
(p50/p99), end-to-end latency p50, every request accounted for (finish_reason "length" with all its
tokens, or "stop" on an EOS id), the tokens against the offline run's. Goals: server tok/s at
saturation >= 90% of offline tok/s, and no compile after load in the server across the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import ARTIFACT, RESULTS, ROOT, ensure_artifact, make_trace, write_result
from runtime.format import read_manifest

GOAL_RATIO = 0.90
METRIC = re.compile(r"^(qwen3_moe_\w+(?:\{[^}]*\})?) (\S+)$", re.M)


# ------------------------------------------------------------------------------------ the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), for where the cores went."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


class Server:
    def __init__(self, artifact, max_queue: int = 256, launcher=("-m", "runtime")):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-serve-", suffix=".log", delete=False)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, *launcher, "serve", str(artifact), "--port", str(self.port),
                                      "--max-queue", str(max_queue)],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            self.proc.kill()
            raise TimeoutError(f"the server was not ready within 300 s:\n{self.log_tail()}")
        self.ready_s = time.perf_counter() - t0
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-n:]

    def metrics(self) -> dict[str, float]:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=30).text
        return {m.group(1): float(m.group(2)) for m in METRIC.finditer(text)}

    def children(self) -> list[int]:
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def cpu_seconds(self) -> float:
        """The server's CPU time, its engine process's included."""
        return cpu_seconds(self.proc.pid) + sum(cpu_seconds(p) for p in self.children())

    def http_cpu_seconds(self) -> float | None:
        """The HTTP process's own CPU time: the API side, when the engine runs in a child (None
        when it does not, and the API side is only what the server costs beyond the engine)."""
        return cpu_seconds(self.proc.pid) if self.children() else None

    def stop(self) -> int:
        """SIGTERM: the server drains and should exit 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                print("the server did not exit within 60 s of SIGTERM; killed")
        if self.proc.returncode != 0:
            print(f"server log (exit code {self.proc.returncode}):\n{self.log_tail()}")
        os.unlink(self.log.name)
        return self.proc.returncode


# ------------------------------------------------------------------------------------ the client

async def one_request(client, url: str, model: str, prompt: list[int], max_tokens: int, start_at: float) -> dict:
    """Send at `start_at` (perf_counter), stream, and time every token event."""
    delay = start_at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    rec = {"sent": time.perf_counter(), "times": [], "tokens": [], "finish_reason": None, "error": None,
           "done": False}
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    rec["done"] = True
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    rec["error"] = event["error"].get("message", str(event["error"]))
                    continue
                choice = event["choices"][0]
                if choice.get("token_ids"):
                    rec["tokens"].extend(choice["token_ids"])
                    rec["times"].append(now)
                if choice.get("finish_reason") is not None:
                    rec["finish_reason"] = choice["finish_reason"]
    except Exception as e:  # noqa: BLE001 - a lost request is a result, not a crash of the benchmark
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        rec["end"] = time.perf_counter()
    return rec


async def run_load(url: str, model: str, prompts, max_tokens, arrivals) -> tuple[list[dict], float, float]:
    """All requests, open loop: each is sent at its arrival time whatever the others are doing."""
    import httpx

    n = len(prompts)
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter() + 0.05  # a moment to create the tasks
        recs = await asyncio.gather(*(one_request(client, url, model, p, m, t0 + a)
                                      for p, m, a in zip(prompts, max_tokens, arrivals)))
        return recs, t0, time.perf_counter()


def check(rec: dict, max_tokens: int, eos: set[int]) -> str | None:
    """Why a request does not count as complete (None when it does)."""
    if rec["error"]:
        return rec["error"]
    if not rec["done"]:
        return "stream ended without [DONE]"
    n, reason = len(rec["tokens"]), rec["finish_reason"]
    if reason == "length":
        return None if n == max_tokens else f"finish_reason length after {n} of {max_tokens} tokens"
    if reason == "stop":
        return None if 0 < n <= max_tokens and rec["tokens"][-1] in eos else \
            f"finish_reason stop after {n} tokens, last {rec['tokens'][-1:]} not an EOS id"
    return f"finish_reason {reason!r}"


def pct(values, q) -> float:
    return float(np.percentile(values, q) * 1e3) if len(values) else float("nan")


def summarize(rate: float, recs: list[dict], t0: float, max_tokens, eos) -> dict:
    problems = [check(r, m, eos) for r, m in zip(recs, max_tokens)]
    ok = [r for r, p in zip(recs, problems) if p is None]
    duration = max(r["end"] for r in recs) - t0
    tokens = sum(len(r["tokens"]) for r in recs)
    ttft = [r["times"][0] - r["sent"] for r in ok if r["times"]]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    e2e = [r["end"] - r["sent"] for r in ok]
    reasons: dict[str, int] = {}
    for r in recs:
        reasons[str(r["finish_reason"])] = reasons.get(str(r["finish_reason"]), 0) + 1
    return {"rate": "inf" if math.isinf(rate) else rate, "requests": len(recs), "completed": len(ok),
            "problems": [p for p in problems if p is not None][:5], "finish_reasons": reasons,
            "duration_s": duration, "output_tokens": tokens,
            "request_throughput": len(ok) / duration, "output_tok_s": tokens / duration,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99), "e2e_ms_p50": pct(e2e, 50)}


def measure(server, rate, prompts, max_tokens, arrivals, eos) -> dict:
    """One open-loop run at `rate`, with the server's own counters over it."""
    before, cpu_before, client_before = server.metrics(), server.cpu_seconds(), time.process_time()
    recs, t0, _ = asyncio.run(run_load(server.url, server.model, prompts, max_tokens, arrivals))
    after, cpu_after, client_after = server.metrics(), server.cpu_seconds(), time.process_time()
    row = summarize(rate, recs, t0, max_tokens, eos)
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    row["engine_steps"] = int(d.get("qwen3_moe_steps_total", 0))
    # the share of the wall time the engine loop spent inside scheduler.step() (the rest: waiting)
    row["engine_busy_frac"] = d.get("qwen3_moe_step_seconds_sum", 0.0) / row["duration_s"]
    row["step_ms_mean"] = 1e3 * d.get("qwen3_moe_step_seconds_sum", 0.0) / max(row["engine_steps"], 1)
    row["server_cpu_s"] = cpu_after - cpu_before
    row["client_cpu_s"] = client_after - client_before
    row["compiles_after_load"] = int(after.get("qwen3_moe_compiles_after_load", -1))
    row["_outputs"] = [r["tokens"] for r in recs]
    return row


def serve_all(args, trace, eos) -> tuple[dict, list[dict]]:
    prompts, max_tokens = trace["prompts"], trace["max_new_tokens"]
    n = len(prompts)
    unit = np.random.default_rng(args.seed + 1).exponential(1.0, n)  # the same draws, scaled per rate
    unit = np.cumsum(unit) - unit[0]
    server = Server(ARTIFACT, max_queue=max(256, n))  # "all at once" queues every request
    print(f"server ready in {server.ready_s:.1f} s on port {server.port} (model {server.model})")
    runs = []
    try:
        # Warm-up (untimed): a few requests, so first-call costs in the server are not in the first rate.
        warm = min(8, n)
        asyncio.run(run_load(server.url, server.model, prompts[:warm], max_tokens[:warm], [0.0] * warm))
        for rate in args.rates:
            arrivals = (np.zeros(n) if math.isinf(rate) else unit / rate).tolist()
            # saturation is a short run: repeat it and keep the median repetition
            reps = sorted((measure(server, rate, prompts, max_tokens, arrivals, eos)
                           for _ in range(args.repeats if math.isinf(rate) else 1)), key=lambda r: r["output_tok_s"])
            row = reps[len(reps) // 2]
            row["_outputs"] = [r.pop("_outputs") for r in reps]
            if len(reps) > 1:
                row["repeats"] = [{k: r[k] for k in ("output_tok_s", "completed", "duration_s")} for r in reps]
                row["completed"] = min(r["completed"] for r in reps)
                row["problems"] = [p for r in reps for p in r["problems"]][:5]
            runs.append(row)
            print(f"rate {row['rate']!s:>4} req/s: {row['completed']}/{row['requests']} completed in "
                  f"{row['duration_s']:5.1f} s  {row['request_throughput']:5.2f} req/s  "
                  f"{row['output_tok_s']:6.1f} tok/s  TTFT p50/p99 {row['ttft_ms_p50']:6.1f}/{row['ttft_ms_p99']:6.1f} ms  "
                  f"ITL p50/p99 {row['itl_ms_p50']:5.1f}/{row['itl_ms_p99']:6.1f} ms  E2E p50 {row['e2e_ms_p50']:6.1f} ms  "
                  f"steps {row['engine_steps']} ({row['step_ms_mean']:.1f} ms, busy {row['engine_busy_frac']:.0%})  "
                  f"cpu server {row['server_cpu_s']:.1f} s client {row['client_cpu_s']:.1f} s")
            if len(reps) > 1:
                print(f"  median of {len(reps)} runs: " + ", ".join(f"{r['output_tok_s']:.1f}" for r in row["repeats"])
                      + " tok/s")
            for p in row["problems"]:
                print(f"  problem: {p}")
        final = server.metrics()
    finally:
        exit_code = server.stop()
    info = {"ready_s": server.ready_s, "exit_code": exit_code,
            "compiles_after_load": int(final.get("qwen3_moe_compiles_after_load", -1)),
            "steps": int(final.get("qwen3_moe_steps_total", 0)),
            "finished": {k.split('"')[1]: int(v) for k, v in final.items() if k.startswith("qwen3_moe_requests_finished_total{")}}
    print(f"server stopped with SIGTERM: exit code {exit_code}; compiles after load {info['compiles_after_load']}")
    return info, runs


# ------------------------------------------------------------------------------------ offline baseline

def offline(trace, eos, repeats: int = 5) -> dict:
    """`runtime generate` on the same requests in this process: all at once, the median of
    `repeats` timed runs after one untimed warm-up (the same statistic as the server's saturation)."""
    from runtime.engine import load

    t0 = time.perf_counter()
    engine = load(ARTIFACT)
    load_s = time.perf_counter() - t0
    kw = {"eos_token_id": sorted(eos)} if eos else {}
    engine.generate(trace["prompts"][:8], trace["max_new_tokens"][:8], **kw)  # warm-up
    timed = []
    for _ in range(repeats):
        engine.reset_cache()
        t0, cpu0 = time.perf_counter(), time.process_time()
        outputs, stats = engine.generate(trace["prompts"], trace["max_new_tokens"], **kw)
        timed.append((time.perf_counter() - t0, outputs, stats, time.process_time() - cpu0))
    timed.sort(key=lambda t: t[0])
    dt, outputs, stats, cpu = timed[len(timed) // 2]
    tokens = sum(map(len, outputs))
    res = {"load_s": load_s, "serve_s": dt, "output_tokens": tokens, "output_tok_s": tokens / dt,
           "request_throughput": len(outputs) / dt, "steps": stats["steps"], "step_ms_mean": 1e3 * dt / stats["steps"],
           "padding_efficiency": stats["padding_efficiency"], "compiles_after_load": stats["compiles_after_load"],
           "repeats_s": [t[0] for t in timed], "cpu_s": cpu,
           "_outputs": outputs}
    print(f"offline (engine.generate, all at once): {tokens} tokens in {dt:.2f} s = {res['output_tok_s']:.1f} tok/s, "
          f"{res['request_throughput']:.2f} req/s, {stats['steps']} steps ({res['step_ms_mean']:.1f} ms), "
          f"compiles {stats['compiles_after_load']}, cpu {cpu:.1f} s")
    del engine
    return res


# ------------------------------------------------------------------------------------ a sleeping device

def raw_stream(port: int, body: bytes):
    """One streamed request over a bare socket: the client costs next to nothing per token.
    Returns (token events, end time)."""
    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        events, tail = 0, b""
        while chunk := await reader.read(65536):
            data = tail + chunk
            events += data.count(b"data: {")
            tail = data[-8:]
        writer.close()
        return events, time.perf_counter()
    return go()


def serve_fake(port: int, model: str, prompts, tokens: int) -> tuple[float, int, float]:
    """All streams at once; (seconds from the first send to the last stream's end, token events,
    client CPU seconds)."""
    bodies = [json.dumps({"model": model, "prompt": p, "max_tokens": tokens, "temperature": 0, "stream": True,
                          "ignore_eos": True}).encode() for p in prompts]

    async def all_of_them():
        return await asyncio.gather(*(raw_stream(port, b) for b in bodies))

    cpu0, t0 = time.process_time(), time.perf_counter()
    results = asyncio.run(all_of_them())
    return max(end for _, end in results) - t0, sum(n for n, _ in results), time.process_time() - cpu0


_READER = """import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
while s.recv(1 << 20):
    pass
"""


def send_cost_us(n: int = 4000, size: int = 160) -> dict:
    """This machine's CPU cost of one small `socket.send` on a loopback TCP connection whose reader
    (another process) drains it: what one streamed token's write costs the server before any of
    its own work. Two cases bound the server's: sends back to back (the reader is awake and
    draining), and sends 200 us apart (the reader sleeps, and each send wakes it). CPU time of the
    sending thread, system time included; microseconds per send."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        reader = subprocess.Popen([sys.executable, "-c", _READER, str(listener.getsockname()[1])])
        conn, _ = listener.accept()
    out = {}
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = b"x" * size
        for _ in range(200):
            conn.send(msg)
        for name, gap in (("back_to_back", 0.0), ("waking_reader", 200e-6)):
            cpu = 0.0
            for _ in range(n if not gap else n // 4):
                if gap:
                    time.sleep(gap)
                c0 = time.thread_time()
                conn.send(msg)
                cpu += time.thread_time() - c0
            out[name] = cpu / (n if not gap else n // 4) * 1e6
    reader.wait(10)
    return out


def loop_alone(artifact, step_ms: float, prompts, tokens: int, pages: int = 0, arrivals=None) -> dict:
    """The engine loop over the same sleeping device in this process, every request at once,
    nothing but a counter per token: what the server is measured against. `arrivals` (seconds
    from the start, one per prompt) submits each request at its time instead."""
    import threading

    from bench.fake_device import sleeping_device
    from runtime.engine_loop import EngineLoop
    from runtime.sampling import SamplingParams

    device = sleeping_device(artifact, step_ms, pages)
    loop = EngineLoop(device, max_queue=len(prompts) + 1)
    left, done, counted = [len(prompts)], threading.Event(), [0]

    def on_event(ev):
        counted[0] += 1
        if getattr(ev, "finish_reason", None) is not None or isinstance(ev, Exception):
            left[0] -= 1
            if not left[0]:
                done.set()

    loop.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i, p in enumerate(prompts):
        wait = t0 + arrivals[i] - time.perf_counter() if arrivals else 0
        if wait > 0:
            time.sleep(wait)
        loop.submit(p, tokens, SamplingParams(), on_event)
    done.wait()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    loop.stop(timeout=10)
    gaps = [gap for _, gap in device.idle[1:]]
    return {"seconds": seconds, "tokens": counted[0], "tok_s": counted[0] / seconds, "cpu_s": cpu,
            "steps": device.steps, "gap_ms_p50": pct(gaps, 50), "gap_ms_p99": pct(gaps, 99)}


def fake_step(args) -> None:
    """`--fake-step-ms MS`: the server's host side against the engine loop's alone."""
    artifact = ensure_artifact()
    manifest = read_manifest(artifact)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(1, manifest.model.vocab_size, 8).tolist() for _ in range(args.streams)]
    lengths = sorted({max(1, args.tokens // 4), args.tokens})
    load_avg = os.getloadavg()[0]
    print(f"sleeping device, {args.fake_step_ms} ms a step, {args.fake_pages or manifest.cache.num_pages} KV pages per "
          f"group; {args.streams} streams x {lengths} tokens; load average {load_avg:.1f} on {os.cpu_count()} cores")
    alone = {n: loop_alone(artifact, args.fake_step_ms, prompts, n, args.fake_pages) for n in lengths}
    stats_file = tempfile.NamedTemporaryFile(prefix="bench-fake-device-", suffix=".json", delete=False).name
    server = Server(artifact, max_queue=4 * args.streams,
                    launcher=("-m", "bench.fake_device", str(args.fake_step_ms), stats_file, str(args.fake_pages)))
    served, windows = {}, {}
    try:
        serve_fake(server.port, server.model, prompts[:16], 4)  # warm-up, untimed
        for n in lengths:
            cpu0, http0, t0 = server.cpu_seconds(), server.http_cpu_seconds(), time.perf_counter()
            seconds, events, client_cpu = serve_fake(server.port, server.model, prompts, n)
            served[n] = {"seconds": seconds, "tokens": events, "tok_s": events / seconds,
                         "server_cpu_s": server.cpu_seconds() - cpu0, "client_cpu_s": client_cpu}
            # API side: the HTTP process itself when the engine has its own, else the server beyond the loop's
            served[n]["api_cpu_s"] = served[n]["server_cpu_s"] - alone[n]["cpu_s"] if http0 is None \
                else server.http_cpu_seconds() - http0
            windows[n] = (t0, t0 + seconds)
    finally:
        exit_code = server.stop()
    with open(stats_file) as f:
        device = json.load(f)
    os.unlink(stats_file)
    replayed = {}
    for n, (a, b) in windows.items():
        gaps = [gap for when, gap in device["idle"] if a < when <= b][1:]  # the first waited for the requests
        served[n] |= {"gap_ms_p50": pct(gaps, 50), "gap_ms_p99": pct(gaps, 99), "steps": len(gaps) + 1}
        # The loop alone again, each request submitted when it reached the server's engine: the
        # server's shortfall that its HTTP side causes, apart from what the arrival times do to
        # the scheduler (under page pressure, the order of admissions changes the steps it takes)
        offsets = sorted(t - a for t in device["arrivals"] if a < t <= b)
        if len(offsets) == args.streams:
            replayed[n] = loop_alone(artifact, args.fake_step_ms, prompts, n, args.fake_pages, offsets)
            replayed[n]["arrival_spread_ms"] = 1e3 * (offsets[-1] - offsets[0])
    # API-side CPU per request and per token, from the two output lengths (a line through both)
    extra = {n: served[n]["api_cpu_s"] for n in lengths}
    lo, hi = lengths[0], lengths[-1]
    per_token = (extra[hi] - extra[lo]) / (args.streams * (hi - lo)) if hi > lo else float("nan")
    per_request = (extra[lo] - per_token * args.streams * lo) / args.streams if hi > lo else extra[hi] / args.streams
    for n in lengths:
        a, s = alone[n], served[n]
        print(f"{n:3d} tokens: loop alone {a['tok_s']:7.0f} tok/s ({a['steps']} steps, gap p50/p99 {a['gap_ms_p50']:.2f}/"
              f"{a['gap_ms_p99']:.2f} ms, cpu {a['cpu_s']:.2f} s); server {s['tok_s']:7.0f} tok/s ({s['steps']} steps, gap p50/p99 "
              f"{s['gap_ms_p50']:.2f}/{s['gap_ms_p99']:.2f} ms, cpu {s['server_cpu_s']:.2f} s of which API "
              f"{s['api_cpu_s']:.2f} s, "
              f"client "
              f"{s['client_cpu_s']:.2f} s); ratio {s['tok_s'] / a['tok_s']:.3f}")
        if n in replayed:
            r = replayed[n]
            print(f"     loop alone, requests arriving as they reached the server's engine (over "
                  f"{r['arrival_spread_ms']:.0f} ms): {r['tok_s']:7.0f} tok/s ({r['steps']} steps); server / this: "
                  f"{s['tok_s'] / r['tok_s']:.3f}")
    ratio = served[hi]["tok_s"] / alone[hi]["tok_s"]
    print(f"server / loop alone at {hi} tokens: {ratio:.3f} (goal >= 0.95); engine step gap p99 "
          f"{served[hi]['gap_ms_p99']:.2f} ms (goal <= 1); API-side CPU {per_request * 1e3:.2f} ms per request "
          f"(goal <= 0.5), {per_token * 1e6:.0f} us per token (goal <= 25); server exit {exit_code}")
    # One write per token per stream is what streaming is (each token flushed as it comes): what a
    # write costs this machine, measured apart, and the per-token figure without it
    send = send_cost_us()
    net = {k: per_token * 1e6 - v for k, v in send.items()}
    print(f"this machine's small loopback socket.send: {send['back_to_back']:.1f} us CPU back to back, "
          f"{send['waking_reader']:.1f} us waking its reader; API-side CPU per token less one send: "
          f"{net['waking_reader']:.0f}-{net['back_to_back']:.0f} us (goal <= 25)")
    write_result(args.result if args.result != "serve" else "serve_fake_step", {
        "workload": {"step_ms": args.fake_step_ms, "streams": args.streams, "tokens": lengths,
                     "pages_per_group": args.fake_pages or manifest.cache.num_pages,
                     "load_average_before": load_avg, "load_average_after": os.getloadavg()[0]},
        "loop_alone": {str(n): v for n, v in alone.items()}, "server": {str(n): v for n, v in served.items()},
        "loop_alone_server_arrivals": {str(n): v for n, v in replayed.items()},
        "ratio": ratio, "ratio_same_arrivals": served[hi]["tok_s"] / replayed[hi]["tok_s"] if hi in replayed else None,
        "api_cpu_ms_per_request": per_request * 1e3, "api_cpu_us_per_token": per_token * 1e6,
        "send_cpu_us": send, "api_cpu_us_per_token_less_one_send": net, "server_exit_code": exit_code})


# ------------------------------------------------------------------------------------ main

def parse_rates(text: str) -> list[float]:
    rates = [math.inf if t.strip().lower() == "inf" else float(t) for t in text.split(",") if t.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"--rates {text!r}: expected positive numbers or inf, comma-separated")
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=None, help="requests per rate (default 96; 24 with --quick)")
    parser.add_argument("--rates", type=parse_rates, default=None,
                        help="Poisson arrival rates in requests/s, inf = all at once (default 2,4,8,inf; 4,inf with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer requests and rates")
    parser.add_argument("--repeats", type=int, default=5,
                        help="saturation (inf) and offline runs to take the median of (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", default="serve",
                        help="name of the results: bench/results/NAME.json and NAME.png (default serve; "
                             "serve_fake_step with --fake-step-ms)")
    parser.add_argument("--fake-step-ms", type=float, default=None, metavar="MS",
                        help="instead: the server over a device whose step sleeps MS (no host CPU) against the "
                             "engine loop alone over the same device (default: the real artifact)")
    parser.add_argument("--streams", type=int, default=256,
                        help="with --fake-step-ms: concurrent streams (default 256)")
    parser.add_argument("--tokens", type=int, default=32, help="with --fake-step-ms: tokens per stream (default 32)")
    parser.add_argument("--fake-pages", type=int, default=0, metavar="N",
                        help="with --fake-step-ms: the sleeping device's KV pool per DP group (default 0: the "
                             "artifact's, 160 pages, which holds ~64 of the 256 streams at full length: the run "
                             "then preempts, and its schedule depends on when requests arrive)")
    args = parser.parse_args()
    if args.fake_step_ms is not None:
        return fake_step(args)
    args.requests = args.requests or (24 if args.quick else 96)
    args.rates = args.rates or parse_rates("4,inf" if args.quick else "2,4,8,inf")

    artifact = ensure_artifact()
    load_avg = os.getloadavg()[0]
    if load_avg > 0.5:
        print(f"note: load average {load_avg:.1f} before the run; other processes on these "
              f"{os.cpu_count()} cores skew the figures")
    manifest = read_manifest(artifact)
    max_context = manifest.cache.pages_per_seq * manifest.cache.page_size
    vocab = manifest.model.vocab_size
    trace = make_trace(args.requests, seed=args.seed, vocab=vocab, max_context=max_context)
    from runtime.tokenizer import TextTokenizer

    tok = TextTokenizer.from_dir(artifact / "tokenizer")
    eos = set(tok.eos_ids) if tok is not None else set()
    plen, olen = np.array([len(p) for p in trace["prompts"]]), np.array(trace["max_new_tokens"])
    workload = {"requests": args.requests, "rates": ["inf" if math.isinf(r) else r for r in args.rates],
                "max_context": max_context, "eos_ids": sorted(eos), "seed": args.seed,
                "repeats": args.repeats, "load_average_before": load_avg,
                "prompt_len": {"mean": float(plen.mean()), "p50": float(np.median(plen)), "max": int(plen.max())},
                "output_len": {"mean": float(olen.mean()), "p50": float(np.median(olen)), "max": int(olen.max())},
                "total_output_tokens_max": int(olen.sum())}
    print(f"{args.requests} requests: prompt tokens mean {plen.mean():.1f} (max {plen.max()}), output tokens mean "
          f"{olen.mean():.1f} (max {olen.max()}), max context {max_context}; rates {workload['rates']} req/s")

    server_info, runs = serve_all(args, trace, eos)
    base = offline(trace, eos, args.repeats)  # after the server is gone: never both on the devices at once
    for row in runs:
        row["identical_to_offline"] = min(sum(a == b for a, b in zip(outs, base["_outputs"]))
                                          for outs in row.pop("_outputs"))
        print(f"rate {row['rate']!s:>4}: {row['identical_to_offline']}/{row['requests']} requests with the offline tokens")
    base.pop("_outputs")

    workload["load_average_after"] = os.getloadavg()[0]
    saturation = next((r for r in runs if r["rate"] == "inf"), max(runs, key=lambda r: r["output_tok_s"]))
    ratio = saturation["output_tok_s"] / base["output_tok_s"]
    compiles = max([server_info["compiles_after_load"]] + [r["compiles_after_load"] for r in runs])
    goals = {"saturation_over_offline": ratio, "throughput_goal": GOAL_RATIO,
             "throughput_met": ratio >= GOAL_RATIO,
             "server_compiles_after_load": compiles, "compiles_met": compiles == 0,
             "all_completed": all(r["completed"] == r["requests"] for r in runs),
             "identical_tokens": all(r["identical_to_offline"] == r["requests"] for r in runs),
             "server_exit_code": server_info["exit_code"], "clean_exit": server_info["exit_code"] == 0}
    print(f"server at saturation {saturation['output_tok_s']:.1f} tok/s / offline {base['output_tok_s']:.1f} tok/s = "
          f"{ratio:.2f} (goal >= {GOAL_RATIO}: {'met' if goals['throughput_met'] else 'not met'}); "
          f"server compiles after load {compiles} ({'met' if goals['compiles_met'] else 'not met'}); "
          f"all completed {goals['all_completed']}; identical tokens {goals['identical_tokens']}; "
          f"clean exit {goals['clean_exit']}")
    write_result(args.result, {"workload": workload, "server": server_info, "rates": runs, "offline": base,
                           "goals": goals})
    plot(runs, base, args.result)


def plot(runs, base, result: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(runs))
    labels = [str(r["rate"]) for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(x, [r["output_tok_s"] for r in runs], "o-", label="server output tok/s")
    a.axhline(base["output_tok_s"], color="black", linestyle="--", label="offline engine.generate")
    a.axhline(GOAL_RATIO * base["output_tok_s"], color="grey", linestyle=":", label=f"{GOAL_RATIO:.0%} of offline")
    a2 = a.twinx()
    a2.plot(x, [r["request_throughput"] for r in runs], "s--", color="tab:orange", markerfacecolor="none",
            markersize=9, label="server req/s (right axis)")
    a2.set_ylabel("requests / s")
    a.set_ylabel("output tokens / s")
    a.set_ylim(bottom=0)
    a2.set_ylim(bottom=0)
    h1, l1 = a.get_legend_handles_labels()
    h2, l2 = a2.get_legend_handles_labels()
    a.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    a.set_title("Throughput vs arrival rate")
    for key, style, color, name in (("ttft_ms_p50", "o-", "tab:blue", "TTFT p50"),
                                    ("ttft_ms_p99", "o--", "tab:blue", "TTFT p99"),
                                    ("itl_ms_p50", "s-", "tab:green", "ITL p50"),
                                    ("itl_ms_p99", "s--", "tab:green", "ITL p99"),
                                    ("e2e_ms_p50", "^:", "tab:grey", "E2E p50")):
        b.plot(x, [r[key] for r in runs], style, color=color, label=name)
    b.set_yscale("log")
    b.set_ylabel("ms")
    b.legend(fontsize=8)
    b.set_title("Latency vs arrival rate")
    for ax in (a, b):
        ax.set_xticks(x, labels)
        ax.set_xlabel("Poisson arrival rate (requests/s; inf = all at once)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{result}.png", dpi=120)
    print(f"wrote {(RESULTS / f'{result}.png').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
