"""One 2x4 artifact served by two processes of 4 virtual CPU devices each, on loopback."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import build_artifact
from test_export import ROOT, run_cli

# The last one starts with the first's two full pages: it takes them from the prefix cache.
PROMPTS = ["1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20", "7,8", "400,3,9", "5",
           "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_args(artifact):
    args = ["runtime", "generate", str(artifact), "--max-new-tokens", "6", "--json"]
    for p in PROMPTS:
        args += ["--prompt-ids", p]
    return args


def env_with_devices(n):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    return build_artifact(tmp_path_factory.mktemp("mp") / "tiny", ladder=(4, 16))


def test_two_processes_give_the_single_process_tokens(small_artifact):
    single = run_cli(*generate_args(small_artifact), env=env_with_devices(8))
    assert single.returncode == 0, single.stderr
    expected = json.loads(single.stdout)["outputs"]

    port = free_port()
    cluster = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--timeout", "120"]
    procs = [subprocess.Popen([sys.executable, "-m", *generate_args(small_artifact), *cluster, "--process-id", str(i)],
                              cwd=ROOT, env=env_with_devices(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in (0, 1)]
    results = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    out0, out1 = results[0][0], results[1][0]
    assert json.loads(out0)["outputs"] == expected  # stdout is exactly one JSON object
    assert json.loads(out0)["stats"]["compiles_after_load"] == 0
    assert json.loads(out0)["stats"]["cached_tokens"] == json.loads(single.stdout)["stats"]["cached_tokens"] > 0
    assert out1 == ""  # only process 0 prints


def test_peer_that_never_starts_is_a_clear_error_within_the_timeout(small_artifact):
    port = free_port()
    t0 = time.perf_counter()
    r = run_cli(*generate_args(small_artifact), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", "0", "--timeout", "3", env=env_with_devices(4), timeout=120)
    elapsed = time.perf_counter() - t0
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not every process joined within 3 s" in lines[0], r.stderr
    assert r.stdout == ""
    assert elapsed < 3 + 30


@pytest.mark.parametrize("args,message", [
    (["--coordinator", "127.0.0.1:1"], "needs --coordinator HOST:PORT, --num-processes N and --process-id I"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "expected HOST:PORT"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "must be in [0, 2)"),
])
def test_bad_cluster_flags(small_artifact, args, message):
    r = run_cli("runtime", "generate", str(small_artifact), "--prompt-ids", "1", *args, timeout=60)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_serve_across_two_processes_and_a_peer_dying_mid_request(small_artifact):
    """Process 0 serves HTTP, process 1 steps the same schedule: the single-process tokens come back;
    killing process 1 during a streaming request ends process 0 with one clear line within the timeout."""
    import httpx

    single = run_cli("runtime", "generate", str(small_artifact), "--prompt-ids", "1,2,3", "--max-new-tokens", "8",
                     "--json", env=env_with_devices(8))
    expected = json.loads(single.stdout)["outputs"][0]
    http_port, port = free_port(), free_port()
    cluster = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--timeout", "15"]
    procs = [subprocess.Popen([sys.executable, "-m", "runtime", "serve", str(small_artifact), "--port", str(http_port),
                               *cluster, "--process-id", str(i)], cwd=ROOT, env=env_with_devices(4),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for i in (0, 1)]
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.5)
        body = {"model": "qwen3-moe-tiny", "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == expected
        # Both processes keep the same prefix cache: a repeated prompt takes its full pages from it.
        long = body | {"prompt": list(range(1, 21))}
        first, again = (httpx.post(url + "/v1/completions", json=long, timeout=120).json() for _ in range(2))
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 16
        assert again["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]

        with httpx.Client(timeout=120) as client:
            with client.stream("POST", url + "/v1/completions", json=body | {"max_tokens": 200, "stream": True,
                                                                                  "ignore_eos": True}) as s:
                lines = s.iter_lines()
                assert next(lines).startswith("data:")
                os.killpg(procs[1].pid, 9)  # the peer dies mid-request
                t0 = time.perf_counter()
                try:
                    for _ in lines:
                        pass
                except httpx.HTTPError:
                    pass  # the connection drops when process 0 ends
        _, err = procs[0].communicate(timeout=120)
        elapsed = time.perf_counter() - t0
        assert procs[0].returncode != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "lost contact with a peer process" in lines[0], err
        assert elapsed < 15 + 30
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
