"""Offline drivers for bench/peer.py, one process per run, started by it.

    python bench/peer_driver.py ours JOB.json OUT.json    (the project's Python: the runtime's API)
    python bench/peer_driver.py vllm JOB.json OUT.json    (vLLM's Python: vllm.LLM)

JOB.json holds the prompts, max_tokens, the model (an artifact and mesh, or a checkpoint) and
`started`, the wall time at which the parent started this process. Each driver loads its model,
notes when it is ready (startup = ready - started), generates every prompt once, greedily, EOS
ignored, in one call, and writes the tokens, the generation's wall time and the CPU time the
machine and this process tree spent in it.

Nothing here is imported at module level but the standard library: vLLM's Python has neither jax
nor this project, and vLLM starts worker processes by spawning, hence the __main__ guard.
"""

from __future__ import annotations

import json
import os
import sys
import time


def machine_cpu_seconds() -> float:
    """Busy CPU time of all cores since boot (/proc/stat), to see what else ran during a window."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and every live descendant (Linux /proc)."""
    parent, cpu = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(name)] = int(fields[1])
        cpu[int(name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if pid not in cpu:
        return float("nan")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo.extend(c for c, pp in parent.items() if pp == p)
    return total


class Window:
    """Wall time, machine CPU and this process tree's CPU over a block."""

    def __enter__(self):
        self.t0, self.m0, self.c0 = time.perf_counter(), machine_cpu_seconds(), tree_cpu_seconds(os.getpid())
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.machine_cpu = machine_cpu_seconds() - self.m0
        self.own_cpu = tree_cpu_seconds(os.getpid()) - self.c0

    def as_dict(self) -> dict:
        return {"generate_seconds": self.seconds, "own_cpu_seconds": self.own_cpu,
                "machine_cpu_seconds": self.machine_cpu, "load_average": os.getloadavg()[0]}


def run_ours(job: dict) -> dict:
    from runtime.engine import load
    from runtime.sampling import SamplingParams

    engine = load(job["artifact"], mesh=job["mesh"])
    ready = time.time()
    with Window() as w:  # what `runtime generate` does: one call, greedy, no EOS (the artifact names none)
        outputs, stats = engine.generate(job["prompts"], job["max_tokens"], "auto", SamplingParams())
    return {"ready": ready, "outputs": outputs, **w.as_dict(),
            "stats": {k: stats[k] for k in ("steps", "padding_efficiency", "compiles_after_load", "buckets")
                      if k in stats},
            "load_seconds": engine.load_info.seconds, "fast_load_hits": engine.load_info.fast_load_hits,
            "executables": engine.load_info.executables}


def vllm_settings(llm) -> dict:
    """What the engine runs with (its defaults unless the job set them), best effort across versions."""
    import vllm

    out = {"vllm": vllm.__version__, "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}}
    try:
        config = llm.llm_engine.vllm_config
    except AttributeError:
        return out
    for section, names in (("model_config", ("dtype", "max_model_len", "enforce_eager", "seed")),
                           ("scheduler_config", ("max_num_seqs", "max_num_batched_tokens",
                                                 "enable_chunked_prefill", "async_scheduling")),
                           ("cache_config", ("block_size", "enable_prefix_caching", "cpu_kvcache_space_bytes",
                                             "num_gpu_blocks")),
                           ("parallel_config", ("tensor_parallel_size", "pipeline_parallel_size")),
                           ("compilation_config", ("mode", "level", "backend"))):
        obj = getattr(config, section, None)
        for name in names:
            if obj is not None and hasattr(obj, name):
                out[f"{section.split('_')[0]}.{name}"] = str(getattr(obj, name))
    return out


def run_vllm(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["checkpoint"], dtype="float32", **job.get("vllm_args", {}))
    ready = time.time()
    # Token ids in and out, as on our side: no detokenizing (a user who sends ids and wants ids asks
    # for exactly this); EOS ignored so every prompt gets max_tokens.
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, detokenize=False)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    with Window() as w:
        results = llm.generate(prompts, params, use_tqdm=False)
    return {"ready": ready, "outputs": [list(r.outputs[0].token_ids) for r in results], **w.as_dict(),
            "settings": vllm_settings(llm)}


def main(argv: list[str]) -> int:
    side, job_path, out_path = argv
    with open(job_path) as f:
        job = json.load(f)
    result = {"ours": run_ours, "vllm": run_vllm}[side](job)
    result["startup_seconds"] = result["ready"] - job["started"]
    with open(out_path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out_path + ".tmp", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
