"""A device whose step takes a fixed wall time and no host CPU, for measuring the host side alone.

`python -m bench.fake_device STEP_MS STATS_JSON PAGES serve ARTIFACT [serve options]` is `python -m
runtime serve` with the artifact's executables replaced by `SleepingDevice`: the scheduler, the
engine loop and the whole HTTP side are the real ones, the artifact's buckets, cache geometry and
tokenizer too; only the step is a sleep. STEP_MS is one time for every step, or a table of one
per bucket (a JSON file as bench/stand_in.py writes it: each bucket's `device_ms`). PAGES: the pool
per DP group (0: the artifact's), so that a benchmark can take the scheduler's pool pressure out of
what it measures. When the engine
process ends it writes the device's timings to STATS_JSON.
"""

from __future__ import annotations

import json
import multiprocessing.util
import sys
import time

import numpy as np


class SleepingDevice:
    """An executor with the engine's shape. A launched step runs for its bucket's time (`step_s`:
    one for all, or one per bucket name) once the steps before it are done (one device, steps in
    order); reading its outputs waits for that. Every sampled token is `token`, so nothing ends
    before max_tokens."""

    def __init__(self, manifest, mesh_entry, step_s: "float | dict[str, float]", token: int, pages: int = 0):
        from runtime.engine import LoadInfo

        cache = manifest.cache
        self.manifest, self.dp = manifest, mesh_entry.dp
        self.page_size, self.num_pages, self.pages_per_seq = cache.page_size, pages or cache.num_pages, cache.pages_per_seq
        self.vocab_size, self.num_logprobs = manifest.model.vocab_size, manifest.logprobs
        self.buckets = sorted({e.bucket for e in manifest.executables_of(mesh_entry.name)})
        self.step_seconds = self.bucket_cost = None
        self.compiles_after_load, self.repeats, self.transfers = 0, 0, {}
        self.load_info = LoadInfo(mesh_entry.name, len(self.buckets), False, 0, 0.0, "sleeping device")
        if isinstance(step_s, dict):
            missing = sorted(b.name for b in self.buckets if b.name not in step_s)
            if missing:
                raise ValueError(f"the step-time table has no time for buckets {missing} of mesh {mesh_entry.name}")
        else:  # one time for every bucket
            step_s = {b.name: step_s for b in self.buckets}
        self.step_s, self.token = step_s, token  # {bucket name: seconds}
        self._free_at = 0.0  # when the device is done with everything launched so far
        self.idle: list[tuple[float, float]] = []  # per launch: (when, how long the device had waited for the host)
        self.arrivals: list[float] = []  # when each request reached the engine loop (set by `main`'s launcher)
        self.steps = 0

    @property
    def capabilities(self):
        from runtime.capabilities import Capabilities

        return Capabilities(pipelined=True, repeats=True, num_logprobs=self.num_logprobs)

    def dispatch(self, bucket, batch):
        now = time.perf_counter()
        if self.steps:
            self.idle.append((now, max(0.0, now - self._free_at)))
        self._free_at = max(now, self._free_at) + self.step_s[bucket.name]
        self.steps += 1
        return bucket, self._free_at

    def dispatch_again(self, bucket):
        self.repeats += 1
        return self.dispatch(bucket, None)

    def fetch(self, handle):
        bucket, done = handle
        wait = done - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        shape, top = (self.dp, bucket.seqs), (self.dp, bucket.seqs, self.num_logprobs)
        return {"tokens": np.full(shape, self.token, np.int32), "logprobs": np.zeros(shape, np.float32),
                "top_ids": np.zeros(top, np.int32), "top_logprobs": np.zeros(top, np.float32)}

    def run(self, bucket, batch):
        return self.fetch(self.dispatch(bucket, batch))

    def timings(self) -> dict:
        return {"steps": self.steps, "repeats": self.repeats, "idle": self.idle, "arrivals": self.arrivals}


def plain_token(artifact) -> int:
    """A token that ends nothing: not an EOS id of the artifact's tokenizer."""
    from runtime.tokenizer import TextTokenizer

    tok = TextTokenizer.from_dir(artifact / "tokenizer")
    eos = set(tok.eos_ids) if tok is not None else set()
    return next(t for t in range(100, 10**6) if t not in eos)


def step_times(step_ms: "float | str") -> "tuple[str | None, float | dict[str, float]]":
    """(mesh, seconds) from STEP_MS: a number of milliseconds for every step (any mesh), or a
    bench/stand_in.py table (a JSON file) of per-bucket times measured on one mesh."""
    try:
        return None, float(step_ms) / 1e3
    except ValueError:
        with open(step_ms) as f:
            table = json.load(f)
        return table["mesh"], {name: row["device_ms"] / 1e3 for name, row in table["buckets"].items()}


def sleeping_device(artifact, step_ms: "float | str", pages: int = 0) -> SleepingDevice:
    from pathlib import Path

    from runtime.format import read_manifest

    manifest = read_manifest(artifact)
    mesh_name, seconds = step_times(step_ms)
    mesh = max(manifest.meshes, key=lambda m: m.devices) if mesh_name is None else manifest.mesh(mesh_name)
    if mesh is None:
        raise ValueError(f"{step_ms}: times for mesh {mesh_name}, which {artifact} does not have "
                         f"(it has {', '.join(m.name for m in manifest.meshes)})")
    return SleepingDevice(manifest, mesh, seconds, plain_token(Path(artifact)), pages)


def main(argv: list[str]) -> int:
    step_ms, stats_path, pages, rest = argv[0], argv[1], int(argv[2]), argv[3:]
    import runtime.engine_proc
    from runtime.cli import main as runtime_main

    def load(path, **_):
        """Runs in the engine process (forked by the server), which writes the timings when it ends.
        Every request the engine loop takes is timed on arrival (perf_counter: the system's
        monotonic clock, the same in every process), so that a benchmark can replay the arrivals."""
        from runtime.engine_loop import EngineLoop

        device = sleeping_device(path, step_ms, pages)
        multiprocessing.util.Finalize(device, write, args=(device,), exitpriority=1)
        submit = EngineLoop.submit

        def timed_submit(self, *args, **kwargs):
            device.arrivals.append(time.perf_counter())
            return submit(self, *args, **kwargs)

        EngineLoop.submit = timed_submit
        return device

    def write(device):
        with open(stats_path, "w") as f:
            json.dump(device.timings(), f)

    load_engine = runtime.engine_proc._load

    def load_in_engine_process(spec):
        """`runtime.engine` (and JAX with it) is imported in the engine process only, as by `runtime
        serve`: imported here, the HTTP process would carry JAX's objects and its gc callback."""
        import runtime.engine

        runtime.engine.load = load
        return load_engine(spec)

    runtime.engine_proc._load = load_in_engine_process
    return runtime_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
