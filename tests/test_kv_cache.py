"""The 8-bit KV cache against a plain numpy reference of the same scheme, and against HF float32.

The reference quantizes with numpy (x / scale in float32, round half to even for int8, ml_dtypes'
rounding casts for fp8, saturation at the dtype's largest value), dequantizes (value * scale) and
runs the kernel package's float reference attention on the result: the backends, which quantize on
write and fold the scales into q and the output, must equal it to float rounding.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from accuracy import agreement, teacher_forced_logits
from driver import CacheShape, StepDriver
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
    ref_ragged_paged_attention,
)
from test_attention import HD, LAYERS, NKV, NQ, NUM_PAGES, PAGE, ragged_batch

from dp_attention import HFCheckpoint, MeshShape, load_hf_config
from dp_attention.attention import NativeAttentionBackend, PagedBatch
from dp_attention.calibration import kv_absmax
from dp_attention.kv_cache import KV_CACHE_DTYPES, QMAX, KvQuant, scales_from_absmax
from dp_attention.ragged import FlashAttentionBackend, ragged_paged_attention_reference

DTYPES = list(KV_CACHE_DTYPES.values())
NP_DTYPES = {"int8": np.int8, "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}


def np_quantize(x, scale, dtype):
    y = np.clip(np.asarray(x, np.float32) / np.float32(scale), -QMAX[dtype], QMAX[dtype])
    return (np.round(y) if dtype == "int8" else y).astype(NP_DTYPES[dtype])


def np_dequantize(q, scale):
    return q.astype(np.float32) * np.float32(scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_rounds_and_saturates_as_numpy_does(dtype):
    rng = np.random.default_rng(0)
    scale = np.float32(0.037)
    x = np.concatenate([rng.standard_normal(4096) * 3,  # some past the range: saturate
                        (np.arange(-40, 40) + 0.5) * scale,  # int8 ties
                        [0.0, -0.0, 1e-30, 1e6, -1e6]]).astype(np.float32)
    quant = KvQuant(dtype, (float(scale),), (float(scale),))
    ours = np.asarray(jax.jit(lambda x: quant.quantize(x, jnp.float32(scale)))(x))
    np.testing.assert_array_equal(ours.view(np.uint8), np_quantize(x, scale, dtype).view(np.uint8))


def _scenario(seed, dtype):
    """A ragged batch over a 2-layer 8-bit cache whose layers have different scales."""
    rng = np.random.default_rng(seed)
    batch, kv_lens = ragged_batch(rng, 16, 4, [5, 1, 7])
    quant = KvQuant(dtype, (0.02, 3.1 / QMAX[dtype]), (0.05, 2.2 / QMAX[dtype]))
    q = rng.standard_normal((16, NQ, HD)).astype(np.float32)
    k_new, v_new = (rng.standard_normal((16, NKV, HD)).astype(np.float32) for _ in range(2))
    old = rng.standard_normal((LAYERS, NUM_PAGES, PAGE, 2 * NKV, HD)).astype(np.float32)
    cache = np.empty(old.shape, NP_DTYPES[dtype])
    for layer in range(LAYERS):
        cache[layer, ..., 0::2, :] = np_quantize(old[layer, ..., 0::2, :], quant.k_scale[layer], dtype)
        cache[layer, ..., 1::2, :] = np_quantize(old[layer, ..., 1::2, :], quant.v_scale[layer], dtype)
    return batch, kv_lens, quant, q, k_new, v_new, cache


def _reference(batch, kv_lens, quant, q, k_new, v_new, cache, layer):
    """(the cache after numpy writes this step's K/V, the float attention over it dequantized)."""
    cache = cache.copy()
    pos, seq, valid = (np.asarray(a) for a in (batch.positions, batch.seq_index, batch.valid))
    table = np.asarray(batch.page_table)
    for t in np.flatnonzero(valid):
        page, off = table[seq[t], pos[t] // PAGE], pos[t] % PAGE
        cache[layer, page, off, 0::2] = np_quantize(k_new[t], quant.k_scale[layer], quant.dtype)
        cache[layer, page, off, 1::2] = np_quantize(v_new[t], quant.v_scale[layer], quant.dtype)
    floats = np.empty(cache.shape[1:], np.float32)
    floats[..., 0::2, :] = np_dequantize(cache[layer, ..., 0::2, :], quant.k_scale[layer])
    floats[..., 1::2, :] = np_dequantize(cache[layer, ..., 1::2, :], quant.v_scale[layer])
    counts = np.bincount(seq[valid], minlength=len(kv_lens))[:len(kv_lens)]
    cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    n = len(kv_lens)
    out = ref_ragged_paged_attention(jnp.asarray(q), jnp.asarray(floats), jnp.asarray(kv_lens, jnp.int32),
                                     batch.page_table[:n], jnp.asarray(cu), jnp.asarray([n], jnp.int32),
                                     sm_scale=HD ** -0.5)
    return cache, np.asarray(out)[:cu[-1]]


def _backends(quant, batch):
    counts = np.bincount(np.asarray(batch.seq_index)[np.asarray(batch.valid)], minlength=4)
    last = np.maximum(np.cumsum(counts) - 1, 0).astype(np.int32)
    fa = FlashAttentionBackend(ragged_paged_attention_reference, jnp.asarray(last), (2, 8), quant)
    return {"native": NativeAttentionBackend(block_tokens=2 * PAGE, quant=quant), "fa": fa}


@pytest.mark.parametrize("backend", ["native", "fa"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backends_equal_the_numpy_reference(dtype, backend):
    """Written bytes identical to numpy's (the reserved page aside); outputs equal to float attention
    over numpy's dequantized cache, on the layer whose scales are not the first layer's."""
    batch, kv_lens, quant, q, k_new, v_new, cache = _scenario(1, dtype)
    want_cache, want_out = _reference(batch, kv_lens, quant, q, k_new, v_new, cache, layer=1)
    b = _backends(quant, batch)[backend]
    attend = jax.jit(lambda q, k, v, kv, fields: b.attend(q, k, v, kv, 1, PagedBatch(*fields)))
    out, got_cache = attend(q, k_new, v_new, jnp.asarray(cache), (batch.positions, batch.seq_index, batch.valid,
                                                                 batch.page_table))
    got_cache = np.asarray(got_cache)[:, 1:]  # page 0 takes the padding rows' writes: not compared
    np.testing.assert_array_equal(got_cache.view(np.uint8), want_cache[:, 1:].view(np.uint8))
    real = len(want_out)
    np.testing.assert_allclose(np.asarray(out)[:real], want_out, atol=2e-5, rtol=1e-5)


def test_a_step_for_an_8bit_cache_refuses_a_float_cache(golden_dir):
    quant = KvQuant("int8", (0.1,) * 3, (0.1,) * 3)
    driver = StepDriver(str(golden_dir / "hf-tiny-b"), MeshShape(1, 1), kv_quant=quant)
    driver.cache = driver.cache.astype(jnp.float32)
    with pytest.raises(ValueError, match="KV cache of dtype float32 but the step was built for int8"):
        driver.generate([[[1, 2, 3]]], new_tokens=1)


# ------------------------------------------------------------------------------- against HF float32

# Mean |logprob error| of HF's chosen token, teacher-forced over every golden position, with scales
# calibrated per layer on the build's calibration prompts. Measured: hf-tiny-a int8 7.6e-3, fp8_e4m3
# 1.6e-2, fp8_e5m2 3.5e-2; hf-tiny-b int8 6.1e-3, fp8_e4m3 9.5e-3, fp8_e5m2 2.0e-2. Bounds ~1.3x that.
LOGPROB_ERROR_BOUND = {
    ("hf-tiny-a", "int8"): 1.0e-2, ("hf-tiny-a", "fp8_e4m3"): 2.1e-2, ("hf-tiny-a", "fp8_e5m2"): 4.5e-2,
    ("hf-tiny-b", "int8"): 8.0e-3, ("hf-tiny-b", "fp8_e4m3"): 1.25e-2, ("hf-tiny-b", "fp8_e5m2"): 2.6e-2,
}


@pytest.fixture(scope="module")
def calibrated(golden_dir):
    """Each golden checkpoint's per-layer K and V absmax over the build's calibration prompts."""
    out = {}
    for name in ("hf-tiny-a", "hf-tiny-b"):
        path = golden_dir / name
        out[name] = kv_absmax(load_hf_config(path), HFCheckpoint(path).read, "float32")
    return out


@pytest.mark.parametrize("scheme", list(KV_CACHE_DTYPES))
@pytest.mark.parametrize("name", ["hf-tiny-a", "hf-tiny-b"])
def test_quantized_cache_agrees_with_hf_float32(golden_dir, calibrated, name, scheme):
    golden = json.loads((golden_dir / name / "golden.json").read_text())
    quant = scales_from_absmax(KV_CACHE_DTYPES[scheme], *calibrated[name])
    driver = StepDriver(str(golden_dir / name), MeshShape(1, 1), cache=CacheShape(40, 8, 8), kv_quant=quant)
    result = agreement(golden, teacher_forced_logits(driver, golden))
    assert result.positions > 50
    assert result.disagreements == [], f"{name} {scheme}: top-1 differs from HF where HF is sure"
    bound = LOGPROB_ERROR_BOUND[(name, scheme)]
    assert result.mean_abs_logprob_error <= bound, (
        f"{name} {scheme}: mean |logprob error| {result.mean_abs_logprob_error:.2e} grew past its bound {bound:.1e}")
