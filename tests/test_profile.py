"""The step profile: real steps under the JAX profiler, every op's time put in a named part."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from runtime import profile
from runtime.sampling import SamplingParams


def test_ops_are_categorised_by_scope_and_collectives_by_opcode():
    mesh = jax.make_mesh((2,), ("data",))

    def f(x):
        with jax.named_scope("attention"):
            y = jnp.tanh(x @ x.T)
        z = jax.lax.psum(y, "data")
        with jax.named_scope("experts"):
            return jax.lax.fori_loop(0, 3, lambda i, a: a * 2.0, z)

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False))
    x = jax.device_put(jnp.ones((4, 8)), jax.NamedSharding(mesh, P("data")))
    cats = profile.op_categories(g.lower(x).compile().as_text())
    found = set(cats.values())
    assert {"attention", "collectives", "experts"} <= found
    assert None in found  # the loop is a container: only what it runs counts


def test_breakdown_sums_ops_per_step_and_device():
    modules = {"jit_a": {"dot.1": "projections", "while.2": None, "all-reduce.3": "collectives"}}
    ev = lambda op, dur, dev, run: {"dur": dur, "args": {"hlo_module": "jit_a", "hlo_op": op,  # noqa: E731
                                                        "device_ordinal": dev, "run_id": run}}
    events = [ev("dot.1", 1000, "0", "r1"), ev("dot.1", 3000, "1", "r1"), ev("while.2", 9000, "0", "r1"),
              ev("all-reduce.3", 2000, "0", "r2"), ev("all-reduce.3", 2000, "1", "r2")]
    r = profile.breakdown(events, modules, wall_seconds=0.010)
    assert r["steps"] == 2 == r["steps_traced"] and r["devices"] == 2
    assert r["ms_per_step"]["projections"] == 1.0  # (1 + 3) ms over 2 devices and 2 steps
    assert r["ms_per_step"]["collectives"] == 1.0
    assert np.isclose(r["ms_per_step"]["host"], 5.0 - 2.0)
    # A trace that kept only these 2 of a run's 4 steps: device times are theirs, host the rest.
    r = profile.breakdown(events, modules, wall_seconds=0.010, steps=4)
    assert r["steps"] == 4 and r["steps_traced"] == 2 and r["ms_per_step"]["projections"] == 1.0
    assert np.isclose(r["ms_per_step"]["host"], 2.5 - 2.0)


def test_a_profiled_generation_accounts_for_every_part(tiny_engine, tmp_path):
    prompts = [list(range(1, 40)), [5, 6, 7]]
    run = lambda: tiny_engine.generate(prompts, 4, "auto", SamplingParams(0.0, 0, 1.0, 0))  # noqa: E731
    (outputs, stats), summary = profile.profile_run(tiny_engine, tmp_path / "trace", run)
    assert summary["steps"] == stats["steps"] and summary["devices"] == 8
    assert summary["ops_without_category"] == 0
    per_step = summary["ms_per_step"]
    for part in ("attention", "experts", "projections", "sampling", "collectives", "other"):
        assert per_step[part] > 0, part
    assert (tmp_path / "trace" / "breakdown.json").exists()
    assert outputs == tiny_engine.generate(prompts, 4, "auto", SamplingParams(0.0, 0, 1.0, 0))[0]
