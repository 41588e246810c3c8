"""export.hlo_cost against analytic FLOPs of real compiled JAX functions.

XLA's own cost_analysis counts a while body once; these tests pin that our
counter multiplies loop bodies by their trip count, takes the worst branch of a
conditional, and gets dot/convolution FLOPs right from the optimized HLO text.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from export.hlo_cost import matmul_flops, matmul_flops_report

M, K, N = 64, 96, 128  # distinct sizes so a wrong contracting dim shows up


def _hlo(f, *args):
    return jax.jit(f).lower(*args).compile().as_text()


def _close(got, want):
    assert got == pytest.approx(want, rel=0.01), (got, want)


def test_plain_matmul():
    x, w = jnp.ones((M, K), jnp.float32), jnp.ones((K, N), jnp.float32)
    text = _hlo(lambda x, w: x @ w, x, w)
    _close(matmul_flops(text), 2 * M * K * N)
    assert matmul_flops_report(text)["while_loops"] == []


def test_fori_loop_counts_every_trip():
    x, w = jnp.ones((M, K), jnp.float32), jnp.ones((K, K), jnp.float32)

    def f(x, w):
        return lax.fori_loop(0, 16, lambda i, h: jnp.tanh(h @ w), x)

    report = matmul_flops_report(_hlo(f, x, w))
    _close(report["flops"], 16 * 2 * M * K * K)
    assert [loop["trip_count"] for loop in report["while_loops"]] == [16]
    assert report["unknown_trip_counts"] == 0


def test_scan_over_stacked_weights():
    layers = 48
    x = jnp.ones((M, K), jnp.float32)
    w_up = jnp.ones((layers, K, N), jnp.float32)
    w_down = jnp.ones((layers, N, K), jnp.float32)

    def f(x, w_up, w_down):
        def layer(h, ws):
            up, down = ws
            return jnp.tanh(h @ up) @ down, None

        return lax.scan(layer, x, (w_up, w_down))[0]

    report = matmul_flops_report(_hlo(f, x, w_up, w_down))
    _close(report["flops"], layers * 2 * (2 * M * K * N))
    assert [loop["trip_count"] for loop in report["while_loops"]] == [layers]


def test_nested_loops_multiply():
    outer, inner = 4, 8
    x = jnp.ones((M, K), jnp.float32)
    ws = jnp.ones((inner, K, K), jnp.float32)

    def f(x, ws):
        def step(h, w):
            return jnp.tanh(h @ w), None

        return lax.fori_loop(0, outer, lambda i, h: lax.scan(step, h, ws)[0], x)

    report = matmul_flops_report(_hlo(f, x, ws))
    _close(report["flops"], outer * inner * 2 * M * K * K)
    assert sorted(loop["trip_count"] for loop in report["while_loops"]) == [outer, inner]


def test_cond_takes_expensive_branch():
    x, w = jnp.ones((M, K), jnp.float32), jnp.ones((K, K), jnp.float32)

    def f(p, x, w):
        return lax.cond(p, lambda x: (x @ w) @ w, lambda x: x + 1.0, x)

    _close(matmul_flops(_hlo(f, True, x, w)), 2 * (2 * M * K * K))


def test_batched_einsum():
    b, i, j, k = 4, 32, 48, 16
    a, c = jnp.ones((b, i, j), jnp.float32), jnp.ones((b, j, k), jnp.float32)
    text = _hlo(lambda a, c: jnp.einsum("bij,bjk->bik", a, c), a, c)
    _close(matmul_flops(text), 2 * b * i * j * k)


def test_convolution():
    n, h, w, cin, cout, kh, kw = 2, 12, 10, 3, 8, 3, 3
    x = jnp.ones((n, cin, h, w), jnp.float32)
    kernel = jnp.ones((cout, cin, kh, kw), jnp.float32)
    text = _hlo(lambda x, k: lax.conv(x, k, (1, 1), "VALID"), x, kernel)
    out_elems = n * cout * (h - kh + 1) * (w - kw + 1)
    _close(matmul_flops(text), 2 * out_elems * cin * kh * kw)


def test_unknown_trip_count_counted_once():
    x, w = jnp.ones((M, K), jnp.float32), jnp.ones((K, K), jnp.float32)

    def f(x, w):
        def cond(s):  # data-dependent: XLA cannot know the trip count
            return jnp.sum(s[1]) < 1e6

        def body(s):
            return s[0] + 1, jnp.tanh(s[1] @ w)

        return lax.while_loop(cond, body, (0, x))[1]

    report = matmul_flops_report(_hlo(f, x, w))
    _close(report["flops"], 2 * M * K * K)
    assert report["unknown_trip_counts"] == 1
    assert report["while_loops"][0]["trip_count"] is None


def test_xla_cost_analysis_undercounts_loops():
    """Why this module exists: XLA reports one trip of the loop body."""
    x, w = jnp.ones((M, K), jnp.float32), jnp.ones((K, K), jnp.float32)
    compiled = jax.jit(lambda x, w: lax.fori_loop(0, 16, lambda i, h: h @ w, x)).lower(x, w).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    ours = matmul_flops(compiled.as_text())
    _close(ours, 16 * 2 * M * K * K)
    assert analysis["flops"] < ours / 4
