"""2. Dispatch overhead: the runtime's step against a raw `Compiled` call on pre-padded device inputs.

raw      the ready executable called on device-resident, already padded inputs (the floor)
runtime  Engine.run: numpy batch -> device, call, logits -> numpy (what the scheduler calls)
serving  a whole scheduler step during decode (admit, plan, choose bucket, pack, run, unpad; or a
         steady step repeated on the device with nothing planned or sent), against
         the raw calls of the very batches that run made (recorded, placed on the device before
         timing, replayed in order): the same device work with no host work at all. Pipelined (the
         default: step n+1 is launched before step n's tokens are read, which it takes on the
         device) and synchronous.
Medians over many steps, for a decode bucket and a prefill bucket; serving rows in interleaved blocks.
"""

import argparse
import time

import numpy as np

from bench.common import ARTIFACT, ensure_artifact, median_ms, write_result
import jax  # noqa: E402  (after bench.common, which sets the device count)
from export.probes import make_probe
from runtime.buckets import MAX_LEN, SUM_LEN
from runtime.engine import load


def time_raw(engine, bucket, batch, n):
    args = engine.put_batch(batch) | {"prev_tokens": engine.carry}  # the engine's token carry, as dispatch passes it
    compiled, samples = engine.executable(bucket), []
    for _ in range(n):
        t0 = time.perf_counter()
        out, engine.stream.cache = compiled(engine.weights, engine.stream.cache, args)
        jax.block_until_ready(out)
        samples.append(time.perf_counter() - t0)
    return samples


def time_runtime(engine, bucket, batch, n):
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.run(bucket, batch)
        samples.append(time.perf_counter() - t0)
    return samples


def time_serving(engine, n, pipeline=True, record=None):
    """Per-step time of a decode-only run: 8 one-token prompts, n new tokens each. `record`: a
    list that gets every step's (bucket, batch)."""
    from runtime.scheduler import generate

    prompts = [[i + 1] for i in range(8)]
    dispatch, again = engine.dispatch, engine.dispatch_again
    repeated = []

    def record_again(bucket):  # a repeated step's batch: the last one, every real token one position on
        out = again(bucket)
        if out is not None:
            batch = dict(record[-1][1])
            batch["positions"] = batch["positions"] + (np.arange(bucket.tokens) < batch["num_tokens"][:, None])
            record.append((bucket, batch))
            repeated.append(len(record) - 1)
        return out

    if record is not None:
        engine.dispatch = lambda bucket, batch: (record.append((bucket, dict(batch))), dispatch(bucket, batch))[1]
        engine.dispatch_again = record_again
    try:
        engine.reset_cache()
        t0 = time.perf_counter()
        _, stats = generate(engine, prompts, n, pipeline=pipeline)
        seconds = (time.perf_counter() - t0) / stats["steps"]
        if record is not None:
            assert len(record) == stats["steps"], "a launched step was not recorded"
            stats["repeated_steps"] = len(repeated)
        return seconds, stats
    finally:
        engine.dispatch, engine.dispatch_again = dispatch, again


def time_replay(engine, steps):
    """Per-step time of the raw executables on recorded steps' batches, already on the device."""
    placed = [(engine.executable(bucket), engine.put_batch(batch) | {"prev_tokens": engine.carry})
              for bucket, batch in steps]
    jax.block_until_ready([args for _, args in placed])
    t0 = time.perf_counter()
    for compiled, args in placed:
        out, engine.stream.cache = compiled(engine.weights, engine.stream.cache, args)
        jax.block_until_ready(out)
    return (time.perf_counter() - t0) / len(placed)

def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="raw and runtime calls per bucket")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per serving run (its steps)")
    parser.add_argument("--blocks", type=int, default=9, help="interleaved serving blocks (the median is kept)")
    args = parser.parse_args()
    ensure_artifact()
    engine = load(ARTIFACT)
    m = engine.manifest.cache
    results = {}
    smallest = min((b for b in engine.buckets if b.mode == SUM_LEN), key=lambda b: b.tokens)
    prefill = [b for b in engine.buckets if b.mode == MAX_LEN and b.tokens <= 64]
    for label, bucket in (("decode", smallest), ("prefill", max(prefill, key=lambda b: b.tokens))):
        _, batch = make_probe(bucket, engine.dp, engine.vocab_size, m.page_size, m.pages_per_seq)
        for fn in (time_raw, time_runtime):  # warm both paths
            fn(engine, bucket, batch, 10)
        raw, rt = [], []
        for _ in range(3):  # interleave blocks so both see the same machine
            raw += time_raw(engine, bucket, batch, args.steps // 3)
            rt += time_runtime(engine, bucket, batch, args.steps // 3)
        results[label] = {"bucket": bucket.name, "raw_ms": median_ms(raw), "runtime_ms": median_ms(rt),
                          "ratio": median_ms(rt) / median_ms(raw)}
        print(f"{label:8s} {bucket.name:22s} raw {results[label]['raw_ms']:7.3f} ms   runtime "
              f"{results[label]['runtime_ms']:7.3f} ms   ratio {results[label]['ratio']:.3f}")
    # A whole scheduler step while decoding, pipelined and synchronous, against the raw calls of
    # the same run's batches, in interleaved blocks.
    steps = []
    _, stats = time_serving(engine, args.new_tokens, record=steps)
    print(f"serving  {stats['repeated_steps']} of {stats['steps']} steps repeated on the device, "
          f"with nothing planned, packed or sent")
    time_replay(engine, steps)  # warm
    raw, serving = [], {"pipelined": [], "synchronous": []}
    for _ in range(args.blocks):
        raw.append(time_replay(engine, steps))
        serving["pipelined"].append(time_serving(engine, args.new_tokens)[0])
        serving["synchronous"].append(time_serving(engine, args.new_tokens, pipeline=False)[0])
    raw_ms = median_ms(raw)
    used = sorted({bucket.name for bucket, _ in steps})
    before = dict(engine.transfers)
    _, run = time_serving(engine, args.new_tokens)
    sent = {k: (v - before.get(k, 0)) / run["steps"] for k, v in engine.transfers.items()}
    results["serving"] = {"buckets": used, "raw_ms": raw_ms, "inputs_sent_per_step": sent,
                          "repeated_steps": stats["repeated_steps"] / len(steps)}
    print(f"serving  inputs sent from the host per pipelined step: "
          f"{', '.join(f'{k} {v:.2f}' for k, v in sent.items())}")
    for name, per_step in serving.items():
        ms = median_ms(per_step)
        results["serving"] |= {f"{name}_ms": ms, f"{name}_vs_raw": ms / raw_ms}
        print(f"serving  decode step {name:11s} {ms:7.3f} ms = {ms / raw_ms:.3f} x raw calls of the same batches "
              f"({raw_ms:.3f} ms, {', '.join(used)})")
    results["compiles_after_load"] = engine.compiles_after_load
    print(f"compiles after load {engine.compiles_after_load}")
    write_result("dispatch", results)


if __name__ == "__main__":
    main()
