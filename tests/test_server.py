"""`python -m runtime serve` in a subprocess on a free port, driven by the official openai client."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from test_export import ROOT

MODEL = "qwen3-moe-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact, *args, launcher=("-m", "runtime"), env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, *launcher, "serve", str(artifact), "--port",
                                      str(self.port), *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=dict(os.environ, **(env or {})))
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise TimeoutError("server did not become ready")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(qwen3_moe_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def wait_idle(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = self.metrics()
            if m["qwen3_moe_kv_pages_used"] == 0 and m["qwen3_moe_requests_running"] == 0:
                return m
            time.sleep(0.2)
        raise AssertionError(f"pages still held: {self.metrics()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(tiny_artifact):
    s = Server(tiny_artifact)
    yield s
    s.stop()


def test_token_id_prompts_give_the_generate_cli_tokens(server, tiny_engine):
    prompts = [[1, 2, 3], [7, 8], list(range(40, 75))]
    want, _ = tiny_engine.generate(prompts, 8)
    for p, w in zip(prompts, want):
        r = server.client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
        choice = r.choices[0]
        ids = choice.model_extra["token_ids"]
        assert ids == w[:len(ids)]
        assert len(ids) == 8 or choice.finish_reason == "stop"
        assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == len(ids)


def test_a_repeated_prompt_reports_its_cached_tokens(server):
    """usage.prompt_tokens_details.cached_tokens, streamed or not: 0 for a new prompt, all its full
    pages but the last token's for a repeat, with the same tokens."""
    prompt = list(range(300, 350))  # 50 tokens: 6 full pages of 8 before the last token's
    ask = lambda **kw: server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,  # noqa: E731
                                                        temperature=0, extra_body={"ignore_eos": True}, **kw)
    before = server.metrics()["qwen3_moe_prefix_cache_hit_tokens_total"]
    first, second = ask(), ask()
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 48
    assert second.choices[0].model_extra["token_ids"] == first.choices[0].model_extra["token_ids"]
    chunks = list(ask(stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 48
    assert [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]] == \
        first.choices[0].model_extra["token_ids"]
    m = server.metrics()
    assert m["qwen3_moe_prefix_cache_hit_tokens_total"] - before == 96
    assert m["qwen3_moe_prefix_cache_pages"] >= 6
    chat = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2)
    assert chat.usage.prompt_tokens_details.cached_tokens >= 0


def test_n_choices_sample_with_seed_plus_i(server, tiny_engine):
    """n > 1: choice i is what a request alone with seed + i gives (greedy choices are all alike)."""
    from runtime.sampling import SamplingParams

    prompt = list(range(200, 230))
    sampling = SamplingParams(temperature=0.9, top_k=40, seed=41)
    want, _ = tiny_engine.generate([prompt] * 3, 5, sampling=sampling)  # prompt i samples with seed + i
    r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.9, seed=41,
                                         n=3, extra_body={"top_k": 40, "ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.model_extra["token_ids"] for c in r.choices] == want
    assert r.usage.prompt_tokens == 30 and r.usage.completion_tokens == 15
    chat = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, temperature=0, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content


def test_n_choices_streamed_interleave_by_index(server, tiny_engine):
    """Streamed n > 1: each choice's events, told apart by index, give what a request alone with
    seed + i gives, with its own stop string and finish; one usage event counts them all; chat
    opens each choice with its role."""
    from runtime.sampling import SamplingParams

    prompt = list(range(300, 324))
    sampling = SamplingParams(temperature=0.9, top_k=40, seed=7)
    want, _ = tiny_engine.generate([prompt] * 3, 6, sampling=sampling)
    stream = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0.9, seed=7,
                                              n=3, stream=True, logprobs=1,
                                              stream_options={"include_usage": True},
                                              extra_body={"top_k": 40, "ignore_eos": True})
    ids, finish, text, usage = {}, {}, {}, None
    for ev in stream:
        if ev.usage:
            usage = ev.usage
        for c in ev.choices:
            ids.setdefault(c.index, []).extend(c.model_extra["token_ids"])
            text[c.index] = text.get(c.index, "") + c.text
            assert len(c.logprobs.tokens) == len(c.model_extra["token_ids"])
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert [ids[i] for i in range(3)] == want and finish == {0: "length", 1: "length", 2: "length"}
    assert usage.prompt_tokens == 24 and usage.completion_tokens == 18
    # A stop string ends its own choice only: the text up to it, finish "stop".
    assert len(text[1]) >= 4, text  # seeded: the same text every run
    stop = text[1][2:4]
    stream = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0.9,
                                              seed=7, n=3, stream=True, stop=[stop],
                                              extra_body={"top_k": 40, "ignore_eos": True})
    got, why = {}, {}
    for ev in stream:
        for c in ev.choices:
            got[c.index] = got.get(c.index, "") + c.text
            why[c.index] = c.finish_reason or why.get(c.index)
    assert got[1] == text[1][:text[1].index(stop)] and why[1] == "stop"
    for i in (0, 2):
        assert got[i] == (text[i][:text[i].index(stop)] if stop in text[i] else text[i])
    chat = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, temperature=0, n=2, stream=True)
    roles, content = {}, {}
    for ev in chat:
        for c in ev.choices:
            roles[c.index] = roles.get(c.index) or c.delta.role
            content[c.index] = content.get(c.index, "") + (c.delta.content or "")
    assert roles == {0: "assistant", 1: "assistant"} and content[0] == content[1]
    assert server.wait_idle()["qwen3_moe_kv_pages_used"] == 0


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ready"}


def test_64_concurrent_streams(server, tiny_engine):
    """Each stream gets exactly `generate`'s tokens for its seed, whatever it was batched with."""
    from runtime.sampling import SamplingParams

    prompts = [[(i * 7 + k) % 400 + 1 for k in range(1 + i % 23)] for i in range(64)]

    def one(i):
        stream = server.client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=4 + i % 9,
                                                  temperature=0.7, seed=i, stream=True)
        ids, finish = [], None
        for ev in stream:
            ids += ev.choices[0].model_extra["token_ids"]
            finish = ev.choices[0].finish_reason or finish
        return i, ids, finish

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    eos = set(json.loads((server_artifact_tokenizer(server) / "generation_config.json").read_text())["eos_token_id"])
    tiny_engine.reset_cache()  # request i of a call samples with seed + i: seed 0 gives request i seed i
    want, _ = tiny_engine.generate(prompts, [4 + i % 9 for i in range(64)], sampling=SamplingParams(0.7),
                                   eos_token_id=sorted(eos))
    assert [ids for _, ids, _ in results] == want
    for i, ids, finish in results:
        if finish == "length":
            assert len(ids) == 4 + i % 9
        else:
            assert finish == "stop" and ids[-1] in eos and len(ids) <= 4 + i % 9
    m = server.wait_idle()
    assert m["qwen3_moe_compiles_after_load"] == 0
    assert m["qwen3_moe_generation_tokens_total"] >= sum(len(ids) for _, ids, _ in results)
    assert m["qwen3_moe_kv_pages_free"] > 0
    # At most one send of each input per step, fewer where the device already held it.
    assert 0 < m['qwen3_moe_inputs_sent_total{input="ints"}'] <= m["qwen3_moe_steps_total"]
    assert m["qwen3_moe_steps_repeated_total"] < m["qwen3_moe_steps_total"]


def server_artifact_tokenizer(server):
    from pathlib import Path
    args = server.proc.args
    return Path(args[args.index("serve") + 1]) / "tokenizer"


def test_chat_with_text_and_stop_strings(server):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello, world."}]
    r = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert isinstance(text, str) and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(r.choices[0].model_extra["token_ids"]) >= 1
    # streaming gives the same text
    pieces = [c.choices[0].delta.content or "" for c in server.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == text
    # a stop string cuts the text before it and ends with "stop"
    full = server.client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=0)
    out = full.choices[0].text
    if len(out.strip()) >= 4:
        stop = out.strip()[2:4]
        cut = server.client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16,
                                               temperature=0, stop=[stop])
        assert cut.choices[0].text == out[:out.index(stop)] and cut.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].text for c in server.client.completions.create(
            model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=0, stop=[stop], stream=True))
        assert streamed == cut.choices[0].text


def test_logprobs(server):
    r = server.client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 3 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(max(t.values()) - x) < 1e-5 for t, x in zip(lp.top_logprobs, lp.token_logprobs))


@pytest.mark.parametrize("n", [1, 3])
def test_disconnect_mid_stream_frees_pages(server, n):
    server.wait_idle()
    cancelled = finished(server, "cancelled")
    body = {"model": MODEL, "prompt": [3, 4, 5], "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True, "n": n}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert any(line.startswith("data:") for line in got)
            assert server.metrics()["qwen3_moe_kv_pages_used"] > 0
    server.wait_idle()
    assert finished(server, "cancelled") - cancelled == n  # every choice of it


@pytest.mark.parametrize("body,status,param", [
    ({"max_tokens": -1}, 400, "max_tokens"),
    ({"temperature": -0.5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"prompt": [1, 2, 999999]}, 400, "prompt"),
    ({"prompt": [1] * 250, "max_tokens": 16}, 400, "max_tokens"),
    ({"model": "gpt-4"}, 404, "model"),
    ({"n": 17}, 400, "n"),
    ({"n": 0}, 400, "n"),
    ({"logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"frobnicate": True}, 400, "frobnicate"),
    ({"logprobs": 9}, 400, "logprobs"),
    ({"prompt": []}, 400, "prompt"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 2} | body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]
    assert "Traceback" not in r.text


def test_not_json_and_unknown_route(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v2/whatever")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "POST" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b" " * (33 << 20), timeout=60)
    assert r.status_code == 413 and "MiB" in r.json()["error"]["message"]


def test_queue_full_429_and_sigterm_drains(tiny_artifact):
    s = Server(tiny_artifact, "--max-queue", "1")
    try:
        results = {}

        def long(i):
            try:
                # 250 positions each: 32 of a group's 159 pages, so 8 run at once and the rest wait
                r = s.client.completions.create(model=MODEL, prompt=[1 + i] * 100, max_tokens=150, temperature=0)
                results[i] = (len(r.choices[0].model_extra["token_ids"]), r.choices[0].finish_reason)
            except openai.RateLimitError:
                results[i] = 429

        threads = [threading.Thread(target=long, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        deadline = time.time() + 60  # the burst has arrived: some run, the rest were refused
        while not (429 in results.values() and s.metrics()["qwen3_moe_requests_running"] > 0):
            assert time.time() < deadline, (results, s.metrics())
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)  # while requests run: they finish, new ones get 503
        time.sleep(0.2)
        health = httpx.get(s.url + "/health")  # the listener stays open while it drains
        assert (health.status_code, health.json()) == (503, {"status": "draining"})
        late = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 2})
        assert late.status_code == 503 and "draining" in late.json()["error"]["message"]
        for t in threads:
            t.join(120)
        assert s.proc.wait(60) == 0
        log = s.proc.stdout.read().splitlines()
        assert [line.split(":")[1].split()[0] for line in log] == ["listening", "ready", "draining", "shut"], log
        assert 429 in results.values()  # one may wait at most: the rest of the burst is refused
        finished = [v for v in results.values() if v != 429]
        assert finished and all(f in ("length", "stop") for _, f in finished)
    finally:
        s.stop()


def test_an_artifact_that_fails_to_load_ends_the_server_with_one_line(tiny_artifact, tmp_path):
    import shutil

    copy = tmp_path / "bad"
    shutil.copytree(tiny_artifact, copy)
    victim = next((copy / "weights").iterdir())
    victim.write_bytes(victim.read_bytes() + b"x")
    r = subprocess.run([sys.executable, "-m", "runtime", "serve", str(copy), "--port", str(free_port())], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "does not match the manifest" in lines[0] and str(victim.name) in lines[0], r.stderr


# ------------------------------------------------------------------------------------ failures

def finished(server, reason):
    return server.metrics().get(f'qwen3_moe_requests_finished_total{{reason="{reason}"}}', 0)


def test_a_non_streamed_client_that_leaves_is_cancelled_at_once(server):
    """Nothing is sent to a non-streamed client until its request ends, so only the connection
    tells that it left: its request stops within a step or so, not at max_tokens."""
    server.wait_idle()
    before, cancelled = server.metrics()["qwen3_moe_generation_tokens_total"], finished(server, "cancelled")
    body = json.dumps({"model": MODEL, "prompt": [3, 4, 5], "max_tokens": 240, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 30
        while server.metrics()["qwen3_moe_generation_tokens_total"] - before < 5:
            assert time.time() < deadline, "the request never started"
            time.sleep(0.02)
    server.wait_idle(timeout=10)
    assert finished(server, "cancelled") == cancelled + 1
    generated = server.metrics()["qwen3_moe_generation_tokens_total"] - before
    assert generated < 240, f"the request ran on to {generated} tokens after its client left"


FAULT = """
import os, sys
import runtime.engine as engine
fetch = engine.Engine.fetch
def failing(self, outputs):
    if os.path.exists(os.environ["FAULT_FILE"]):
        raise RuntimeError("injected device fault")
    return fetch(self, outputs)
engine.Engine.fetch = failing
from runtime.cli import main
sys.exit(main())
"""


def test_an_engine_that_fails_ends_every_request_and_the_server(tiny_artifact, tmp_path):
    """A step raises while requests run and wait: every client hears of it (a 500 in the API's
    shape, or an error event that ends the stream), /health says why with 503, new requests get
    503, and the process exits 1 for its supervisor to restart it."""
    fault = tmp_path / "fault"
    s = Server(tiny_artifact, launcher=("-c", FAULT), env={"FAULT_FILE": str(fault)})
    ended, seen = {}, {}

    def plain(i):
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": [1 + i] * 100, "max_tokens": 150,
                                                              "ignore_eos": True}, timeout=60)
        ended[i] = (time.perf_counter(), r.status_code, r.json()["error"]["type"] if r.status_code >= 400 else None)

    def streamed(i):
        body = {"model": MODEL, "prompt": [1 + i] * 100, "max_tokens": 150, "stream": True, "ignore_eos": True}
        last = None
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                last = line or last
        ended[i] = (time.perf_counter(), r.status_code, json.loads(last[6:]).get("error", {}).get("type"))

    def watch():
        while s.proc.poll() is None:
            try:
                h = httpx.get(s.url + "/health", timeout=2)
                if h.status_code == 503:
                    seen["health"] = h.json()
                    r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 2})
                    seen["new"] = r.status_code, r.json()["error"]["message"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)

    try:
        threads = [threading.Thread(target=plain if i % 2 else streamed, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while s.metrics()["qwen3_moe_generation_tokens_total"] < 20:  # 8 run, 4 wait for pages
            assert time.time() < deadline
            time.sleep(0.05)
        watcher = threading.Thread(target=watch)
        watcher.start()
        fault.touch()
        t0 = time.perf_counter()
        for t in threads:
            t.join(60)
        watcher.join(60)
        assert s.proc.wait(60) == 1
        out = s.proc.stdout.read()
    finally:
        s.stop()
    assert len(ended) == 12, ended
    took = max(t for t, _, _ in ended.values()) - t0
    print(f"every request ended {took:.2f} s after the fault")
    assert took < 10
    for i, (_, status, error_type) in ended.items():
        assert (status, error_type) == ((500, "server_error") if i % 2 else (200, "server_error")), (i, status)
    assert seen["health"]["status"] == "failed" and "injected device fault" in seen["health"]["error"]
    assert seen["new"][0] == 503 and "injected device fault" in seen["new"][1]
    assert "python -m runtime: error: the engine failed: RuntimeError: injected device fault" in out
    assert "exit 1" in out.splitlines()[-1]


def engine_pid(server) -> int:
    """The engine process: the server's one child."""
    kids = open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read().split()
    assert len(kids) == 1, f"the server has {len(kids)} child processes, expected its engine alone: {kids}"
    return int(kids[0])


async def _until_it_ends(port: int, body: bytes) -> tuple[float, bytes]:
    """One request over a bare socket: when its response ended, and its last bytes."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    tail = b""
    while chunk := await reader.read(65536):
        tail = (tail + chunk)[-600:]
    writer.close()
    return time.perf_counter(), tail


def test_an_engine_killed_under_64_streams_ends_every_request_within_2_s(tiny_artifact):
    """SIGKILL leaves the engine no time to say anything: its pipe's end of file is what the HTTP
    side sees. Every client, streamed or not, running or queued, gets an error at once."""
    import asyncio

    s = Server(tiny_artifact)
    try:
        victim = engine_pid(s)
        bodies = [json.dumps({"model": MODEL, "prompt": [1 + i] * 20, "max_tokens": 230, "ignore_eos": True,
                              "stream": i % 4 != 0}).encode() for i in range(64)]

        async def scenario():
            clients = [asyncio.create_task(_until_it_ends(s.port, b)) for b in bodies]
            deadline = time.time() + 60
            while s.metrics()["qwen3_moe_generation_tokens_total"] < 64:
                assert time.time() < deadline, "the requests never started"
                await asyncio.sleep(0.05)
            os.kill(victim, signal.SIGKILL)
            killed = time.perf_counter()
            ends = await asyncio.gather(*clients)
            health = httpx.get(s.url + "/health")
            return killed, ends, health

        killed, ends, health = asyncio.run(scenario())
        code = s.proc.wait(30)
    finally:
        s.stop()
    took = max(t for t, _ in ends) - killed
    print(f"every request ended {took:.2f} s after the kill")
    assert took < 2.0
    for i, (_, tail) in enumerate(ends):
        assert b'"type":"server_error"' in tail and b"SIGKILL" in tail, (i, tail)
        assert (b"HTTP/1.1 500" in tail) if i % 4 == 0 else (b'data: {"error"' in tail), (i, tail)
    assert health.status_code == 503 and "SIGKILL" in health.json()["error"]
    assert code == 1


def test_the_engine_process_ends_with_the_http_process(tiny_artifact):
    """An HTTP process killed outright leaves no engine behind holding the devices."""
    s = Server(tiny_artifact)
    try:
        engine = engine_pid(s)
        s.proc.kill()
        s.proc.wait(10)
        deadline = time.time() + 30
        while os.path.exists(f"/proc/{engine}") and "zombie" not in open(f"/proc/{engine}/status").read():
            assert time.time() < deadline, "the engine process outlived its HTTP process by 30 s"
            time.sleep(0.1)
    finally:
        s.stop()


# ------------------------------------------------------------------------------------ the API

def post(server, body, path="/v1/completions", **kw):
    return httpx.post(server.url + path, json={"model": MODEL} | body, timeout=60, **kw)


def test_a_lone_surrogate_is_a_400_not_a_reset(server):
    for path, field in (("/v1/completions", '"prompt": "\\ud800 x"'),
                        ("/v1/chat/completions", '"messages": [{"role": "user", "content": "a\\udfff"}]')):
        raw = ('{"model": "%s", "max_tokens": 2, %s}' % (MODEL, field)).encode()
        r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert "lone UTF-16 surrogate" in r.json()["error"]["message"]


def test_chat_content_as_text_parts(server):
    plain = post(server, {"messages": [{"role": "user", "content": "Hi\nthere"}], "max_tokens": 4, "temperature": 0},
                 "/v1/chat/completions").json()
    parts = post(server, {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                                     {"type": "text", "text": "there"}]}],
                          "max_tokens": 4, "temperature": 0}, "/v1/chat/completions").json()
    assert parts["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]
    assert parts["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    r = post(server, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
             "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and "image_url" in r.text


def test_a_model_by_id_and_response_format(server):
    assert server.client.models.retrieve(MODEL).id == MODEL
    r = httpx.get(server.url + "/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert post(server, {"prompt": [1, 2], "max_tokens": 2, "response_format": {"type": "text"}}).status_code == 200
    r = post(server, {"prompt": [1, 2], "max_tokens": 2, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_a_chat_prompt_longer_than_the_context_says_so(server):
    r = post(server, {"messages": [{"role": "user", "content": "hello world " * 300}]}, "/v1/chat/completions")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and "fills the max context" in err["message"]


def test_stop_token_ids_min_tokens_ignore_eos(server):
    """The extensions load tools send: exact lengths, stops on ids of the caller's choosing."""
    base = {"prompt": [11, 12, 13], "max_tokens": 12, "temperature": 0}
    full = post(server, base | {"ignore_eos": True}).json()["choices"][0]
    ids = full["token_ids"]
    assert len(ids) == 12 and full["finish_reason"] == "length"
    stop = ids[3]
    cut = post(server, base | {"stop_token_ids": [stop], "ignore_eos": True}).json()["choices"][0]
    k = ids.index(stop)
    assert cut["token_ids"] == ids[:k + 1] and cut["finish_reason"] == "stop"
    late = post(server, base | {"stop_token_ids": [stop], "ignore_eos": True, "min_tokens": k + 2}).json()["choices"][0]
    later = [j for j in range(k + 1, 12) if ids[j] == stop]
    assert late["token_ids"] == ids[:later[0] + 1 if later else 12]
    # EOS: find a seeded request that ends on an EOS id, then run it past that with ignore_eos
    for seed in range(40):
        body = {"prompt": [21, 22], "max_tokens": 40, "temperature": 1.0, "seed": seed}
        c = post(server, body).json()["choices"][0]
        if c["finish_reason"] == "stop":
            break
    else:
        pytest.fail("no seed of 40 ended on an EOS id")
    n = len(c["token_ids"])
    free = post(server, body | {"ignore_eos": True}).json()["choices"][0]
    assert free["token_ids"][:n] == c["token_ids"] and len(free["token_ids"]) == 40
    fixed = post(server, body | {"min_tokens": 40}).json()["choices"][0]
    assert len(fixed["token_ids"]) == 40 and fixed["finish_reason"] == "length"
    r = post(server, base | {"min_tokens": 13})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"


def test_stop_string_finishes_are_counted_as_stop(server):
    full = post(server, {"prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0}).json()
    text = full["choices"][0]["text"].strip()
    assert len(text) >= 4, full
    stop = text[2:4]
    server.wait_idle()
    stops, cancels = finished(server, "stop"), finished(server, "cancelled")
    r = post(server, {"prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0, "stop": [stop]}).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    server.wait_idle()
    assert (finished(server, "stop"), finished(server, "cancelled")) == (stops + 1, cancels)


def test_logprobs_keep_every_alternative_and_their_bytes(server):
    """Completions: N alternatives per token even when two decode to one text, and the same
    offsets streamed or not. Chat: each token's own bytes, which add up to the text's."""
    body = {"prompt": "Zebras eat", "max_tokens": 10, "temperature": 0, "logprobs": 5}
    plain = post(server, body).json()["choices"][0]["logprobs"]
    assert all(len(top) == 5 for top in plain["top_logprobs"])
    streamed = []
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": MODEL, "stream": True} | body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                streamed += lp["text_offset"] if lp else []
    assert streamed == plain["text_offset"]
    messages = [{"role": "user", "content": "Write something in Japanese: 日本語"}]
    r = post(server, {"messages": messages, "max_tokens": 16, "temperature": 0, "logprobs": True, "top_logprobs": 2},
             "/v1/chat/completions").json()["choices"][0]
    eos = set(json.loads((server_artifact_tokenizer(server) / "generation_config.json").read_text())["eos_token_id"])
    content = [e for e, t in zip(r["logprobs"]["content"], r["token_ids"]) if t not in eos]
    assert bytes(b for e in content for b in e["bytes"]).decode("utf-8", "replace") == r["message"]["content"]


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_a_streams_events_encode_as_whole_chunks_do(kind):
    """The per-stream encoder writes the same bytes as encoding each chunk whole."""
    from runtime.openai_api import Request, chunk, chunk_choice
    from runtime.sampling import SamplingParams
    from runtime.server import ChunkEncoder, sse

    req = Request(kind, "m\u00e9\"odel", None, [1], 4, SamplingParams(), [], True, 2)
    encode = ChunkEncoder(req)
    for text, ids, finish, lp in [("h\u00e9llo \"x\"\n", (5,), None, None), (None, (), None, None),
                                  ("", (7,), "length", {"tokens": ["\ufffd"], "token_logprobs": [-0.5]})]:
        assert encode(chunk_choice(req, text, ids, finish, lp)) == sse(chunk(req, text, ids, finish, lp))
    assert encode(chunk_choice(req, None, [], first=True)) == sse(chunk(req, None, [], first=True))
    plain = Request(kind, "m\u00e9\"odel", None, [1], 4, SamplingParams(), [], True, None)
    encode = ChunkEncoder(plain)
    for text in ["", "h\u00e9llo \"x\"\n", "\\ \t\x00\x1f\u2028 \ufffd\U0001f600</script>", "日本語"]:
        for token, finish in [(0, None), (151643, "stop"), (7, "length"), (12, "cancelled")]:
            assert encode.token(text, token, finish) == sse(chunk(plain, text, (token,), finish))
            assert json.loads(encode.token(text, token, finish)[6:]) == chunk(plain, text, [token], finish)
