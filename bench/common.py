"""Shared pieces: the default artifact, a seeded request trace, results files, and the jit baseline."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ARTIFACT = ROOT / "artifacts" / "qwen3-moe-tiny"


def ensure_artifact() -> Path:
    """The README's default build (a no-op when it is already there and current)."""
    subprocess.run([sys.executable, "-m", "export", "build", "--mesh", "2x4", "--quiet"], cwd=ROOT, check=True)
    return ARTIFACT


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "machine": f"{platform.machine()}, {os.cpu_count()} cores, 8 virtual CPU devices",
            "when": time.strftime("%Y-%m-%d %H:%M:%S"), **data}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def make_trace(n: int = 48, seed: int = 0, vocab: int = 500, max_context: int = 256) -> dict:
    """A fixed, long-tailed workload: log-normal prompt and output lengths, Poisson arrivals (in steps)."""
    rng = np.random.default_rng(seed)
    prompt_len = np.clip(rng.lognormal(np.log(12), 1.0, n).astype(int), 1, 180)
    output_len = np.clip(rng.lognormal(np.log(8), 0.8, n).astype(int), 1, 64)
    output_len = np.minimum(output_len, max_context - prompt_len)
    arrivals = np.cumsum(rng.exponential(1.5, n)).astype(int)
    return {"prompts": [rng.integers(0, vocab, int(k)).tolist() for k in prompt_len],
            "max_new_tokens": [int(k) for k in output_len], "arrivals": [int(a) for a in arrivals]}


def median_ms(samples) -> float:
    return float(np.median(samples) * 1e3)


class JitExecutor:
    """The alternative a user would otherwise pick: the model's step jitted in this process.

    `warm=True` compiles the artifact's buckets at startup, several at a time as the runtime's
    loader does (what serving engines do today); `warm=False` offers every exact shape and
    compiles each on first use (jit on demand).
    Weights are read from the same artifact files the runtime reads, so both pay the same I/O.
    """

    def __init__(self, artifact: Path, warm: bool, max_tokens: int = 64, max_seqs: int = 8, jobs: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        from dp_attention import CacheShape, MeshShape, make_mesh, weight_specs
        from dp_attention.model import jit_wire_step
        from dp_attention.config import ModelConfig
        from runtime import engine as rt
        from runtime import format as fmt
        from runtime.buckets import MAX_LEN, Bucket

        manifest = fmt.read_manifest(artifact)
        entry = manifest.meshes[0]
        shape = MeshShape(*entry.shape)
        self._engine = rt.Engine(artifact, manifest, entry, make_mesh(shape))
        self._engine.load_weights()
        self._engine.reset_cache()
        self.cfg = ModelConfig.from_json(manifest.model.to_json())
        self.dp, self.vocab_size = shape.dp, self.cfg.vocab_size
        self.page_size, self.num_pages = self._engine.page_size, self._engine.num_pages
        self.pages_per_seq = self._engine.pages_per_seq
        specs = weight_specs(self.cfg, shape)
        c = manifest.cache
        cache, carry = CacheShape(c.num_pages, c.page_size, c.pages_per_seq), self._engine.carry.shape[1]
        # The same packed inputs the artifact's executables take, so both sides pay the same transfers,
        # and the same attention and expert kernels (an int8 stack takes the XLA loop either way).
        kernels = {"attention": manifest.attention, "experts": "cpu" if manifest.attention == "cpu" else "tiles"}
        if manifest.attention == "cpu":
            from runtime import cpu_kernel

            cpu_kernel.register()
        self._jit = lambda b: jit_wire_step(self.cfg, b, self._engine.mesh, specs, cache, carry, **kernels)
        if warm:
            self.buckets = list(self._engine.buckets)
            warm_one = lambda b: self._jit(b).lower(*self._engine.abstract_args(b)).compile()  # noqa: E731
            with ThreadPoolExecutor(jobs) as pool:  # trace + compile every bucket now, as a warm-up would
                for bucket, compiled in zip(self.buckets, pool.map(warm_one, self.buckets)):
                    self._engine.install(bucket, compiled)
        else:
            self.buckets = [Bucket(MAX_LEN, t, s, shape.dp * t) for t in range(1, max_tokens + 1)
                            for s in range(1, min(t, max_seqs) + 1)]

    @property
    def compiles(self) -> int:
        """Compilations during serving (on demand: one per new shape)."""
        return self._engine.compiles_after_load

    def run(self, bucket, batch):
        try:
            self._engine.executable(bucket)
        except KeyError:
            self._engine.install(bucket, self._jit(bucket))  # compiles on its first call
        return self._engine.run(bucket, batch)
