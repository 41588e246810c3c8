"""Load an artifact and make every executable ready; afterwards serving compiles nothing.

Load order: manifest (format version) -> checksums of every file -> platform and device count ->
weights into their shardings -> executables (fast-load cache when it was built for exactly this
platform and jax version, else compile the portable exports, several at a time) -> zeroed KV cache.
A `jax.monitoring` listener counts backend compilations; `compiles_after_load` is reported with
every run and should always be 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open

from . import cpu_kernel
from . import format as fmt
from .batching import WIRE_SHARDED_AS, advance_ints, from_sampled, to_wire, wire_layout, wire_shapes
from .buckets import Bucket
from .capabilities import Capabilities

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class _CompileCounter:
    """Process-wide count of backend compilations (including persistent-cache hits)."""

    def __init__(self):
        self.count = 0
        self.cache_hits = 0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self.count += 1

    def _on_event(self, event, **kwargs):
        if event == CACHE_HIT_EVENT:
            with self._lock:
                self.cache_hits += 1


_counter: _CompileCounter | None = None


def _the_counter() -> _CompileCounter:
    global _counter
    if _counter is None:
        _counter = _CompileCounter()
    return _counter


def compile_count() -> int:
    return _the_counter().count


def _put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Host data onto a (possibly multi-host) sharding: each process places only its own shards."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _shard_shape(shape, index) -> tuple[int, ...]:
    return tuple(len(range(*sl.indices(n))) for sl, n in zip(index, shape))


@dataclasses.dataclass
class LoadInfo:
    mesh: str
    executables: int
    fast_load: bool  # the artifact's fast-load section matched this platform and jax
    fast_load_hits: int  # executables actually read from it (a different host layout misses)
    seconds: float
    fast_load_note: str = ""


@dataclasses.dataclass
class StreamState:
    """What one stream of steps leaves on the device for the next, and nothing else: the steps of
    a stream run in order, each donating the cache and carry it was given and returning new ones.
    `reset_cache` starts a new stream; `dispatch`, `dispatch_again` and `_call` are its only users."""

    cache: jax.Array | None = None  # the KV cache
    carry: jax.Array | None = None  # the last step's sampled tokens [dp, C]: a batch's `feed` reads them
    # {wire input: (host contents, device array)}: inputs already on the device, passed again when
    # the next step's are the same
    resident: dict = dataclasses.field(default_factory=dict)
    last_bucket: Bucket | None = None  # of the last dispatch, and whether its
    advanced: bool = False  # resident ints are advanced one position (dispatch_again repeats it)


class Engine:
    """A loaded artifact on this machine's devices: weights, ready executables, the KV cache."""

    def __init__(self, root: Path, manifest: fmt.Manifest, mesh_entry: fmt.MeshEntry, mesh: Mesh):
        """Nothing is read or compiled yet: the builder runs an engine over the artifact it is
        writing (its manifest not yet on disk) exactly as the loader does over a finished one."""
        self.root, self.manifest, self.mesh_entry, self.mesh = Path(root), manifest, mesh_entry, mesh
        cache = manifest.cache
        self.dp = mesh_entry.dp
        self.vocab_size = manifest.model.vocab_size
        self.num_logprobs = manifest.logprobs
        self.page_size, self.num_pages, self.pages_per_seq = cache.page_size, cache.num_pages, cache.pages_per_seq
        self.entries: dict[Bucket, fmt.ExecutableEntry] = {e.bucket: e
                                                           for e in manifest.executables_of(mesh_entry.name)}
        self.buckets = sorted(self.entries)
        # Bytes each executable's collectives move per step, measured at build: what `choose` weighs.
        self.bucket_cost = {b: e.cost.collective_bytes for b, e in self.entries.items() if e.cost is not None} or None
        self._wire_shardings = {k: NamedSharding(mesh, fmt.spec_from_json(mesh_entry.batch_specs[v]))
                                for k, v in WIRE_SHARDED_AS.items()}
        # Seconds per step, measured at build on this platform: how the scheduler sizes prefill steps.
        platform = mesh.devices.flat[0].platform
        timed = {b: (e.step_seconds or {}).get(platform) for b, e in self.entries.items()}
        self.step_seconds = timed if timed and all(t is not None for t in timed.values()) else None
        self.compiled: dict[Bucket, jax.stages.Compiled] = {}
        self._single_process = jax.process_count() == 1
        self.weights = None
        self.stream = StreamState()  # what the last step left on the device for the next
        self.transfers: dict[str, int] = {}  # how many times each input was sent: a steady decode step sends none
        self.repeats = 0  # steps launched by dispatch_again
        self._layouts: dict[Bucket, dict] = {}
        self.load_info: LoadInfo | None = None
        self._compiles_after_load = 0

    # ---------------------------------------------------------------- executables

    def executable(self, bucket: Bucket) -> jax.stages.Compiled:
        """The ready executable of `bucket` (KeyError if it isn't compiled or installed)."""
        return self.compiled[bucket]

    def install(self, bucket: Bucket, compiled) -> None:
        """Make `compiled` (anything called as (weights, cache, batch) -> (outputs, cache)) the one
        `run` calls for `bucket`: the builder installs what it just compiled and timed, a baseline
        installs a jitted step."""
        self.compiled[bucket] = compiled

    # ---------------------------------------------------------------- serving

    @property
    def cache(self) -> jax.Array | None:
        return self.stream.cache

    @property
    def carry(self) -> jax.Array | None:
        return self.stream.carry

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(pipelined=True, repeats=True, num_logprobs=self.num_logprobs,
                            bucket_cost=self.bucket_cost, step_seconds=self.step_seconds)

    @property
    def compiles_after_load(self) -> int:
        """Backend compilations that happened inside this engine's own calls since load."""
        return self._compiles_after_load

    def run(self, bucket: Bucket, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One step on a ready executable: {"tokens", "logprobs" [dp, seqs]; "top_ids", "top_logprobs"
        [dp, seqs, N]} as numpy. The cache is donated."""
        return self.fetch(self.dispatch(bucket, batch))

    def dispatch(self, bucket: Bucket, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Launch one step and return at once (JAX dispatch is asynchronous): its outputs are still
        being computed. The executable takes `prev_tokens` from the previous step's carry, on the
        device, whatever the host batch holds there; a batch without `feed` takes no token from it."""
        wire = to_wire(batch)
        placed = self._place(wire)
        self.stream.resident = {k: (wire[k], placed[k]) for k in wire}
        if bucket not in self._layouts:  # from the batch: an installed step may serve any shape
            self._layouts[bucket] = wire_layout({k: np.shape(v) for k, v in batch.items()}
                                                | {"feed": np.shape(batch["tokens"])})
        return self._call(bucket)

    def dispatch_again(self, bucket: Bucket) -> dict[str, jax.Array] | None:
        """Launch the last dispatched batch again, every real token one position on, from what is
        already on the device: the scheduler's steady decode step, with nothing planned, packed or
        sent. None when the last step was another bucket's or its executable does not return
        next_ints (an artifact built before it)."""
        if self.stream.last_bucket != bucket or not self.stream.advanced:
            return None
        self.repeats += 1
        return self._call(bucket)

    def _call(self, bucket: Bucket) -> dict[str, jax.Array]:
        """Run `bucket` on the resident inputs and the carry. Its `next_ints` (absent from an
        artifact built before it existed) becomes the resident ints, with their host contents
        advanced alike, for the next step to take or compare against."""
        before = compile_count()
        st = self.stream
        args = {k: device for k, (_, device) in st.resident.items()} | {"prev_tokens": st.carry}
        out, st.cache = self.compiled[bucket](self.weights, st.cache, args)
        st.carry = out.pop("carry")
        next_ints = out.pop("next_ints", None)
        st.last_bucket, st.advanced = bucket, next_ints is not None
        if next_ints is not None:
            ints, num_tokens = st.resident["ints"][0], st.resident["num_tokens"][0]
            st.resident["ints"] = (advance_ints(ints, num_tokens, self._layouts[bucket]), next_ints)
        self._compiles_after_load += compile_count() - before
        return out

    def fetch(self, outputs: dict[str, jax.Array]) -> dict[str, np.ndarray]:
        """A dispatched step's outputs as numpy (waits for it). Replicated: every host has all of
        it, a few bytes per sequence."""
        before = compile_count()
        out = {k: np.asarray(v.addressable_data(0)) for k, v in outputs.items()}
        if "sampled" in out:  # the shipped step returns its sampled outputs packed in one array
            out |= from_sampled(out.pop("sampled"))
        self._compiles_after_load += compile_count() - before
        return out

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A step's host arrays, packed as the executable takes them (runtime.batching.to_wire),
        onto their shardings (each process places only its own shards)."""
        return self._put_wire(to_wire(batch))

    def _place(self, wire: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The wire arrays on the device: an array already there with the same contents (the last
        step's, or what it computed for this one) is passed again, the rest are sent."""
        placed, send = {}, {}
        for k, host in wire.items():
            kept = self.stream.resident.get(k)
            if kept is not None and kept[0].shape == host.shape and np.array_equal(kept[0], host):
                placed[k] = kept[1]
            else:
                send[k] = host
        self.transfers.update({k: self.transfers.get(k, 0) + 1 for k in send})
        return placed | (self._put_wire(send) if send else {})

    def _put_wire(self, wire: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if self._single_process:  # one batched transfer for all inputs
            return jax.device_put(wire, {k: self._wire_shardings[k] for k in wire})
        return {k: _put(v, self._wire_shardings[k]) for k, v in wire.items()}

    def generate(self, prompts, max_new_tokens, padding_mode="auto", sampling=None, **options):
        """Serve prompts (see runtime.scheduler.generate for options); stats include compiles_after_load."""
        from .scheduler import generate

        before = self.compiles_after_load
        outputs, stats = generate(self, prompts, max_new_tokens, padding_mode=padding_mode, sampling=sampling,
                                  **options)
        stats["compiles_after_load"] = self.compiles_after_load - before
        return outputs, stats

    def reset_cache(self) -> None:
        """Zero the KV cache and the token carry (between independent runs)."""
        self.stream = StreamState(self.zero_cache(), self.zero_carry())

    # ---------------------------------------------------------------- loading

    def zero_cache(self) -> jax.Array:
        sharding = NamedSharding(self.mesh, fmt.spec_from_json(self.mesh_entry.cache_spec))
        shape, dtype = tuple(self.mesh_entry.cache_shape), np.dtype(jax.numpy.dtype(self.manifest.kv_dtype))
        # Each device's zeros made on the host one shard at a time: the whole cache never is.
        return jax.make_array_from_callback(shape, sharding, lambda idx: np.zeros(_shard_shape(shape, idx), dtype))

    def zero_carry(self) -> jax.Array:
        """The sampled-token carry before any step: [dp, C] int32, sharded like the batch."""
        shape = tuple(next(iter(self.entries.values())).batch_shapes["prev_tokens"])
        sharding = self._wire_shardings["prev_tokens"]
        return jax.make_array_from_callback(shape, sharding, lambda idx: np.zeros(_shard_shape(shape, idx), np.int32))

    def load_weights(self):
        if not self.manifest.weights_included:
            raise fmt.ArtifactError(f"{self.root}: built with --executables-only, so it holds no weights and "
                                    "cannot serve; build it again without --executables-only")
        self.weights = {name: self._load_weight(name, w) for name, w in self.mesh_entry.weights.items()}

    def _load_weight(self, name: str, w: fmt.WeightEntry) -> jax.Array:
        """One weight into its sharding; a stacked weight has one file per layer, read per shard."""
        shape = tuple(w.shape)
        per_file = shape[1:] if w.stacked else shape
        if len(w.files) != (shape[0] if w.stacked else 1):
            raise fmt.ArtifactError(f"{self.root / fmt.MANIFEST}: weight {name!r} lists {len(w.files)} files "
                                    f"for shape {list(shape)}")
        tensors = []
        for rel in w.files:
            path = fmt.resolve(self.root, rel)
            tensor = safe_open(path, "numpy").get_slice("tensor")
            if tuple(tensor.get_shape()) != per_file:
                raise fmt.ArtifactError(f"{path}: tensor shape {tensor.get_shape()}, manifest says {list(per_file)}")
            tensors.append(tensor)

        def shard(idx):
            if not w.stacked:
                return tensors[0][idx]
            return np.stack([t[idx[1:]] for t in tensors[idx[0]]])

        return jax.make_array_from_callback(shape, NamedSharding(self.mesh, fmt.spec_from_json(w.spec)), shard)

    def abstract_args(self, bucket: Bucket):
        """The executable's arguments as shapes and shardings, from the manifest alone."""
        ns = lambda spec: NamedSharding(self.mesh, fmt.spec_from_json(spec))  # noqa: E731
        sds = lambda shape, dtype, spec: jax.ShapeDtypeStruct(tuple(shape), jax.numpy.dtype(dtype), sharding=ns(spec))  # noqa: E731
        weights = {k: sds(w.shape, w.dtype, w.spec) for k, w in self.mesh_entry.weights.items()}
        cache = sds(self.mesh_entry.cache_shape, self.manifest.kv_dtype, self.mesh_entry.cache_spec)
        wire = wire_shapes(self.entries[bucket].batch_shapes)
        batch = {k: sds(shape, dtype, self.mesh_entry.batch_specs[WIRE_SHARDED_AS[k]])
                 for k, (shape, dtype) in wire.items()}
        return weights, cache, batch

    def compile_one(self, bucket: Bucket) -> jax.stages.Compiled:
        """Deserialize one portable export and compile it for these devices (the cache donated)."""
        if self.manifest.attention == "cpu":  # its executables call the C++ kernels by name
            try:
                cpu_kernel.register()
            except cpu_kernel.KernelUnavailable as e:
                raise fmt.ArtifactError(f"{self.root}: built with --attention cpu: {e}") from None
        entry = self.entries[bucket]
        path = fmt.resolve(self.root, entry.file)
        try:
            exported = jax.export.deserialize(bytearray(path.read_bytes()))
        except Exception as e:  # a corrupted file that still matched its checksum, or a newer jax format
            raise fmt.ArtifactError(f"{path}: cannot deserialize with jax {jax.__version__} ({e})") from None
        check_cache_input(path, exported, self.manifest.kv_dtype)
        call = lambda *args: exported.call(*args)  # noqa: E731
        call.__name__ = bucket.name.replace("-", "_")  # the compiled module's name: profiles tell steps apart
        return jax.jit(call, donate_argnums=(1,)).lower(*self.abstract_args(bucket)).compile()

    def compile_all(self, jobs: int):
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for bucket, compiled in zip(self.buckets, pool.map(self.compile_one, self.buckets)):
                self.install(bucket, compiled)


def check_cache_input(path: Path, exported, kv_dtype: str) -> None:
    """The export's KV cache argument must have the manifest's KV dtype: an executable from another
    build would read the cache's bytes as another type."""
    (_, cache, _), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)  # (weights, cache, batch)
    if str(cache.dtype) != kv_dtype:
        raise fmt.ArtifactError(f"{path}: its KV cache input is {cache.dtype} but the manifest says the cache is "
                                f"{kv_dtype}; this executable is from another build: build the artifact again")


def check_platform(root: Path, manifest: fmt.Manifest, devices) -> None:
    """Exports run only on the platforms they were lowered for, and the fa kernel only on the TPU
    generation it was tuned for."""
    platform = devices[0].platform
    if platform not in manifest.platforms:
        raise fmt.ArtifactError(f"{root}: built for platforms {list(manifest.platforms)}, this machine is {platform}")
    kind = manifest.tpu_device_kind
    if devices[0].platform == "tpu" and kind and devices[0].device_kind != kind:
        raise fmt.ArtifactError(f"{root}: built for {kind} (--tpu-generation), this machine's TPUs are "
                                f"{devices[0].device_kind}; build again for this generation")


def _pick_mesh(root: Path, manifest: fmt.Manifest, devices, mesh: str | None) -> fmt.MeshEntry:
    names = ", ".join(f"{m.name} ({m.devices} devices)" for m in manifest.meshes)
    if mesh is not None:
        chosen = manifest.mesh(mesh)
        if chosen is None:
            raise fmt.ArtifactError(f"{root}: no mesh {mesh} in this artifact; it has {names}")
    else:
        fitting = [m for m in manifest.meshes if m.devices <= len(devices)]
        if not fitting:
            raise fmt.ArtifactError(
                f"{root}: built for meshes {names}; this machine has {len(devices)} "
                f"{devices[0].platform} devices")
        chosen = max(fitting, key=lambda m: m.devices)
    if chosen.devices > len(devices):
        raise fmt.ArtifactError(f"{root}: mesh {chosen.name} needs {chosen.devices} devices, "
                                f"this machine has {len(devices)} {devices[0].platform} devices")
    return chosen


@contextlib.contextmanager
def compilation_cache_at(directory: Path | None, write: bool = False):
    """Compile through a persistent compilation cache in `directory` (None: no cache).

    The builder fills it (write=True) and the loader reads it; both must compile with identical
    options, so XLA's own side caches, whose directory would end up in the cache key, stay off.
    """
    if directory is None:
        yield
        return
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
    if write:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.set_cache_dir(str(directory))
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()


def _fast_load_dir(root: Path, manifest: fmt.Manifest, platform: str, mesh=None) -> tuple[Path | None, str]:
    """A private copy of the fast-load cache if it matches this platform and jax exactly, and holds
    `mesh`'s executables (a MeshEntry; None: the whole section) for this process's device count."""
    section = manifest.fastload.get(platform)
    if not section:
        return None, f"no fast-load section for {platform}"
    if section.jax_version != jax.__version__ or section.jaxlib_version != jax.lib.__version__:
        return None, (f"fast-load built with jax {section.jax_version}, this is {jax.__version__}; "
                      f"compiling the portable exports instead")
    here = len(jax.devices(platform))
    if not section.serves(mesh, here):
        counts = [section.process_devices] + ([mesh.devices] if mesh is not None and mesh.name in
                                              (section.mesh_processes or ()) else [])
        fix = (" or ".join(f"XLA_FLAGS=--xla_force_host_platform_device_count={n}" for n in counts)
               if platform == "cpu" else "`python -m export warm` on a host like this one")
        return None, (f"fast-load compiled in a process with {section.process_devices} {platform} devices, this one "
                      f"has {here} (XLA keys its cache by the host's device topology): compiling the portable "
                      f"exports instead; run with {fix} to load without compiling")
    private = Path(tempfile.mkdtemp(prefix="aot-fastload-"))
    for rel in section.files:
        # verified by checksum in load() before we get here; copy so serving never writes there
        shutil.copy(fmt.resolve(root, rel), private / Path(rel).name)
    return private, "fast-load cache matched"


def load(path: str | Path, *, mesh: str | None = None, devices=None, jobs: int = 4,
         fast_load: bool = True, kv_cache_dtype: str | None = None) -> Engine:
    """Read, verify and make ready an artifact. Raises ArtifactError naming the file at fault.
    kv_cache_dtype: what the caller expects the artifact's KV cache to be (refused if it isn't)."""
    t0 = time.perf_counter()
    compile_count()  # start counting before anything compiles
    root = Path(path)
    manifest = fmt.read_manifest(root)
    fmt.check_kv_request(root, manifest, kv_cache_dtype)
    fmt.verify_all(root, manifest)
    devices = list(jax.devices() if devices is None else devices)
    platform = devices[0].platform
    check_platform(root, manifest, devices)
    chosen = _pick_mesh(root, manifest, devices, mesh)
    dp, tp = chosen.shape
    grid = np.array(devices[: dp * tp]).reshape(dp, tp)
    engine = Engine(root, manifest, chosen, Mesh(grid, ("data", "tensor")))
    if not engine.buckets:
        raise fmt.ArtifactError(f"{root}: mesh {chosen.name} has no executables")
    engine.load_weights()
    engine.reset_cache()

    cache_dir, note = _fast_load_dir(root, manifest, platform, chosen) if fast_load else (None, "fast-load disabled")
    hits_before = _the_counter().cache_hits
    try:
        with compilation_cache_at(cache_dir):
            engine.compile_all(jobs)
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    hits = _the_counter().cache_hits - hits_before
    if cache_dir is not None and hits < len(engine.buckets):
        note = f"fast-load section matched jax, but {len(engine.buckets) - hits} executables were compiled here"
    engine.load_info = LoadInfo(chosen.name, len(engine.buckets), cache_dir is not None, hits,
                                time.perf_counter() - t0, note)
    return engine
