"""The fa backend: the kernel's metadata from our batches, its reference semantics, and TPU exports.

The Pallas kernel cannot run on CPU, so its behaviour here is the jittable reference
(`ragged_paged_attention_reference`), checked against the kernel package's own (unjittable) reference
on random ragged batches, then run as the fa backend through the whole step against HF and native.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

from dp_attention import DpPaddingMode, MeshShape
from dp_attention.ragged import ragged_paged_attention_reference
from driver import StepDriver
from runtime import format as fmt
from runtime.batching import Chunk

from test_export import ROOT, run_cli

FA = dict(attention="fa", fa_kernel=ragged_paged_attention_reference)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_has_the_kernels_semantics(seed):
    rng = np.random.default_rng(seed)
    T, nq, nkv, hd, P, page, pages_per_seq, S = 32, 4, 2, 16, 24, 4, 6, 6
    q_lens = rng.integers(1, 6, 4)
    kv_lens = q_lens + rng.integers(0, pages_per_seq * page - 6, 4)
    cu = np.concatenate([[0], np.cumsum(q_lens), np.full(S - 4, q_lens.sum())]).astype(np.int32)
    args = (rng.standard_normal((T, nq, hd)).astype(np.float32),
            rng.standard_normal((P, page, 2 * nkv, hd)).astype(np.float32),
            np.concatenate([kv_lens, np.zeros(S - 4)]).astype(np.int32),
            rng.integers(1, P, (S, pages_per_seq)).astype(np.int32), cu, np.array([4], np.int32))
    ours = jax.jit(ragged_paged_attention_reference, static_argnames="sm_scale")(*args, sm_scale=0.3)
    theirs = ref_ragged_paged_attention(*map(jnp.asarray, args), sm_scale=0.3)
    np.testing.assert_allclose(np.asarray(ours)[:cu[4]], np.asarray(theirs), atol=1e-5, rtol=0)
    assert not np.asarray(ours)[cu[4]:].any()  # tokens of no sequence: zero


@pytest.mark.parametrize("name", ["hf-tiny-a", "hf-tiny-b"])
def test_fa_backend_matches_hf(golden_dir, name):
    golden = json.loads((golden_dir / name / "golden.json").read_text())
    prompts = golden["prompts"]
    driver = StepDriver(str(golden_dir / name), MeshShape(2, 4), **FA)
    first, out = driver.generate([prompts[:2], prompts[2:]], new_tokens=8)
    for i, logits in enumerate(l for g in first for l in g):
        np.testing.assert_allclose(logits, golden["last_logits"][i], atol=1e-4, rtol=0)
    assert [t for g in out for t in g] == [t[:8] for t in golden["greedy"]]


def test_fa_equals_native_on_ragged_chunked_batches(golden_dir):
    """Idle groups, several sequences per group, chunked prefill resuming mid-page, page boundaries,
    both padding modes: fa and native give the same logits."""
    prompts = json.loads((golden_dir / "hf-tiny-a" / "golden.json").read_text())["prompts"]
    drivers = [StepDriver(str(golden_dir / "hf-tiny-a"), MeshShape(4, 2), **opts) for opts in ({}, FA)]
    results = []
    for d in drivers:
        pages = [d.alloc(2, 6), d.alloc(2, 6), d.alloc(0, 6)]
        steps = [  # (group, prompt, start, end) chunks per step
            [(2, 3, 0, 13), (2, 1, 0, 5), (0, 2, 0, 8)],
            [(2, 3, 13, 29), (0, 2, 8, 17)],  # resumes mid-page (page size 8)
            [(2, 3, 29, 40)],
        ]
        out = []
        for k, chunks in enumerate(steps):
            groups = [[] for _ in range(4)]
            for g, p, a, b in chunks:
                groups[g].append(Chunk(tuple(prompts[p][a:b]), a, pages[{3: 0, 1: 1, 2: 2}[p]]))
            mode = (DpPaddingMode.MAX_LEN, DpPaddingMode.SUM_LEN)[k % 2]
            out.append(np.array([l for g in d.step(groups, mode, tokens=32, seqs=2) for l in g]))
        results.append(out)
    for native, fa in zip(*results):
        np.testing.assert_allclose(fa, native, atol=2e-5, rtol=0)


def test_tpu_export_holds_the_kernel(tmp_path, golden_dir):
    """A golden config for --platform tpu: fa by default, the Pallas kernel in every export, lowered
    for the named TPU generation from this CPU machine; the round trip of each file."""
    buckets = tmp_path / "b.json"
    buckets.write_text(json.dumps({"tokens": [8, 32], "max_seqs": 4}))
    out = tmp_path / "tpu"
    r = run_cli("export", "build", "--model", str(golden_dir / "hf-tiny-b"), "--platform", "tpu", "--mesh", "2x4",
                "--tpu-generation", "v6e", "--padding-modes", "max_len", "--buckets", str(buckets), "--out", str(out),
                "--quiet")
    assert r.returncode == 0, r.stderr
    m = fmt.read_manifest(out)
    assert m.attention == "fa" and m.tpu_device_kind == "TPU v6 lite"
    assert m.meshes[0].cache_shape[-1] == 128  # head_dim 32 padded to the kernel's lanes
    for e in m.executables:
        exported = jax.export.deserialize(bytearray((out / e.file).read_bytes()))
        assert exported.platforms == ("tpu",)
        assert "tpu_custom_call" in exported.mlir_module()
    r = run_cli("export", "build", "--model", str(golden_dir / "hf-tiny-b"), "--platform", "cpu,tpu",
                "--attention", "fa", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--attention fa is the Pallas TPU kernel" in r.stderr
