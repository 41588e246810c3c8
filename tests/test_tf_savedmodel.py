"""`python -m export build --mesh 1x1 --tf-savedmodel`: a TF SavedModel that computes what the runtime does."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import build_artifact
from dp_attention import MeshShape
from export.probes import make_probe
from export.tf_savedmodel import BATCH_INPUTS, CACHE_INPUTS, read_warmup
from runtime import format as fmt
from runtime.batching import Chunk, pack
from runtime.buckets import Bucket
from runtime.engine import load

tf = pytest.importorskip("tensorflow")
from safetensors.numpy import load_file  # noqa: E402
from tensorflow.core.framework.tensor_pb2 import TensorProto  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    # A small cache keeps the (stacked) cache tensors that travel through TF small.
    return build_artifact(tmp_path_factory.mktemp("tfsm") / "qwen3-moe-tiny", ladder=(4, 16),
                          meshes=(MeshShape(1, 1),), tf_savedmodel=True, pages_per_group=24, max_context=64)


@pytest.fixture(scope="module")
def saved(artifact):
    return tf.saved_model.load(str(artifact / fmt.read_manifest(artifact)["tf_savedmodel"]["dir"]))


def _stacked(cache, key):
    return np.stack([np.asarray(layer[key]) for layer in cache])


def _call(sig, batch, k_cache, v_cache):
    out = sig(**{k: tf.constant(np.asarray(v, np.int32)) for k, v in batch.items()},
              k_cache=tf.constant(k_cache), v_cache=tf.constant(v_cache))
    return {k: v.numpy() for k, v in out.items()}


def _decode_step(groups, logits, page_size):
    """Each probe sequence's next (greedy) token, one decode chunk per sequence (pages grown as needed)."""
    next_page = 1 + max((p for c in groups[0] for p in c.pages), default=0)
    chunks = []
    for j, c in enumerate(groups[0]):
        n = len(c.tokens)
        pages = c.pages
        if n % page_size == 0:
            pages, next_page = pages + (next_page,), next_page + 1
        chunks.append(Chunk((int(np.argmax(logits[0, j])),), n, pages))
    return chunks


def test_manifest_lists_savedmodel_with_checksums(artifact):
    m = fmt.read_manifest(artifact)
    entry = m["tf_savedmodel"]
    names = sorted(Bucket.from_json(e["bucket"]).name for e in m["executables"])
    assert entry["dir"] == "tf_savedmodel" and sorted(entry["signatures"]) == names
    files = sorted(f.relative_to(artifact).as_posix() for f in (artifact / "tf_savedmodel").rglob("*") if f.is_file())
    assert "tf_savedmodel/saved_model.pb" in files and "tf_savedmodel/assets.extra/tf_serving_warmup_requests" in files
    assert all(f in m["files"] for f in files)
    fmt.verify_all(artifact, m)


def test_every_signature_matches_runtime(artifact, saved):
    engine = load(artifact)
    m = engine.manifest
    entry = m["tf_savedmodel"]
    assert set(saved.signatures) == {b.name for b in engine.buckets}
    weights = {name: load_file(artifact / w["file"])["tensor"] for name, w in engine.mesh_entry["weights"].items()}
    c = m["cache"]
    for bucket in engine.buckets:
        sig = saved.signatures[bucket.name]
        # the weights are the signature's variables (not constants baked into the graph)
        variables = {v.name.split(":")[0]: v.numpy() for v in sig.variables}
        assert variables.keys() == weights.keys()
        assert all(np.array_equal(variables[k], weights[k]) for k in weights)
        probe = load_file(artifact / engine.entries[bucket]["probe"])
        batch = {k: probe[k] for k in BATCH_INPUTS}

        engine.reset_cache()
        want = engine.run(bucket, batch)  # donates and replaces engine.cache
        zeros = np.zeros(entry["cache_shape"], np.float32)
        got = _call(sig, batch, zeros, zeros)
        np.testing.assert_allclose(got["logits"], want, atol=TOL, rtol=0, err_msg=bucket.name)
        np.testing.assert_allclose(got["logits"], probe["expected_logits"], atol=TOL, rtol=0, err_msg=bucket.name)
        for key, name in (("k", "k_cache"), ("v", "v_cache")):
            np.testing.assert_allclose(got[name], _stacked(engine.cache, key), atol=TOL, rtol=0)

        # A decode step on the caches the probe left: the cache input really is read.
        groups, _ = make_probe(bucket, 1, m["model"]["vocab_size"], c["page_size"], c["pages_per_seq"])
        step2 = pack([_decode_step(groups, want, c["page_size"])], bucket.tokens, bucket.seqs, c["pages_per_seq"])
        want2 = engine.run(bucket, step2)
        got2 = _call(sig, step2, got["k_cache"], got["v_cache"])
        n = len(groups[0])
        np.testing.assert_allclose(got2["logits"][:, :n], want2[:, :n], atol=TOL, rtol=0, err_msg=bucket.name)
        stale = _call(sig, step2, zeros, zeros)["logits"][:, :n]  # without the cache the answer differs
        assert np.abs(stale - want2[:, :n]).max() > 1e-3
    assert engine.compiles_after_load == 0


def test_warmup_records_one_per_signature(artifact, saved):
    m = fmt.read_manifest(artifact)
    entry = m["tf_savedmodel"]
    logs = read_warmup(artifact / entry["warmup"])
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log"] * len(entry["signatures"])
    assert sorted(log.predict_log.request.model_spec.signature_name for log in logs) == sorted(entry["signatures"])
    probes = {Bucket.from_json(e["bucket"]).name: e["probe"] for e in m["executables"]}
    for log in logs:
        req = log.predict_log.request
        name = req.model_spec.signature_name
        assert set(req.inputs) == set(BATCH_INPUTS + CACHE_INPUTS)
        arrays = {k: tf.make_ndarray(TensorProto.FromString(v.SerializeToString())) for k, v in req.inputs.items()}
        probe = load_file(artifact / probes[name])
        for k in BATCH_INPUTS:
            np.testing.assert_array_equal(arrays[k], probe[k])
        for k in CACHE_INPUTS:
            assert list(arrays[k].shape) == entry["cache_shape"] and not arrays[k].any()
        # the request is one the signature serves, with the probe's logits
        got = saved.signatures[name](**{k: tf.constant(v) for k, v in arrays.items()})
        np.testing.assert_allclose(got["logits"].numpy(), probe["expected_logits"], atol=TOL, rtol=0)


def test_warmup_parses_with_tensorflow_serving_protos(artifact):
    prediction_log_pb2 = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
    path = artifact / fmt.read_manifest(artifact)["tf_savedmodel"]["warmup"]
    names = []
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(raw)
        assert log.WhichOneof("log_type") == "predict_log"
        names.append(log.predict_log.request.model_spec.signature_name)
    assert sorted(names) == sorted(fmt.read_manifest(artifact)["tf_savedmodel"]["signatures"])


def test_multi_device_mesh_is_refused(tmp_path):
    out = tmp_path / "x"
    r = subprocess.run([sys.executable, "-m", "export", "build", "--mesh", "2x4", "--tf-savedmodel", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "SavedModel export is for 1x1 builds" in lines[0], r.stderr
    assert "2x4" in lines[0] and not out.exists()
