"""TF SavedModel export of a 1x1 build, for TensorFlow Serving (`python -m export build --mesh 1x1 --tf-savedmodel`).

Written through orbax-export (JaxModule -> jax2tf native serialization -> ExportManager) into
`<artifact>/tf_savedmodel/`:

- one serving signature per bucket of the 1x1 mesh, named after the bucket (`max_len-t4-s4-g4`);
- the placed weights of the 1x1 mesh (read back from the artifact's `weights/` files; a stacked
  weight is its per-layer files stacked again) as non-trainable `tf.Variable`s named after the
  weights (`embed`, `layers.q_proj`, `moe.gate`, ...);
- the KV cache as an input and an output: one tensor `kv` of the mesh's cache shape
  [1, layers, pages, page_size, 2*kv_heads, head_dim] (K and V interleaved on the head axis) in the
  artifact's dtype. TF Serving keeps no state between requests, so the client sends the cache it got
  back from the previous step;
- `assets.extra/tf_serving_warmup_requests`: a TFRecord file of `tensorflow.serving.PredictionLog`
  records, one PredictRequest per signature, made from the build's golden probe of that bucket with a
  zero cache (a probe reads only what it writes, so its outputs don't depend on the cache).

Signature inputs: the step's batch with its dtypes (see dp_attention/model.py): `tokens`,
`positions`, `seq_index` [1, T], `num_tokens` [1], `page_table` [1, S, pages_per_seq], `last_index`,
`top_k`, `seed` [1, S] (int32), `temperature`, `top_p` [1, S] (float32); and `kv`.
Outputs: `tokens` [1, S] int32 (sampled on the device), `logprobs` [1, S] float32, `top_ids` [1, S, N]
int32, `top_logprobs` [1, S, N] float32 (N = the artifact's `logprobs`) and the updated `kv`.

TensorFlow and orbax are imported only when a SavedModel is written. The PredictionLog messages are
a wire-compatible subset of tensorflow_serving/apis/{prediction_log,predict,model}.proto (same field
numbers), built here in a private descriptor pool, so no tensorflow-serving-api dependency is needed
(that package requires the full `tensorflow` distribution, which would clash with tensorflow-cpu).
"""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial
from pathlib import Path

import numpy as np

from .errors import BuildError

from dp_attention.model import BATCH_SPECS, FEED_INPUTS
from runtime import format as fmt
from runtime.verify import OUTPUT_NAMES

SAVEDMODEL_DIR = "tf_savedmodel"
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
# tokens, positions, ..., temperature, top_k, top_p, seed. TF Serving keeps nothing between requests,
# so there is no previous step to take tokens from: the feed inputs are fixed inside the signature.
BATCH_INPUTS = tuple(k for k in BATCH_SPECS if k not in FEED_INPUTS)
CACHE_INPUT = "kv"
OUTPUTS = OUTPUT_NAMES + (CACHE_INPUT,)


def mesh_error(meshes) -> str | None:
    """The one-line reason a SavedModel can't be exported for these meshes, or None."""
    other = [str(m) for m in meshes if (m.dp, m.tp) != (1, 1)]
    if not other:
        return None
    return (f"SavedModel export is for 1x1 builds (a single device); --tf-savedmodel was given with mesh "
            f"{', '.join(other)}: build --mesh 1x1 --tf-savedmodel separately")


def signature_name(bucket_name: str) -> str:
    return bucket_name


# ------------------------------------------------------------------------------------ the export

def write_savedmodel(tmp: Path, manifest: fmt.Manifest, cfg, meshes, platforms) -> fmt.SavedModelEntry:
    """Write `tmp/tf_savedmodel/` for the 1x1 mesh of a build in progress (model config `cfg`, the
    manifest so far, with its weights and probes already in `tmp`); returns its manifest entry.

    When the build targets CPU, the SavedModel is then loaded in TensorFlow and each warmup request
    is run through its signature: its sampled outputs must match the probe's (BuildError otherwise).
    """
    from runtime.verify import tolerance

    reason = mesh_error(meshes)
    if reason:
        raise BuildError(reason)
    if not manifest.weights_included:
        raise BuildError("--tf-savedmodel needs the weights; it can't be combined with --executables-only")

    import jax.numpy as jnp
    import tensorflow as tf
    from orbax.export import ExportManager, JaxModule, ServingConfig

    from dp_attention import MeshShape

    shape = MeshShape(1, 1)
    mesh_entry = manifest.mesh(str(shape))
    weights = {name: _read_weight(tmp, w) for name, w in mesh_entry.weights.items()}
    dtype = np.dtype(jnp.dtype(manifest.dtype))
    cache_shape = tuple(mesh_entry.cache_shape)

    entries = manifest.executables_of(str(shape))
    apply_fns, serving, batches = {}, [], {}
    for e in entries:
        b = e.bucket
        name = signature_name(b.name)
        apply_fns[name] = _apply(_one_device_step(cfg, b, manifest.logprobs))
        spec = {k: tf.TensorSpec(e.batch_shapes[k], tf.as_dtype(np.dtype(e.batch_dtypes[k])), name=k)
                for k in BATCH_INPUTS}
        spec[CACHE_INPUT] = tf.TensorSpec(cache_shape, tf.as_dtype(dtype), name=CACHE_INPUT)
        serving.append(ServingConfig(signature_key=name, input_signature=[spec], method_key=name))
        batches[name] = _probe_batch(tmp, manifest, e, b)

    out = tmp / SAVEDMODEL_DIR
    with _stablehlo_readable_by_tf():
        module = JaxModule(weights, apply_fns, trainable=False,
                           jax2tf_kwargs={k: {"native_serialization_platforms": tuple(platforms)} for k in apply_fns},
                           jit_compile=True)
        ExportManager(module, serving).save(str(out))

    warmup = out / WARMUP_FILE
    warmup.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(warmup)) as w:
        for name, batch in batches.items():
            w.write(warmup_record(name, batch, cache_shape, dtype).SerializeToString())
    entry = fmt.SavedModelEntry(dir=SAVEDMODEL_DIR, signatures=tuple(apply_fns),
                                warmup=f"{SAVEDMODEL_DIR}/{WARMUP_FILE}", inputs=BATCH_INPUTS + (CACHE_INPUT,),
                                outputs=OUTPUTS, cache_shape=cache_shape, platforms=tuple(platforms))
    if "cpu" not in platforms:
        return entry
    expected = {}
    for e in entries:
        if e.probe:
            probe = _load(tmp / e.probe)
            expected[signature_name(e.bucket.name)] = ({k: probe[f"expected_{k}"] for k in OUTPUT_NAMES},
                                                       probe["num_seqs"])
    return dataclasses.replace(entry, probe_max_error=_check(out, expected, tolerance(manifest.dtype)))


def _load(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def _read_weight(tmp: Path, w: fmt.WeightEntry) -> np.ndarray:
    """One weight whole, as the 1x1 mesh places it: a stacked weight is its per-layer files stacked."""
    tensors = [_load(tmp / rel)["tensor"] for rel in w.files]
    array = np.stack(tensors) if w.stacked else tensors[0]
    if array.shape != tuple(w.shape):
        raise BuildError(f"weight files {list(w.files[:1])}...: shape {list(array.shape)}, manifest says "
                         f"{list(w.shape)}")
    return array


def _check(saved_dir: Path, expected: dict[str, tuple[dict, np.ndarray]], tol: float) -> dict[str, float]:
    """Load the SavedModel in TensorFlow, replay each warmup request, compare with the probe's outputs
    ({signature: (expected outputs, num_seqs)}) as the runtime's verify does."""
    import tensorflow as tf
    from tensorflow.core.framework.tensor_pb2 import TensorProto

    from runtime.verify import compare_outputs

    loaded = tf.saved_model.load(str(saved_dir))
    errors = {}
    for log in read_warmup(saved_dir / WARMUP_FILE):
        req = log.predict_log.request
        name = req.model_spec.signature_name
        if name not in expected:
            continue
        arrays = {k: tf.make_ndarray(TensorProto.FromString(v.SerializeToString())) for k, v in req.inputs.items()}
        outputs = loaded.signatures[name](**{k: tf.constant(v) for k, v in arrays.items()})
        got = {k: outputs[k].numpy() for k in OUTPUT_NAMES}
        want, num_seqs = expected[name]
        worst, why = compare_outputs(got, want, num_seqs, arrays["temperature"] == 0, tol)
        errors[name] = worst
        if why:
            raise BuildError(f"{SAVEDMODEL_DIR} signature {name} disagrees with the build's probe in TensorFlow: {why}")
    return errors


def _one_device_step(cfg, bucket, num_logprobs: int):
    """The step of a 1x1 mesh with its collectives bound to size-1 vmapped axes instead of devices.

    `make_step` runs the per-device step in a shard_map; on one device its psums, all-gathers and
    psum-scatters still compile to XLA collectives, which TensorFlow's XLA can't run (it gives them no
    device assignment). Under vmap over a leading axis of size 1 for "data" and "tensor", the same
    per-device code computes the same thing with no collectives at all (axis_index is 0, axis_size 1):
    a 1x1 mesh places every array whole on its one device, so each "device block" is the whole array
    (the cache and batch keep their data axis of size 1, as a device block does).
    """
    import jax

    from dp_attention.model import ExpertShard, StepOptions, device_step

    # 1x1: every expert on the one device
    per_device = jax.vmap(jax.vmap(partial(device_step, cfg, bucket, StepOptions(num_logprobs=num_logprobs),
                                           ExpertShard()), axis_name="tensor"), axis_name="data")

    def step(weights, kv, batch):
        add = lambda tree: jax.tree.map(lambda x: x[None, None], tree)  # noqa: E731
        outputs, kv = per_device(add(weights), add(kv), add(batch))
        return jax.tree.map(lambda x: x[0, 0], (outputs, kv))

    return step


@contextlib.contextmanager
def _stablehlo_readable_by_tf():
    """Serialize StableHLO no newer than this TensorFlow's XlaCallModule can read.

    jax.export targets the StableHLO of about 4 weeks ago; the TF release beside it is often older
    (jax 0.10 writes 1.15.0, TF 2.21 reads up to 1.13.7). There is no public switch for the target,
    so for the duration of the export the version jax asks for is capped at TF's.
    """
    from jax._src.export import _export
    from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo

    hlo = getattr(_export, "hlo", None)
    original = getattr(hlo, "get_version_from_compatibility_requirement", None)
    if original is None or not hasattr(hlo, "get_smaller_version"):
        yield  # a jax whose internals moved: the build's check of the SavedModel will tell
        return
    tf_version = tf_stablehlo.get_current_version()
    hlo.get_version_from_compatibility_requirement = lambda req: hlo.get_smaller_version(original(req), tf_version)
    try:
        yield
    finally:
        hlo.get_version_from_compatibility_requirement = original


def _apply(step):
    """(weights, inputs dict) -> outputs dict: the step's sampled outputs and the updated "kv"."""

    def apply(weights, x):
        import jax.numpy as jnp

        batch = {k: x[k] for k in BATCH_INPUTS}
        batch |= {"feed": jnp.full_like(batch["tokens"], -1), "prev_tokens": jnp.zeros((1, 1), jnp.int32)}
        outputs, kv = step(weights, x[CACHE_INPUT], batch)
        return {k: outputs[k] for k in OUTPUT_NAMES} | {CACHE_INPUT: kv}

    return apply


def _probe_batch(tmp: Path, manifest: fmt.Manifest, entry: fmt.ExecutableEntry, bucket) -> dict[str, np.ndarray]:
    """The golden probe batch of one executable (as the build wrote it, else regenerated alike)."""
    if entry.probe:
        data = _load(tmp / entry.probe)
        return {k: data[k] for k in BATCH_INPUTS}
    from .probes import make_probe

    c = manifest.cache
    _, batch = make_probe(bucket, 1, manifest.model.vocab_size, c.page_size, c.pages_per_seq)
    return {k: np.asarray(batch[k]) for k in BATCH_INPUTS}


# ------------------------------------------------------------------------------------ warmup records

def warmup_record(signature: str, batch: dict[str, np.ndarray], cache_shape, dtype):
    """One PredictionLog{predict_log{request}} for `signature`: the batch (each input with its own
    dtype) plus a zero KV cache `kv`.

    The zero cache is stored compactly (one value, which TensorProto repeats over the shape).
    """
    import tensorflow as tf

    msgs = prediction_log_classes()
    log = msgs["PredictionLog"]()
    req = log.predict_log.request
    req.model_spec.signature_name = signature
    for k, v in batch.items():
        req.inputs[k].MergeFromString(tf.make_tensor_proto(np.asarray(v)).SerializeToString())
    zero = tf.make_tensor_proto(np.zeros((), dtype), dtype=tf.as_dtype(dtype), shape=list(cache_shape))
    req.inputs[CACHE_INPUT].MergeFromString(zero.SerializeToString())
    return log


def read_warmup(path: str | Path) -> list:
    """Parse a warmup file into PredictionLog messages (this module's classes)."""
    import tensorflow as tf

    cls = prediction_log_classes()["PredictionLog"]
    out = []
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        log = cls()
        log.ParseFromString(raw)
        out.append(log)
    return out


_CLASSES: dict | None = None


def prediction_log_classes() -> dict:
    """Message classes for PredictionLog, PredictLog, PredictRequest, PredictResponse, ModelSpec."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from tensorflow.core.framework import tensor_pb2

    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file_desc):
        if file_desc.name in added:
            return
        for dep in file_desc.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        file_desc.CopyToProto(proto)
        pool.Add(proto)
        added.add(file_desc.name)

    add(tensor_pb2.DESCRIPTOR)
    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="qwen3_moe_aot/tf_serving_prediction_log.proto",
                                            package="tensorflow.serving", syntax="proto3",
                                            dependency=[tensor_pb2.DESCRIPTOR.name])

    def message(name, fields, nested=()):
        m = fd.message_type.add(name=name)
        for n in nested:
            m.nested_type.add().CopyFrom(n)
        for fname, number, ftype, type_name, label in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
        return m

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    msg, string = F.TYPE_MESSAGE, F.TYPE_STRING

    def map_entry(name):
        e = descriptor_pb2.DescriptorProto(name=name)
        e.options.map_entry = True
        e.field.add(name="key", number=1, type=string, label=opt)
        e.field.add(name="value", number=2, type=msg, label=opt, type_name=".tensorflow.TensorProto")
        return e

    message("ModelSpec", [("name", 1, string, "", opt), ("signature_name", 3, string, "", opt)])
    message("PredictRequest", [("model_spec", 1, msg, ".tensorflow.serving.ModelSpec", opt),
                               ("inputs", 2, msg, ".tensorflow.serving.PredictRequest.InputsEntry", rep),
                               ("output_filter", 3, string, "", rep)], [map_entry("InputsEntry")])
    message("PredictResponse", [("outputs", 1, msg, ".tensorflow.serving.PredictResponse.OutputsEntry", rep),
                                ("model_spec", 2, msg, ".tensorflow.serving.ModelSpec", opt)],
            [map_entry("OutputsEntry")])
    message("PredictLog", [("request", 1, msg, ".tensorflow.serving.PredictRequest", opt),
                           ("response", 2, msg, ".tensorflow.serving.PredictResponse", opt)])
    pl = message("PredictionLog", [("predict_log", 6, msg, ".tensorflow.serving.PredictLog", opt)])
    pl.oneof_decl.add(name="log_type")
    pl.field[0].oneof_index = 0
    pool.Add(fd)
    _CLASSES = {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{n}"))
                for n in ("PredictionLog", "PredictLog", "PredictRequest", "PredictResponse", "ModelSpec")}
    return _CLASSES
