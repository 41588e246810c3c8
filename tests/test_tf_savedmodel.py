"""`python -m export build --mesh 1x1 --tf-savedmodel`: a TF SavedModel that computes what the runtime does."""

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_artifact
from dp_attention import MeshShape
from export.probes import make_probe
from export.tf_savedmodel import BATCH_INPUTS, CACHE_INPUT, OUTPUTS, read_warmup
from runtime import format as fmt
from runtime.batching import Chunk, pack
from runtime.engine import load
from runtime.verify import OUTPUT_NAMES, compare_outputs, tolerance

tf = pytest.importorskip("tensorflow")
from safetensors.numpy import load_file  # noqa: E402
from tensorflow.core.framework.tensor_pb2 import TensorProto  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    # A small cache keeps the cache tensor that travels through TF small.
    return build_artifact(tmp_path_factory.mktemp("tfsm") / "qwen3-moe-tiny", ladder=(4, 16),
                          meshes=(MeshShape(1, 1),), tf_savedmodel=True, pages_per_group=24, max_context=64)


@pytest.fixture(scope="module")
def saved(artifact):
    return tf.saved_model.load(str(artifact / fmt.read_manifest(artifact).tf_savedmodel.dir))


def _weight(artifact, w):
    """One weight whole (1x1 mesh): a stacked weight's per-layer files stacked again."""
    tensors = [load_file(artifact / rel)["tensor"] for rel in w.files]
    return np.stack(tensors) if w.stacked else tensors[0]


def _call(sig, batch, kv):
    out = sig(**{k: tf.constant(np.asarray(batch[k])) for k in BATCH_INPUTS}, kv=tf.constant(kv))
    return {k: v.numpy() for k, v in out.items()}


def _expected(probe):
    return {k: probe[f"expected_{k}"] for k in OUTPUT_NAMES}


def _agree(got, want, num_seqs, batch, tol, what):
    worst, why = compare_outputs(got, want, num_seqs, np.asarray(batch["temperature"]) == 0, tol)
    assert not why, f"{what}: {why}"
    return worst


def _decode_step(groups, tokens, page_size):
    """Each probe sequence's next token (the one the step sampled), one decode chunk per sequence with
    the same sampling (pages grown as needed)."""
    next_page = 1 + max((p for c in groups[0] for p in c.pages), default=0)
    chunks = []
    for j, c in enumerate(groups[0]):
        n = len(c.tokens)
        pages = c.pages
        if n % page_size == 0:
            pages, next_page = pages + (next_page,), next_page + 1
        chunks.append(Chunk((int(tokens[0, j]),), n, pages, c.temperature, c.top_k, c.top_p, c.seed))
    return chunks


def test_manifest_lists_savedmodel_with_checksums(artifact):
    m = fmt.read_manifest(artifact)
    entry = m.tf_savedmodel
    names = sorted(e.bucket.name for e in m.executables)
    assert entry.dir == "tf_savedmodel" and sorted(entry.signatures) == names
    assert entry.inputs == BATCH_INPUTS + (CACHE_INPUT,) and entry.outputs == OUTPUTS
    assert entry.cache_shape == m.meshes[0].cache_shape
    assert set(entry.probe_max_error) == set(names)
    files = sorted(f.relative_to(artifact).as_posix() for f in (artifact / "tf_savedmodel").rglob("*") if f.is_file())
    assert "tf_savedmodel/saved_model.pb" in files and "tf_savedmodel/assets.extra/tf_serving_warmup_requests" in files
    assert all(f in m.files for f in files)
    fmt.verify_all(artifact, m)


def test_every_signature_matches_runtime(artifact, saved):
    engine = load(artifact)
    m = engine.manifest
    entry = m.tf_savedmodel
    tol = tolerance(m.dtype)
    cache_dtype = np.dtype(jnp.dtype(m.dtype))
    assert set(saved.signatures) == {b.name for b in engine.buckets}
    weights = {name: _weight(artifact, w) for name, w in engine.mesh_entry.weights.items()}
    c = m.cache
    for bucket in engine.buckets:
        sig = saved.signatures[bucket.name]
        e = engine.entries[bucket]
        # the inputs are the executable's batch (each with its dtype) and the cache
        inputs = sig.structured_input_signature[1]
        assert set(inputs) == set(BATCH_INPUTS) | {CACHE_INPUT}
        for k in BATCH_INPUTS:
            assert tuple(inputs[k].shape.as_list()) == e.batch_shapes[k]
            assert inputs[k].dtype.as_numpy_dtype == np.dtype(e.batch_dtypes[k]), k
        assert tuple(inputs[CACHE_INPUT].shape.as_list()) == entry.cache_shape
        assert set(sig.structured_outputs) == set(OUTPUTS)
        # the weights are the signature's variables (not constants baked into the graph)
        variables = {v.name.split(":")[0]: v.numpy() for v in sig.variables}
        assert variables.keys() == weights.keys()
        assert all(np.array_equal(variables[k], weights[k]) for k in weights)
        probe = load_file(artifact / e.probe)
        batch = {k: probe[k] for k in BATCH_INPUTS}
        num_seqs = probe["num_seqs"]
        assert (batch["temperature"][0, :num_seqs[0]] > 0).any()  # the probe samples some sequences

        engine.reset_cache()
        want = engine.run(bucket, batch)  # donates and replaces engine.cache
        zeros = np.zeros(entry.cache_shape, cache_dtype)
        got = _call(sig, batch, zeros)
        _agree(got, want, num_seqs, batch, tol, f"{bucket.name} vs runtime")
        _agree(got, _expected(probe), num_seqs, batch, tol, f"{bucket.name} vs probe")
        assert got[CACHE_INPUT].dtype == cache_dtype
        np.testing.assert_allclose(got[CACHE_INPUT], np.asarray(engine.cache), atol=tol, rtol=0)

        # A decode step on the cache the probe left: the cache input really is read.
        groups, _ = make_probe(bucket, 1, m.model.vocab_size, c.page_size, c.pages_per_seq)
        step2 = pack([_decode_step(groups, want["tokens"], c.page_size)], bucket.tokens, bucket.seqs, c.pages_per_seq)
        want2 = engine.run(bucket, step2)
        got2 = _call(sig, step2, got[CACHE_INPUT])
        n = np.array([len(groups[0])], np.int32)
        _agree(got2, want2, n, step2, tol, f"{bucket.name} decode vs runtime")
        np.testing.assert_allclose(got2[CACHE_INPUT], np.asarray(engine.cache), atol=tol, rtol=0)
        stale = _call(sig, step2, zeros)["top_logprobs"][:, :n[0]]  # without the cache the answer differs
        assert np.abs(stale - want2["top_logprobs"][:, :n[0]]).max() > 1e-3
    assert engine.compiles_after_load == 0


def test_warmup_records_one_per_signature(artifact, saved):
    m = fmt.read_manifest(artifact)
    entry = m.tf_savedmodel
    tol = tolerance(m.dtype)
    logs = read_warmup(artifact / entry.warmup)
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log"] * len(entry.signatures)
    assert sorted(log.predict_log.request.model_spec.signature_name for log in logs) == sorted(entry.signatures)
    probes = {e.bucket.name: e.probe for e in m.executables}
    for log in logs:
        req = log.predict_log.request
        name = req.model_spec.signature_name
        assert set(req.inputs) == set(BATCH_INPUTS) | {CACHE_INPUT}
        arrays = {k: tf.make_ndarray(TensorProto.FromString(v.SerializeToString())) for k, v in req.inputs.items()}
        probe = load_file(artifact / probes[name])
        for k in BATCH_INPUTS:
            np.testing.assert_array_equal(arrays[k], probe[k])
            assert arrays[k].dtype == probe[k].dtype, k
        kv = arrays[CACHE_INPUT]
        assert kv.shape == entry.cache_shape and kv.dtype == np.dtype(jnp.dtype(m.dtype)) and not kv.any()
        # the request is one the signature serves, with the probe's outputs
        out = saved.signatures[name](**{k: tf.constant(v) for k, v in arrays.items()})
        got = {k: out[k].numpy() for k in OUTPUT_NAMES}
        _agree(got, _expected(probe), probe["num_seqs"], arrays, tol, name)


def test_warmup_parses_with_tensorflow_serving_protos(artifact):
    # installed by .ci/run with --no-deps (it would otherwise pull the full tensorflow beside tensorflow-cpu)
    from tensorflow_serving.apis import prediction_log_pb2
    path = artifact / fmt.read_manifest(artifact).tf_savedmodel.warmup
    names = []
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(raw)
        assert log.WhichOneof("log_type") == "predict_log"
        names.append(log.predict_log.request.model_spec.signature_name)
    assert sorted(names) == sorted(fmt.read_manifest(artifact).tf_savedmodel.signatures)


def test_multi_device_mesh_is_refused(tmp_path):
    out = tmp_path / "x"
    r = subprocess.run([sys.executable, "-m", "export", "build", "--mesh", "2x4", "--tf-savedmodel", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "SavedModel export is for 1x1 builds" in lines[0], r.stderr
    assert "2x4" in lines[0] and not out.exists()
