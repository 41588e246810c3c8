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
    def __init__(self, artifact, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", str(artifact), "--port",
                                      str(self.port), *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
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


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ready"}


def test_64_concurrent_streams(server):
    def one(i):
        stream = server.client.completions.create(model=MODEL, prompt=[(i * 7 + k) % 400 + 1 for k in range(1 + i % 23)],
                                                  max_tokens=4 + i % 9, temperature=0.7, seed=i, stream=True)
        ids, finish = [], None
        for ev in stream:
            ids += ev.choices[0].model_extra["token_ids"]
            finish = ev.choices[0].finish_reason or finish
        return i, ids, finish

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    eos = set(json.loads((server_artifact_tokenizer(server) / "generation_config.json").read_text())["eos_token_id"])
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


def test_disconnect_mid_stream_frees_pages(server):
    body = {"model": MODEL, "prompt": [3, 4, 5], "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert any(line.startswith("data:") for line in got)
            assert server.metrics()["qwen3_moe_kv_pages_used"] > 0
    server.wait_idle()
    assert server.metrics().get('qwen3_moe_requests_finished_total{reason="cancelled"}', 0) >= 1


@pytest.mark.parametrize("body,status,param", [
    ({"max_tokens": -1}, 400, "max_tokens"),
    ({"temperature": -0.5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"prompt": [1, 2, 999999]}, 400, "prompt"),
    ({"prompt": [1] * 250, "max_tokens": 16}, 400, "max_tokens"),
    ({"model": "gpt-4"}, 404, "model"),
    ({"n": 2}, 400, "n"),
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
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGTERM)  # while requests run: they finish, new ones get 503
        for t in threads:
            t.join(120)
        assert s.proc.wait(60) == 0
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
