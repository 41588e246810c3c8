"""Build an artifact: weights, one jax.export file per (mesh, mode, bucket), probes, a manifest.

The build happens in a temporary directory beside the output and is renamed into place only when
complete, so an interrupted build never leaves a directory that loads. A build whose inputs (model,
options, versions, this package's source) hash the same as the existing artifact's is a no-op.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding
from safetensors.numpy import save_file

from dp_attention import (DEFAULT_LOGPROBS, CacheShape, Layout, MeshShape, abstract_mesh, batch_shapes, cache_shape,
                          init_cache, jit_step, make_mesh, placed_numpy, weight_specs)
from dp_attention.calibration import CALIBRATION_PROMPTS, CALIBRATION_TOKENS, calibrate
from dp_attention.kv_cache import KV_CACHE_CHOICES, KvQuant, cache_dtype, is_quantized
from dp_attention.model import BATCH_SPECS, CACHE_SPEC, OUTPUT_SPECS, WIRE_SPECS, jit_wire_step
from dp_attention.ragged import TPU_DEVICE_KINDS
from dp_attention.weights import QUANTIZE, SCALE
from runtime import cpu_kernel
from runtime import engine as rt_engine
from runtime import format as fmt
from runtime.batching import pack, wire_shapes
from runtime.buckets import MAX_LEN, Bucket, plan
from runtime.profile import module_name
from runtime.verify import OUTPUT_NAMES, compare_outputs, tolerance

from . import hbm
from .errors import BuildError
from .hlo_cost import costs
from .probes import make_probe, step_seconds
from .progress import Reporter
from .source import ModelSource, open_model
from .tf_savedmodel import mesh_error as savedmodel_mesh_error, write_savedmodel

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PAGES_PER_GROUP = 160  # the KV cache's default size, in pages of the build dtype
COLLECTIVE = re.compile(r"= \S+ (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    model: str = "qwen3-moe-tiny"
    meshes: tuple[MeshShape, ...] = (MeshShape(2, 4),)
    out: Path | None = None
    platforms: tuple[str, ...] = ("cpu",)
    dtype: str | None = None  # default: the checkpoint's
    modes: tuple[str, ...] = ("max_len", "sum_len")
    # Decode rungs hold as many sequences as tokens (a step decodes up to 64 per group); the top rung
    # holds prefill chunks of 128 tokens, and its queries attend in tiles of 8 (dp_attention.attention).
    token_ladder: tuple[int, ...] = (8, 16, 32, 64, 128)
    sum_ladder: tuple[int, ...] | None = None
    max_seqs: int = 64
    max_step_tokens: int | None = None  # rungs whose step (dp x tokens) exceeds it are not built for that mesh
    page_size: int = 8
    max_context: int = 256
    pages_per_group: int | None = None  # including the reserved page 0; None: from kv_cache_bytes, else the default
    kv_cache_dtype: str = "auto"  # auto (the build dtype), int8, fp8_e4m3, fp8_e5m2 (dp_attention.kv_cache)
    kv_cache_bytes: int | None = None  # KV cache bytes per device: pages per group are what fits on every mesh
    # Static per-layer KV scales ((K per layer), (V per layer)) for an 8-bit cache; None: calibrated at build.
    kv_scales: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    jobs: int = 2
    fast_load: bool = True
    tf_savedmodel: bool = False  # also write a TF SavedModel for TensorFlow Serving (1x1 builds only)
    logprobs: int = DEFAULT_LOGPROBS  # top-N logprobs every executable returns per sequence
    executables_only: bool = False  # no weights, no probes: exports (and their costs) from config.json alone
    attention: str | None = None  # "fa" (the Pallas kernel, TPU only), "native", or "cpu" (the C++ kernels of
    # runtime.cpu_kernel for attention and, unquantized, the experts: CPU, float32); default: default_attention
    tpu_generation: str | None = None  # v5e, v5p, v6e: the chip the kernels are lowered and tuned for, and whose
    # HBM the build checks the artifact fits (default v5e for tpu builds)
    expert_layout: str | None = None  # a name of dp_attention.weights.EXPERT_LAYOUTS; None/"auto": chosen per mesh
    quantize: str = "none"  # "int8": weight-only int8 projections with per-output-channel scales
    quantize_lm_head: bool = False  # with quantize: the embedding and lm_head too

    @property
    def attention_backend(self) -> str:
        return self.attention or ("fa" if self.platforms == ("tpu",) else "native")

    def default_attention(self, model) -> str:
        """--attention when none was given: the TPU kernel for TPU builds; the C++ kernel for CPU
        builds with a float32 cache where this host can compile it; else native."""
        if self.attention is not None:
            return self.attention
        if self.platforms == ("cpu",) and self.kv_dtype(model.dtype) == "float32" and cpu_kernel.available():
            return "cpu"
        return self.attention_backend

    @property
    def hbm_generation(self) -> str | None:
        """The TPU whose HBM the artifact must fit (None: not a TPU build)."""
        return self.tpu_generation or ("v5e" if "tpu" in self.platforms else None)

    @property
    def expert_kernel(self) -> str:
        """The experts' kernel, by the exports' platforms: the Pallas grouped matmul cannot sit beside
        a CPU branch of lax.platform_dependent, so only a TPU-only export gets it."""
        if self.platforms == ("tpu",):
            return "gmm"
        if "tpu" in self.platforms:
            return "by-platform"
        return "cpu" if self.attention_backend == "cpu" and self.quantize == "none" else "tiles"

    def specs(self, model, shape: MeshShape) -> dict:
        return weight_specs(model, shape, self.expert_layout, self.quantize, self.quantize_lm_head)

    def weight_quantization(self, model) -> fmt.WeightQuantizationEntry | None:
        """The manifest's record of the quantization (None for unquantized builds)."""
        if self.quantize == "none":
            return None
        names = tuple(n for n, s in self.specs(model, self.meshes[0]).items() if s.quant == self.quantize)
        return fmt.WeightQuantizationEntry(dtype=self.quantize, granularity="per-output-channel", scale_suffix=SCALE,
                                           weights=names, lm_head=self.quantize_lm_head)

    @property
    def device_kind(self) -> str | None:
        """The TPU device kind the exports are lowered for (None for builds without tpu)."""
        return TPU_DEVICE_KINDS[self.tpu_generation or "v5e"] if "tpu" in self.platforms else None

    @property
    def carry_seqs(self) -> int:
        """Width of the sampled-token carry, shared by every executable: the widest bucket's seqs."""
        return min(max(self.token_ladder), self.max_seqs)

    def kv_dtype(self, build_dtype: str) -> str:
        """The KV cache's dtype name for a model built in `build_dtype`."""
        return cache_dtype(self.kv_cache_dtype, build_dtype)

    def num_pages(self, model=None) -> int:
        """Pages per group. Explicit --pages-per-group wins; else a byte budget: kv_cache_bytes per
        device (the pages that fit on every mesh), or by default the bytes DEFAULT_PAGES_PER_GROUP
        pages take in the build dtype, so an 8-bit cache of a bfloat16 model gets twice the pages
        (four times a float32 model's). `model` (a ModelConfig) is needed unless the count is
        explicit or the cache is in the build dtype."""
        if self.pages_per_group is not None:
            return self.pages_per_group
        if self.kv_cache_bytes is None and self.kv_cache_dtype == "auto":
            return DEFAULT_PAGES_PER_GROUP
        kv = self.kv_dtype(model.dtype)
        if self.kv_cache_bytes is None:
            return DEFAULT_PAGES_PER_GROUP * jnp.dtype(model.dtype).itemsize // jnp.dtype(kv).itemsize
        return min(self.kv_cache_bytes // self.page_bytes(model, s) for s in self.meshes)

    def page_bytes(self, model, shape: MeshShape) -> int:
        """Bytes of one KV page of one group on one device of `shape` (every layer, K and V)."""
        full = cache_shape(model, Layout.for_mesh(model, shape, self.expert_layout), shape.dp,
                           CacheShape(1, self.page_size, 1), jnp.dtype(self.kv_dtype(model.dtype)),
                           self.attention_backend).shape
        _, layers, _, page, heads, hd = full
        return layers * page * (heads // shape.tp) * hd * jnp.dtype(self.kv_dtype(model.dtype)).itemsize

    def cache(self, model=None) -> CacheShape:
        return CacheShape(self.num_pages(model), self.page_size, -(-self.max_context // self.page_size))

    def kv_quant(self, model) -> KvQuant | None:
        """The 8-bit cache's dtype and scales (None: the cache is in the build dtype); needs kv_scales."""
        dtype = self.kv_dtype(model.dtype)
        if not is_quantized(dtype):
            return None
        if self.kv_scales is None:
            raise BuildError("an 8-bit KV cache needs its scales: calibrate them first")
        return KvQuant(dtype, tuple(self.kv_scales[0]), tuple(self.kv_scales[1]))


def default_out(model_name: str) -> Path:
    return Path("artifacts") / model_name


# ------------------------------------------------------------------------------------ hashing

def _source_fingerprint() -> str:
    h = hashlib.sha256()
    for pkg in ("dp_attention", "export", "runtime"):
        for f in sorted([*(PACKAGE_ROOT / pkg).glob("*.py"), *(PACKAGE_ROOT / pkg).glob("kernels/*")]):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def inputs_hash(cfg: BuildConfig, source: ModelSource) -> str:
    d = dataclasses.asdict(cfg)
    d.pop("out"), d.pop("jobs")
    d["meshes"] = [str(m) for m in cfg.meshes]
    blob = json.dumps([d, source.config.to_json(), source.fingerprint, jax.__version__, jax.lib.__version__,
                       _source_fingerprint()], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def up_to_date(out: Path, digest: str) -> bool:
    try:
        manifest = fmt.read_manifest(out)
        if manifest.build.inputs_hash != digest:
            return False
        fmt.verify_all(out, manifest)
        return True
    except fmt.ArtifactError:
        return False


# ------------------------------------------------------------------------------------ pieces

def _weight_entries(tmp: Path | None, source: ModelSource, specs: dict, written: set, report,
                    executables_only: bool) -> dict[str, fmt.WeightEntry]:
    """Placed weights for one mesh, one file per layer of a stacked weight (a real expert stack is
    never held whole); identical tensors across meshes are stored once. Executables-only builds
    record every weight's shape and sharding, with no files. Quantized weights and their scales
    are weights like the rest: their own files, dtypes and checksums."""
    files = {name: [] for name in specs}
    if not executables_only:
        for name, _, array in placed_numpy(specs, source.read, source.config.dtype):
            digest = hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()
            rel = fmt.weight_path(name, digest)
            if rel not in written:
                save_file({"tensor": np.ascontiguousarray(array)}, tmp / rel)
                written.add(rel)
            files[name].append(rel)
            report.advance_weights()
    return {name: fmt.WeightEntry(files=tuple(files[name]), shape=tuple(spec.shape),
                                  dtype=spec.dtype or source.config.dtype,
                                  spec=fmt.spec_of(spec.spec), stacked=bool(spec.layers))
            for name, spec in specs.items()}


def _mesh_entry(tmp: Path | None, cfg: BuildConfig, source: ModelSource, shape: MeshShape, here: bool,
                cache: CacheShape, written: set, report) -> fmt.MeshEntry:
    """tmp None: shapes and specs only, no weight files (the memory check before the build)."""
    model = source.config
    layout = Layout.for_mesh(model, shape, cfg.expert_layout)
    kv = cache_shape(model, layout, shape.dp, cache, jnp.float32, cfg.attention_backend)
    ex = layout.experts
    return fmt.MeshEntry(
        name=str(shape), shape=(shape.dp, shape.tp), devices=shape.num_devices, compiled_here=here,
        axes=("data", "tensor"), weights=_weight_entries(tmp, source, cfg.specs(model, shape), written, report,
                                                         cfg.executables_only or tmp is None),
        cache_spec=fmt.spec_of(CACHE_SPEC), cache_shape=tuple(kv.shape),
        batch_specs={k: fmt.spec_of(v) for k, v in BATCH_SPECS.items()},
        output_specs={k: fmt.spec_of(v) for k, v in OUTPUT_SPECS.items()},
        expert_layout=fmt.ExpertLayoutEntry(name=ex.name, expert_axes=ex.expert_axes, width_axes=ex.width_axes,
                                            local_experts=ex.local_experts, local_width=ex.local_width)
        if any(model.is_moe_layer(i) for i in range(model.num_layers)) else None)


def _abstract_args(cfg, shape: MeshShape, mesh, bucket: Bucket, cache: CacheShape, attention: str, carry_seqs: int,
                   specs: dict, kv_dtype: str):
    dtype = jnp.dtype(cfg.dtype)
    ns = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    weights = {k: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype) if s.dtype else dtype, sharding=ns(s.spec))
               for k, s in specs.items()}
    kv = cache_shape(cfg, Layout.for_mesh(cfg, shape), shape.dp, cache, jnp.dtype(kv_dtype), attention)
    kv = jax.ShapeDtypeStruct(kv.shape, kv.dtype, sharding=ns(CACHE_SPEC))
    shapes = {k: v.shape for k, v in batch_shapes(shape.dp, bucket, cache, carry_seqs).items()}
    wire = {k: jax.ShapeDtypeStruct(s, jnp.dtype(d), sharding=ns(WIRE_SPECS[k])) for k, (s, d) in wire_shapes(shapes).items()}
    return specs, weights, kv, wire


def export_one(cfg, shape: MeshShape, mesh, bucket: Bucket, cache: CacheShape, build: "BuildConfig") -> bytes:
    """One serialized export. The fa kernel's lowering asks which TPU it is for: exports for tpu
    run under an abstract mesh that names the chip, so they need no TPU here."""
    attention = build.attention_backend
    specs, weights, kv, wire = _abstract_args(cfg, shape, mesh, bucket, cache, attention, build.carry_seqs,
                                              build.specs(cfg, shape), build.kv_dtype(cfg.dtype))
    step = jit_wire_step(cfg, bucket, mesh, specs, cache, build.carry_seqs, num_logprobs=build.logprobs,
                         attention=attention, tpu_generation=build.tpu_generation, experts=build.expert_kernel,
                         kv_quant=build.kv_quant(cfg))
    context = jax.sharding.use_abstract_mesh(mesh) if isinstance(mesh, AbstractMesh) else contextlib.nullcontext()
    with context:
        # The CPU kernels are custom calls jax.export does not know to be stable: their contracts are
        # ours (each name in runtime.cpu_kernel.TARGETS carries its version), and the runtime
        # registers them before loading.
        checks = ([jax.export.DisabledSafetyCheck.custom_call(t) for t in cpu_kernel.TARGETS] if attention == "cpu"
                  else [])
        return bytes(jax.export.export(step, platforms=build.platforms, disabled_checks=checks)(weights, kv, wire)
                     .serialize())


def _analysis(compiled) -> fmt.Cost:
    """What one executable costs per device: memory from XLA, FLOPs counted with loop trip counts
    (XLA's own cost analysis counts a scanned layer once)."""
    text = compiled.as_text()
    counted, sent = costs(text)
    xla = compiled.cost_analysis() or {}
    xla = xla[0] if isinstance(xla, list) else xla
    cost = fmt.Cost(flops=counted["flops"], xla_flops=float(xla.get("flops", 0.0)),
                    collective_bytes=sent, bytes_accessed=float(xla.get("bytes accessed", 0.0)),
                    collectives=dict(collections.Counter(COLLECTIVE.findall(text))))
    mem = compiled.memory_analysis()
    if mem is None:
        return cost
    return dataclasses.replace(
        cost, argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes), code_bytes=int(mem.generated_code_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes))


def _reference_step(source: ModelSource, shape: MeshShape, mesh, probes: list, cache: CacheShape, logprobs: int,
                    weights, specs: dict, kv_quant: KvQuant | None):
    """The oracle each executable's probe is checked against: the step jitted here rather than
    exported, MAX_LEN, with the all-experts MoE path, in one shape that holds every probe of the
    mesh. Its padding rows are discarded, so one shape is as good an oracle as an exact fit per
    probe, and the build compiles one reference however long the ladder is. It is compiled without
    XLA's backend optimizations: it runs a few milliseconds per probe, so compiling is all it costs.
    `weights` may be abstract (it compiles before they are loaded). Returns (weights, groups) ->
    outputs as numpy."""
    T = max(1, max(sum(len(c.tokens) for c in g) for groups in probes for g in groups))
    S = max(1, max(len(g) for groups in probes for g in groups))
    step = jit_step(source.config, Bucket(MAX_LEN, T, S, shape.dp * T), mesh, specs, dense_reference=True,
                    num_logprobs=logprobs, kv_quant=kv_quant)
    model = source.config
    kv_dtype = jnp.dtype(kv_quant.dtype if kv_quant is not None else model.dtype)
    kv = cache_shape(model, Layout.for_mesh(model, shape), shape.dp, cache, kv_dtype)  # native layout
    kv = jax.ShapeDtypeStruct(kv.shape, kv.dtype, sharding=NamedSharding(mesh, CACHE_SPEC))
    compiled = step.lower(weights, kv, pack(probes[0], T, S, cache.pages_per_seq)).compile(
        compiler_options={"xla_backend_optimization_level": 0})

    def run(weights, groups) -> dict:
        kv = init_cache(source.config, Layout.for_mesh(source.config, shape), mesh, cache, kv_dtype)
        out, _ = compiled(weights, kv, pack(groups, T, S, cache.pages_per_seq))
        return {k: np.asarray(v) for k, v in out.items()}

    return run


def _probe(tmp: Path, engine, bucket: Bucket, probe, source: ModelSource, reference) -> dict:
    """Run one executable on its probe against the reference step; its ExecutableEntry fields."""
    groups, batch = probe
    got = engine.run(bucket, batch)
    ref = reference(engine.weights, groups)
    num_seqs = np.array([len(chunks) for chunks in groups], np.int32)
    worst, why = compare_outputs(got, ref, num_seqs, batch["temperature"] == 0,
                                 tolerance(source.config.dtype, engine.manifest.kv_dtype))
    if why:
        raise BuildError(f"executable {engine.entries[bucket].file} disagrees with the reference step on its probe: "
                         f"{why}")
    rel = fmt.probe_path(engine.mesh_entry.name, bucket.name)
    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
    save_file({**{k: np.asarray(v) for k, v in batch.items()}, "num_seqs": num_seqs,
               **{f"expected_{k}": np.asarray(got[k]) for k in OUTPUT_NAMES}}, tmp / rel)
    return {"probe": rel, "probe_max_error": worst}


# ------------------------------------------------------------------------------------ the build

def build(cfg: BuildConfig, report: Reporter | None = None) -> Path:
    report = report or Reporter(quiet=True)
    if cfg.attention not in (None, "fa", "native", "cpu"):
        raise BuildError(f"--attention {cfg.attention!r}: expected fa, native or cpu")
    if cfg.attention == "cpu" and cfg.platforms != ("cpu",):
        raise BuildError(f"--attention cpu is a C++ kernel for CPU executables: build it for --platform cpu alone, "
                         f"not {','.join(cfg.platforms)} (use --attention native for other platforms)")
    if cfg.attention_backend == "fa" and cfg.platforms != ("tpu",):
        raise BuildError(f"--attention fa is the Pallas TPU kernel: build it for --platform tpu alone, not "
                         f"{','.join(cfg.platforms)} (use --attention native for other platforms)")
    if cfg.tpu_generation is not None and cfg.tpu_generation not in TPU_DEVICE_KINDS:
        raise BuildError(f"--tpu-generation {cfg.tpu_generation!r}: expected one of {', '.join(TPU_DEVICE_KINDS)}")
    if cfg.logprobs < 1:
        raise BuildError(f"--logprobs must be at least 1, got {cfg.logprobs}")
    if cfg.quantize not in QUANTIZE:
        raise BuildError(f"--quantize {cfg.quantize!r}: expected one of {', '.join(QUANTIZE)}")
    if cfg.quantize_lm_head and cfg.quantize == "none":
        raise BuildError("--quantize-lm-head quantizes the embedding and lm_head like the projections: "
                         "add --quantize int8")
    if cfg.kv_cache_dtype not in KV_CACHE_CHOICES:
        raise BuildError(f"--kv-cache-dtype {cfg.kv_cache_dtype!r}: expected one of {', '.join(KV_CACHE_CHOICES)}")
    if cfg.pages_per_group is not None and cfg.kv_cache_bytes is not None:
        raise BuildError("--pages-per-group and --kv-cache-gib both size the KV cache: give one")
    source = open_model(cfg.model, cfg.dtype, weights=not cfg.executables_only)
    model = source.config
    out = Path(cfg.out) if cfg.out else default_out(model.name)
    cfg = dataclasses.replace(cfg, attention=cfg.default_attention(model))
    _check_kv_heads(cfg, model)
    _check_cpu_kernel(cfg, model)
    cache = cfg.cache(model)
    if cache.num_pages - 1 < cache.pages_per_seq:
        raise BuildError(f"the KV cache holds {cache.num_pages} pages per group (page 0 reserved), fewer than one "
                         f"sequence of --max-context {cfg.max_context} needs ({cache.pages_per_seq} pages of "
                         f"{cfg.page_size} tokens): give it more bytes or pages, or lower --max-context")
    try:
        plans = {str(s): plan(s.dp, cfg.token_ladder, cfg.max_seqs, cfg.modes, cfg.sum_ladder, cfg.max_step_tokens)
                 for s in cfg.meshes}
    except ValueError as e:
        raise BuildError(str(e)) from None
    for s in cfg.meshes:
        Layout.for_mesh(model, s, cfg.expert_layout)  # fail early on heads that don't fit the mesh, a bad layout
    if cfg.tf_savedmodel and (reason := savedmodel_mesh_error(cfg.meshes)):
        raise BuildError(reason)
    if cfg.tf_savedmodel and cfg.kv_cache_dtype != "auto":
        raise BuildError(f"--tf-savedmodel serves a cache in the build dtype; it can't be combined with "
                         f"--kv-cache-dtype {cfg.kv_cache_dtype}")
    if cfg.tf_savedmodel and cfg.executables_only:
        raise BuildError("--tf-savedmodel needs weights; it can't be combined with --executables-only")
    for b in (b for bs in plans.values() for b in bs):
        if b.tokens > cache.pages_per_seq * cache.page_size * b.seqs:
            raise BuildError(f"bucket {b.name} holds more tokens than its sequences can (max context {cfg.max_context})")
    vocab = model.vocab_size
    if cfg.logprobs > vocab:
        raise BuildError(f"--logprobs {cfg.logprobs} is more than the vocabulary ({vocab} tokens)")
    hbm = _memory_check(cfg, source, cache, plans)
    report.plan(model.name, out, plans, cfg.platforms)

    digest = inputs_hash(cfg, source)
    if up_to_date(out, digest):
        report.up_to_date(out)
        return out
    if source.checkpoint is not None and not cfg.executables_only:
        source.checkpoint.check(cfg.specs(model, cfg.meshes[0]))

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    cfg, calibration = _with_kv_scales(cfg, source)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        manifest = _build_into(tmp, cfg, source, cache, plans, digest, report, hbm, calibration)
        _finish(tmp, out, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.summary(out, manifest)
    return out


def _check_cpu_kernel(cfg: BuildConfig, model) -> None:
    """--attention cpu: the kernels read a float32 cache and must compile here (they do so in the
    background while the exports trace)."""
    if cfg.attention_backend != "cpu":
        return
    kv = cfg.kv_dtype(model.dtype)
    if kv != "float32":
        raise BuildError(f"--attention cpu reads a float32 KV cache; this build's is {kv} (--dtype {model.dtype}, "
                         f"--kv-cache-dtype {cfg.kv_cache_dtype}): build with --dtype float32 and --kv-cache-dtype "
                         f"auto, or --attention native")
    if not cpu_kernel.available():
        try:
            cpu_kernel.build()  # raises the one-line reason
        except cpu_kernel.KernelUnavailable as e:
            raise BuildError(f"--attention cpu: {e}") from None
    cpu_kernel.prepare()  # the first compile of an executable waits for it


def _check_kv_heads(cfg: BuildConfig, model) -> None:
    """The Pallas kernel reads an 8-bit cache four combined K/V heads (two kv heads) at a time: a
    mesh that leaves one kv head per device cannot export it."""
    if cfg.attention_backend != "fa" or not is_quantized(cfg.kv_dtype(model.dtype)):
        return
    for s in cfg.meshes:
        local = Layout.for_mesh(model, s, cfg.expert_layout).kv_heads // s.tp
        if local % 2:
            raise BuildError(f"--kv-cache-dtype {cfg.kv_cache_dtype} with --attention fa needs an even number of kv "
                             f"heads per device; mesh {s} leaves {local} ({model.num_kv_heads} kv heads over tp "
                             f"{s.tp}): use a mesh with tp <= {max(1, model.num_kv_heads // 2)}, --attention native, "
                             "or --kv-cache-dtype auto")


def _with_kv_scales(cfg: BuildConfig, source: ModelSource) -> tuple[BuildConfig, str | None]:
    """cfg with the static scales an 8-bit cache needs (calibrated unless given), and a note on where
    they came from (None for a cache in the build dtype)."""
    model = source.config
    dtype = cfg.kv_dtype(model.dtype)
    if not is_quantized(dtype):
        return cfg, None
    if cfg.kv_scales is not None:
        return cfg, "given"
    if cfg.executables_only:  # no weights to calibrate with, and an executables-only artifact never serves
        ones = (1.0,) * model.num_layers
        return dataclasses.replace(cfg, kv_scales=(ones, ones)), "none: --executables-only (no weights), scales 1"
    q = calibrate(model, source.read, model.dtype, dtype)
    return (dataclasses.replace(cfg, kv_scales=(q.k_scale, q.v_scale)),
            f"per-layer absmax of K and V over {CALIBRATION_PROMPTS} random prompts of {CALIBRATION_TOKENS} tokens "
            "through the unquantized step")


def _memory_check(cfg: BuildConfig, source: ModelSource, cache: CacheShape, plans) -> dict[str, fmt.HbmEntry]:
    """Per mesh, weights + KV cache + the largest bucket's estimated temp on the TPU it is built for;
    refuses (BuildError, one line) before anything is exported when they do not fit. Empty for
    builds that are not for a TPU."""
    if cfg.hbm_generation is None:
        return {}
    out = {}
    for shape in cfg.meshes:
        entry = _mesh_entry(None, cfg, source, shape, False, cache, set(), None)
        temp = max(hbm.estimate_temp_bytes(source.config, entry, b, source.config.dtype) for b in plans[str(shape)])
        out[str(shape)] = hbm.fit(cfg.hbm_generation, entry, cfg.kv_dtype(source.config.dtype), temp, False,
                                  cache.num_pages)
    return out


def _measured_memory(cfg: BuildConfig, meshes, executables, estimated: dict, dtype: str, pages: int) -> tuple:
    """The mesh entries with their memory figures, temp measured where the executables compiled here."""
    out = []
    for mesh in meshes:
        entry = estimated.get(mesh.name)
        temps = [e.cost.temp_bytes for e in executables if e.mesh == mesh.name and e.cost and e.cost.temp_bytes]
        if entry is not None and mesh.compiled_here and temps:
            entry = hbm.fit(entry.generation, mesh, dtype, max(temps), True, pages)
        out.append(dataclasses.replace(mesh, hbm=entry))
    return tuple(out)


def _build_into(tmp: Path, cfg: BuildConfig, source: ModelSource, cache: CacheShape, plans, digest,
                report, memory: dict, calibration: str | None) -> fmt.Manifest:
    model = source.config
    for sub in ("weights", "exec", "probes"):
        (tmp / sub).mkdir()
    local = jax.devices()
    here = {str(s): local[0].platform in cfg.platforms and s.num_devices <= len(local) for s in cfg.meshes}
    written: set = set()
    weight_files = 0 if cfg.executables_only else sum(
        len(w.layers) or 1 for s in cfg.meshes for w in cfg.specs(model, s).values())
    compiled = sum(len(plans[m]) for m in plans if here[m])
    report.start(sum(len(b) for b in plans.values()), compiled, 0 if cfg.executables_only else compiled,
                 weight_files, cfg.jobs)
    meshes = tuple(_mesh_entry(tmp, cfg, source, s, here[str(s)], cache, written, report) for s in cfg.meshes)
    # Every entry is known before anything is exported, so an engine can compile each export as
    # soon as it is written while the next one is traced.
    manifest = fmt.Manifest(
        model=fmt.ModelEntry(model.to_json()), dtype=model.dtype, platforms=tuple(cfg.platforms),
        jax_version=jax.__version__, jaxlib_version=jax.lib.__version__,
        cache=fmt.CacheEntry(**dataclasses.asdict(cache)), meshes=meshes,
        executables=tuple(_entry(cfg, s, b, cache, here[str(s)]) for s in cfg.meshes for b in plans[str(s)]),
        fastload={}, files={},
        build=fmt.BuildInfo(inputs_hash=digest, created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                            token_ladder=tuple(cfg.token_ladder), max_seqs=cfg.max_seqs),
        weights_included=not cfg.executables_only, attention=cfg.attention_backend,
        tpu_device_kind=cfg.device_kind, logprobs=cfg.logprobs, tokenizer=None,
        weight_quantization=cfg.weight_quantization(model),
        kv_cache=None if calibration is None else fmt.KvCacheEntry(
            dtype=cfg.kv_dtype(model.dtype), k_scale=tuple(cfg.kv_scales[0]), v_scale=tuple(cfg.kv_scales[1]),
            calibration=calibration))
    platform = local[0].platform
    fast_dir = tmp / "fastload" / platform
    found: dict[tuple[str, Bucket], dict] = {}  # per executable, the fields the build fills in
    for shape, mesh_entry in zip(cfg.meshes, meshes):
        found |= {(mesh_entry.name, b): fields for b, fields in _build_mesh(
            tmp, manifest, mesh_entry, shape, plans[mesh_entry.name], source, cache, cfg, fast_dir, report).items()}
    manifest = dataclasses.replace(manifest, executables=tuple(
        dataclasses.replace(e, **found[(e.mesh, e.bucket)]) for e in manifest.executables))
    manifest = dataclasses.replace(manifest, meshes=_measured_memory(cfg, manifest.meshes, manifest.executables, memory,
                                                                    manifest.kv_dtype, cache.num_pages))
    if cfg.fast_load and any(here.values()):
        again = _compile_in_mesh_processes(tmp, manifest, fast_dir, cfg.jobs, report) if platform == "cpu" else ()
        files = tuple(sorted(f.relative_to(tmp).as_posix() for f in fast_dir.rglob("*") if f.is_file()))
        manifest = dataclasses.replace(manifest, fastload={platform: fmt.FastLoadEntry(
            jax_version=jax.__version__, jaxlib_version=jax.lib.__version__, files=files,
            process_devices=len(jax.devices()), mesh_processes=again or None)})
    tokenizer, original_max_length = _copy_tokenizer(tmp, source, cache.pages_per_seq * cache.page_size)
    manifest = dataclasses.replace(manifest, tokenizer=tokenizer, tokenizer_model_max_length=original_max_length)
    if cfg.tf_savedmodel:
        manifest = dataclasses.replace(manifest, tf_savedmodel=write_savedmodel(tmp, manifest, model, cfg.meshes,
                                                                                cfg.platforms))
    return _checksum(tmp, manifest)


DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\d+")


def _compile_in_mesh_processes(tmp: Path, manifest: fmt.Manifest, fast_dir: Path, jobs: int, report) -> tuple[str, ...]:
    """Each CPU mesh smaller than this process compiled again, into the same fast-load cache, in a
    child process holding just its devices (export/mesh_compile.py says why); the meshes done."""
    local = len(jax.devices())
    meshes = [m for m in manifest.meshes if m.compiled_here and m.devices < local]
    if not meshes:
        return ()
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=tmp.parent, delete=False) as f:
        json.dump(manifest.to_json(), f)
    package_root = str(Path(__file__).resolve().parents[1])
    try:
        for m in meshes:
            t0 = time.perf_counter()
            flags = DEVICE_COUNT.sub("", os.environ.get("XLA_FLAGS", ""))
            env = os.environ | {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={m.devices}".strip(),
                                "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                            os.environ.get("PYTHONPATH")]))}
            done = subprocess.run([sys.executable, "-m", "export.mesh_compile", str(tmp), f.name, m.name,
                                   str(fast_dir), str(jobs)], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise BuildError(f"compiling mesh {m.name} in a process of {m.devices} devices for fast-load failed "
                                 f"(exit {done.returncode}): {done.stderr.strip()[-2000:]}")
            report.note(f"mesh {m.name}: compiled again in a process of {m.devices} device{'s' * (m.devices > 1)}, which serving it "
                        f"alone starts ({time.perf_counter() - t0:.1f} s)")
    finally:
        os.unlink(f.name)
    return tuple(m.name for m in meshes)


def _entry(cfg: BuildConfig, shape: MeshShape, bucket: Bucket, cache: CacheShape, here: bool) -> fmt.ExecutableEntry:
    batch = batch_shapes(shape.dp, bucket, cache, cfg.carry_seqs)
    return fmt.ExecutableEntry(mesh=str(shape), bucket=bucket, file=fmt.exec_path(str(shape), bucket.name),
                               compiled_here=here, export_seconds=0.0,
                               batch_shapes={k: tuple(v.shape) for k, v in batch.items()},
                               batch_dtypes={k: str(v.dtype) for k, v in batch.items()})


def _export(tmp: Path, cfg: BuildConfig, model, shape: MeshShape, mesh, bucket: Bucket, cache: CacheShape) -> dict:
    """Write one export; its entry's fields."""
    t0 = time.perf_counter()
    rel = fmt.exec_path(str(shape), bucket.name)
    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp / rel).write_bytes(export_one(model, shape, mesh, bucket, cache, cfg))
    return {"export_seconds": round(time.perf_counter() - t0, 3)}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _copy_tokenizer(tmp: Path, source: ModelSource, context: int) -> tuple[list[str] | None, int | None]:
    """The checkpoint's tokenizer files into `tokenizer/` (checksummed like every file): the
    runtime serves text with exactly the tokenizer the model was trained with. Its
    `model_max_length` becomes the artifact's context, the longest sequence the artifact serves,
    since tools that read it size prompts by it; the checkpoint's own value is returned for the
    manifest (None if it had none)."""
    if source.tokenizer_dir is None or not (source.tokenizer_dir / "tokenizer.json").is_file():
        return None, None
    (tmp / "tokenizer").mkdir()
    copied, original = [], None
    for name in TOKENIZER_FILES:
        if (source.tokenizer_dir / name).is_file():
            shutil.copyfile(source.tokenizer_dir / name, tmp / "tokenizer" / name)
            copied.append(f"tokenizer/{name}")
    config_path = tmp / "tokenizer" / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise BuildError(f"{source.tokenizer_dir / 'tokenizer_config.json'}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise BuildError(f"{source.tokenizer_dir / 'tokenizer_config.json'}: expected a JSON object")
        value = config.get("model_max_length")
        original = int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        config["model_max_length"] = context
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return copied, original


def _checksum(tmp: Path, manifest: fmt.Manifest) -> fmt.Manifest:
    files = {f.relative_to(tmp).as_posix(): fmt.sha256_file(f)
             for f in sorted(tmp.rglob("*")) if f.is_file() and f.name != fmt.MANIFEST}
    executables = tuple(dataclasses.replace(e, sha256=files[e.file]) for e in manifest.executables)
    return dataclasses.replace(manifest, files=files, executables=executables)


def _build_mesh(tmp: Path, manifest: fmt.Manifest, mesh_entry: fmt.MeshEntry, shape: MeshShape, buckets,
                source: ModelSource, cache: CacheShape, cfg: BuildConfig, fast_dir: Path, report) -> dict:
    """Export every bucket of one mesh; where the mesh exists here, compile each export exactly as
    the runtime will (filling the fast-load cache), record what it costs, run it on its probe and
    check that against the reference step. Returns each bucket's ExecutableEntry fields.

    The work overlaps: an export is handed to the compile pool as soon as it is written, while
    the next one is traced (tracing holds the GIL, XLA's compiler does not), and each executable is
    reported as it finishes, in whatever order that is."""
    model, name = source.config, mesh_entry.name
    found: dict[Bucket, dict] = {}
    if not mesh_entry.compiled_here:
        mesh = abstract_mesh(shape, cfg.device_kind)
        for bucket in buckets:
            found[bucket] = _export(tmp, cfg, model, shape, mesh, bucket, cache)
            report.exported(name, bucket)
        return found
    mesh = make_mesh(shape)
    engine = rt_engine.Engine(tmp, manifest, mesh_entry, mesh)
    probes = {} if cfg.executables_only else {
        b: make_probe(b, shape.dp, model.vocab_size, cache.page_size, cache.pages_per_seq, carry_seqs=cfg.carry_seqs)
        for b in buckets}

    def compile_and_cost(bucket):
        t0 = time.perf_counter()
        compiled = engine.compile_one(bucket)
        seconds = time.perf_counter() - t0
        cost = _analysis(compiled)
        report.compiled(name, bucket)
        return bucket, compiled, {"compile_seconds": round(seconds, 3), "cost": cost}

    if cfg.fast_load:
        fast_dir.mkdir(parents=True, exist_ok=True)
    earlier = set(fast_dir.iterdir()) if cfg.fast_load else set()  # other meshes' executables
    pool = ThreadPoolExecutor(max_workers=max(1, cfg.jobs))
    try:
        with rt_engine.compilation_cache_at(fast_dir if cfg.fast_load else None, write=True):
            # The reference step compiles first, beside the first exports (tracing compiles nothing);
            # the cache is open for it too, and what it writes there is removed below.
            reference = None if cfg.executables_only else pool.submit(
                _reference_step, source, shape, mesh, [groups for groups, _ in probes.values()], cache,
                cfg.logprobs, engine.abstract_args(buckets[0])[0], cfg.specs(model, shape), cfg.kv_quant(model))
            futures = []
            for bucket in buckets:
                found[bucket] = _export(tmp, cfg, model, shape, mesh, bucket, cache)
                report.exported(name, bucket)
                futures.append(pool.submit(compile_and_cost, bucket))
            for future in futures:
                bucket, compiled, fields = future.result()
                engine.install(bucket, compiled)
                found[bucket] |= fields
            reference = None if reference is None else reference.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if cfg.fast_load:
        _keep_only_executables(fast_dir, buckets, earlier)
    if cfg.executables_only:
        return found
    engine.load_weights()
    engine.reset_cache()
    for bucket in buckets:
        found[bucket] |= _probe(tmp, engine, bucket, probes[bucket], source, reference)
        report.verified(name, bucket)
    for bucket in buckets:  # timed once every reference step has run, on a quiet process
        found[bucket]["step_seconds"] = {mesh.devices.flat[0].platform: step_seconds(engine, bucket)}
        report.timed(name, bucket)
    return found


def _keep_only_executables(fast_dir: Path, buckets, earlier: set[Path]) -> None:
    """The fast-load section holds the artifact's executables and nothing else: of what this mesh's
    compiles added (files not in `earlier`, which are other meshes'), the entries not named after
    one of its executables' modules go: the reference step's, compiled while the cache was open."""
    mine = tuple(module_name(b.name) + "-" for b in buckets)
    for f in set(fast_dir.iterdir()) - earlier:
        if f.is_file() and not f.name.startswith(mine):
            f.unlink()


def _finish(tmp: Path, out: Path, manifest: fmt.Manifest) -> None:
    """Write the manifest last, then swap the directory into place."""
    fmt.write_json_atomic(tmp / fmt.MANIFEST, manifest.to_json())
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
