"""The C++ CPU kernels against the XLA code they replace, one layer at a time, in one process.

    python -m bench.cpu_kernels [--rounds 4] [--repeats 40]

Shapes are the peer checkpoint's (bench/peer_checkpoint.py: 4 heads, 2 KV heads, head_dim 64,
16 experts of 256 x 128, pages of 8 tokens, a 1,651-page cache over 4 layers): attention of a
decode step (64 sequences, contexts 80-320), a prefill step (4 chunks of 128) and a mixed one
(2 chunks of 128 beside 62 decoders), the new K/V written as in a step (the cache donated); the
experts of a decode step (64 tokens) and of a 1,024-token prefill step. Each case runs the XLA
version (`NativeAttentionBackend()`, `experts_by_expert`) and the kernel's alternately, rounds x
repeats each, best time of each; prints both, the ratio kernel / XLA and the largest difference
of their outputs. One process with one device: what `runtime` gives a 1x1 mesh.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

LAYERS, PAGES, PAGE, KV_HEADS, HEAD_DIM, HEADS, PAGES_PER_SEQ = 4, 1651, 8, 2, 64, 4, 64
EXPERTS, HIDDEN, WIDTH = 16, 256, 128


def _best(call, names, rounds: int, repeats: int) -> dict:
    """Best seconds of call(name) (which returns an array) per name, the names alternating."""
    best = {name: float("inf") for name in names}
    for _ in range(rounds):
        for name in names:
            for _ in range(repeats):
                t = time.perf_counter()
                call(name).block_until_ready()
                best[name] = min(best[name], time.perf_counter() - t)
    return best


def attention_cases(rng):
    import jax.numpy as jnp
    import numpy as np

    from dp_attention.attention import PagedBatch

    def batch(contexts, chunks):
        free = iter(rng.permutation(np.arange(1, PAGES)))
        table = np.zeros((len(contexts), PAGES_PER_SEQ), np.int32)
        positions, seqs = [], []
        for s, (c, n) in enumerate(zip(contexts, chunks)):
            table[s, :-(-c // PAGE)] = [next(free) for _ in range(-(-c // PAGE))]
            positions += range(c - n, c)
            seqs += [s] * n
        return PagedBatch(jnp.asarray(positions, jnp.int32), jnp.asarray(seqs, jnp.int32),
                          jnp.ones(len(positions), bool), jnp.asarray(table))

    return {"attention, decode: 64 sequences": batch(list(rng.integers(80, 320, 64)), [1] * 64),
            "attention, prefill: 4 chunks of 128": batch([128, 256, 200, 150], [128] * 4),
            "attention, mixed: 2 chunks + 62 decoders": batch([200, 180] + list(rng.integers(80, 190, 62)),
                                                             [128, 128] + [1] * 62)}


def bench_attention(rng, rounds, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dp_attention.attention import NativeAttentionBackend, PagedBatch

    backends = {"xla": NativeAttentionBackend(), "kernel": NativeAttentionBackend(kernel=True)}
    fns = {name: jax.jit(lambda q, k, v, kv, p, s, ok, table, b=b: b.attend(q, k, v, kv, 2, PagedBatch(p, s, ok, table)),
                         donate_argnums=3) for name, b in backends.items()}
    for case, batch in attention_cases(rng).items():
        T = batch.positions.shape[0]
        q = jnp.asarray(rng.standard_normal((T, HEADS, HEAD_DIM)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((T, KV_HEADS, HEAD_DIM)), jnp.float32) for _ in range(2))
        start = rng.standard_normal((LAYERS, PAGES, PAGE, 2 * KV_HEADS, HEAD_DIM)).astype(np.float32)
        cache = {name: jnp.asarray(start) for name in fns}  # one cache each, alike: donated and returned

        def call(name):
            out, cache[name] = fns[name](q, k, v, cache[name], batch.positions, batch.seq_index, batch.valid,
                                         batch.page_table)
            return out

        outs = {name: np.asarray(call(name)) for name in fns}
        diff = float(np.max(np.abs(outs["xla"] - outs["kernel"])))
        yield case, _best(call, fns, rounds, repeats), diff


def bench_experts(rng, rounds, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dp_attention.model import MoeWeights, RoutedPairs, experts_by_expert, experts_cpu_kernel

    def w(*shape):
        return jnp.asarray(rng.standard_normal(shape) * 0.05, jnp.float32)

    stack = MoeWeights(w(LAYERS, HIDDEN, EXPERTS), w(LAYERS, EXPERTS, HIDDEN, WIDTH), w(LAYERS, EXPERTS, HIDDEN, WIDTH),
                       w(LAYERS, EXPERTS, WIDTH, HIDDEN))
    fns = {"xla": jax.jit(lambda s, x, p: experts_by_expert(s, 2, x, p)),
           "kernel": jax.jit(lambda s, x, p: experts_cpu_kernel(s, 2, x, p))}
    for tokens, label in ((64, "decode: 64 tokens"), (1024, "prefill: 1,024 tokens")):
        pairs = tokens * 4
        expert = rng.integers(0, EXPERTS, pairs)
        order = np.argsort(expert, kind="stable")
        routed = RoutedPairs(jnp.asarray((np.arange(pairs) // 4)[order], jnp.int32),
                             jnp.asarray(rng.random(pairs)[order], jnp.float32),
                             jnp.asarray(np.bincount(expert, minlength=EXPERTS), jnp.int32))
        x = w(tokens, HIDDEN) * 20

        def call(name, x=x, routed=routed):
            return fns[name](stack, x, routed)

        outs = {name: np.asarray(call(name)) for name in fns}
        diff = float(np.max(np.abs(outs["xla"] - outs["kernel"])))
        yield f"experts, {label}", _best(call, fns, rounds, repeats), diff


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="alternations of the two versions (default 4)")
    p.add_argument("--repeats", type=int, default=40, help="calls per version per round (default 40)")
    args = p.parse_args(argv)
    import numpy as np

    from runtime import cpu_kernel

    cpu_kernel.register()
    rng = np.random.default_rng(0)
    print(f"{'one layer':44s} {'XLA':>9s} {'kernel':>9s} {'kernel/XLA':>10s} {'max |diff|':>10s}")
    for group in (bench_attention, bench_experts):
        for case, best, diff in group(rng, args.rounds, args.repeats):
            print(f"{case:44s} {best['xla'] * 1e3:7.3f} ms {best['kernel'] * 1e3:6.3f} ms "
                  f"{best['kernel'] / best['xla']:10.2f} {diff:10.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
