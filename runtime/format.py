"""The on-disk artifact format: the one module both the builder and the runtime use.

    <artifact>/manifest.json                      written last; its presence means "complete"
    <artifact>/weights/<name>-<sha12>.safetensors  one placed tensor (one layer of a stacked weight) per
                                                  file, shared across meshes; none for --executables-only
    <artifact>/exec/<DxT>/<bucket>.jax             jax.export serialization, one per (mesh, bucket)
    <artifact>/probes/<DxT>/<bucket>.safetensors   golden probe batch and its expected sampled outputs
    <artifact>/fastload/<platform>/...             optional persistent compilation cache

The runtime is the consumer that must stay compatible, so the format lives on its side. Every file
the manifest names is listed with its sha256 and is verified before it is used; paths are checked
to stay inside the artifact. Nothing here unpickles anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from .buckets import MODES, Bucket

FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class ArtifactError(Exception):
    """An artifact that is missing, corrupted, or not for this machine. The message says which file."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def spec_of(spec) -> tuple:
    """A PartitionSpec as a manifest's Spec: a tuple of None, axis names and tuples of them."""
    return tuple(tuple(a) if isinstance(a, (tuple, list)) else a for a in spec)


def spec_from_json(entry):
    """The PartitionSpec a manifest entry (its JSON list or its Spec tuple) describes."""
    from jax.sharding import PartitionSpec

    return PartitionSpec(*[tuple(a) if isinstance(a, (tuple, list)) else a for a in entry])


def mesh_name(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


def exec_path(mesh: str, bucket_name: str) -> str:
    return f"exec/{mesh}/{bucket_name}.jax"


def probe_path(mesh: str, bucket_name: str) -> str:
    return f"probes/{mesh}/{bucket_name}.safetensors"


def weight_path(name: str, digest: str) -> str:
    return f"weights/{name}-{digest[:12]}.safetensors"


def resolve(root: Path, rel: str) -> Path:
    """`root/rel`, refusing anything that would leave the artifact (absolute, .., symlinks out)."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not rel:
        raise ArtifactError(f"{root / MANIFEST}: path {rel!r} points outside the artifact directory")
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise ArtifactError(f"{root / MANIFEST}: path {rel!r} points outside the artifact directory")
    return full


def read_manifest(root: str | Path) -> "Manifest":
    """The artifact's manifest, every field checked; raises ArtifactError naming the field at fault."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (an incomplete or interrupted build leaves no manifest)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    return Manifest.from_json(data, Where(str(path)))


def verify_file(root: Path, manifest: "Manifest", rel: str) -> Path:
    """The verified path of a file the manifest lists; raises naming the file if it doesn't match."""
    full = resolve(root, rel)
    expected = manifest.files.get(rel)
    if expected is None:
        raise ArtifactError(f"{root / MANIFEST}: file {rel!r} is used but has no checksum in 'files'")
    if not full.is_file():
        raise ArtifactError(f"{full}: missing (listed in the manifest)")
    found = sha256_file(full)
    if found != expected:
        raise ArtifactError(f"{full}: sha256 {found[:16]}... does not match the manifest's {expected[:16]}... "
                            f"(corrupted or truncated)")
    return full


def verify_all(root: str | Path, manifest: "Manifest") -> None:
    root = Path(root)
    for rel in manifest.files:
        verify_file(root, manifest, rel)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ reading fields
#
# The manifest is read once, into the frozen dataclasses below, and every field is checked there:
# a wrong value fails at load with the file, the field's path and what was expected, never later
# as a KeyError inside the engine. Each dataclass field names its JSON kind in its metadata; one
# codec reads and writes them all, so what the builder writes reads back to the same JSON.


@dataclasses.dataclass(frozen=True)
class Where:
    """A place in a manifest, which every error names: the file and the field's path in it."""

    file: str = MANIFEST
    field: str = ""

    def key(self, name: str) -> Where:
        return Where(self.file, f"{self.field}.{name}" if self.field else name)

    def item(self, index: int | str) -> Where:
        return Where(self.file, f"{self.field}[{index!r}]")

    def error(self, expected: str, found: str) -> FieldError:
        return FieldError(self, expected, found)


class FieldError(ArtifactError):
    """A manifest field that is missing or of the wrong kind."""

    def __init__(self, where: Where, expected: str, found: str):
        super().__init__(f"{where.file}: field {where.field or '(top level)'}: expected {expected}, found {found}")
        self.where, self.expected, self.found = where, expected, found


_JSON_NAMES = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string", list: "list",
               dict: "object"}


def _found(value) -> str:
    text = json.dumps(value, default=repr)
    return f"{_JSON_NAMES.get(type(value), type(value).__name__)} {text[:60]}{'...' if len(text) > 60 else ''}"


@dataclasses.dataclass(frozen=True)
class Kind:
    """How one field is stored: what the error calls it, JSON -> value (checking), value -> JSON."""

    expected: str
    read: Callable[[Any, Where], Any]
    write: Callable[[Any], Any] = lambda v: v


def _scalar(types: tuple, expected: str) -> Kind:
    def read(v, where):
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise where.error(expected, _found(v))
        return v

    return Kind(expected, read)


STR = _scalar((str,), "a string")
INT = _scalar((int,), "an integer")
BOOL = _scalar((bool,), "true or false")
NUMBER = _scalar((int, float), "a number")


def _object(v, where: Where) -> dict:
    if not isinstance(v, dict):
        raise where.error("an object", _found(v))
    return v


def optional(kind: Kind) -> Kind:
    def read(v, where):
        try:
            return None if v is None else kind.read(v, where)
        except FieldError as e:
            if e.where != where:  # a field inside it: the error is already exact
                raise
            raise where.error(f"{e.expected} or null", e.found) from None

    return Kind(f"{kind.expected} or null", read, lambda v: None if v is None else kind.write(v))


def list_of(kind: Kind) -> Kind:
    def read(v, where):
        if not isinstance(v, list):
            raise where.error(f"a list ({kind.expected} each)", _found(v))
        return tuple(kind.read(x, where.item(i)) for i, x in enumerate(v))

    return Kind(f"a list ({kind.expected} each)", read, lambda v: [kind.write(x) for x in v])


def map_of(kind: Kind) -> Kind:
    expected = f"an object ({kind.expected} each)"

    def read(v, where):
        if not isinstance(v, dict):
            raise where.error(expected, _found(v))
        return {k: kind.read(x, where.item(k)) for k, x in v.items()}

    return Kind(expected, read, lambda v: {k: kind.write(x) for k, x in v.items()})


def record(cls) -> Kind:
    return Kind("an object", cls.from_json, lambda v: v.to_json())


AXES = "null, an axis name or a list of them"


def _read_axes(v, where):
    if v is None or isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise where.error(AXES, _found(v))
    return list_of(STR).read(v, where)


# A PartitionSpec as data: per dimension None, one axis name, or several (a tuple).
SPEC = list_of(Kind(AXES, _read_axes, lambda a: list(a) if isinstance(a, tuple) else a))


def _read_mode(v, where):
    if not isinstance(v, str) or v not in MODES:
        raise where.error(f"one of {', '.join(map(repr, MODES))}", _found(v))
    return v


MODE = Kind(f"one of {', '.join(map(repr, MODES))}", _read_mode, str)


def _read_bucket(v, where) -> Bucket:
    d = _object(v, where)
    _no_other_keys(d, where, ("mode", "tokens", "seqs", "global_len"))
    return Bucket(_get(d, where, "mode", MODE), *(_get(d, where, k, INT) for k in ("tokens", "seqs", "global_len")))


BUCKET = Kind("an object", _read_bucket,
              lambda b: {"mode": str(b.mode), "tokens": b.tokens, "seqs": b.seqs, "global_len": b.global_len})

_REQUIRED = object()


def _get(d: dict, where: Where, key: str, kind: Kind, default=_REQUIRED):
    if key not in d:
        if default is _REQUIRED:
            raise where.key(key).error(kind.expected, "nothing (the field is missing)")
        return default
    return kind.read(d[key], where.key(key))


def _no_other_keys(d: dict, where: Where, known) -> None:
    # A key this runtime doesn't know would be dropped when the manifest is written back.
    other = [k for k in d if k not in known]
    if other:
        raise where.key(other[0]).error(f"only the fields {', '.join(known)}", "an unknown field")


def field(kind: Kind, *, omit_none: bool = False, **kwargs):
    """A manifest field of `kind`; `omit_none`: absent from the JSON while it is None (filled later)."""
    return dataclasses.field(metadata={"kind": kind, "omit_none": omit_none}, **kwargs)


class Record:
    """A frozen dataclass stored as one JSON object, its keys the field names in field order."""

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata["omit_none"]:
                continue
            out[f.name] = f.metadata["kind"].write(value)
        return out

    @classmethod
    def from_json(cls, d, where: Where = Where()):
        d = _object(d, where)
        fields = dataclasses.fields(cls)
        _no_other_keys(d, where, [f.name for f in fields])
        values = {}
        for f in fields:
            optional_key = f.metadata["omit_none"] or f.default is not dataclasses.MISSING \
                or f.default_factory is not dataclasses.MISSING
            if f.name in d or not optional_key:
                values[f.name] = _get(d, where, f.name, f.metadata["kind"])
        return cls(**values)


# ------------------------------------------------------------------------------------ the manifest

RECORD = dict(frozen=True, kw_only=True)


@dataclasses.dataclass(**RECORD)
class CacheEntry(Record):
    """The KV cache geometry every executable of the artifact was built for (per group)."""

    num_pages: int = field(INT)
    page_size: int = field(INT)
    pages_per_seq: int = field(INT)


# --kv-cache-dtype at serve time -> the cache dtype it names ("auto": whatever the artifact holds).
# The builder's choices are the same names (dp_attention.kv_cache), kept here so the runtime can
# check a request against an artifact without the model code.
KV_CACHE_DTYPE_NAMES = {"int8": "int8", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def check_kv_request(root: Path, manifest: "Manifest", kv_cache_dtype: str | None) -> None:
    """A --kv-cache-dtype asked at serve time can only confirm what the artifact was built with:
    the cache dtype is compiled into every executable."""
    if kv_cache_dtype in (None, "auto"):
        return
    want = KV_CACHE_DTYPE_NAMES.get(kv_cache_dtype)
    if want is None:
        raise ArtifactError(f"--kv-cache-dtype {kv_cache_dtype!r}: expected auto or one of "
                            f"{', '.join(KV_CACHE_DTYPE_NAMES)}")
    if want != manifest.kv_dtype:
        built = next((k for k, v in KV_CACHE_DTYPE_NAMES.items() if v == manifest.kv_dtype), "auto")
        raise ArtifactError(f"{root}: --kv-cache-dtype {kv_cache_dtype} asked, but this artifact's KV cache is "
                            f"{manifest.kv_dtype} (built with --kv-cache-dtype {built}); the cache dtype is compiled "
                            f"in: build it again with python -m export build --kv-cache-dtype {kv_cache_dtype}, or "
                            "serve without the flag")


@dataclasses.dataclass(**RECORD)
class KvCacheEntry(Record):
    """An 8-bit KV cache: its dtype and static scales, one K and one V per layer (a stored value
    times its scale is the K or V it holds), written into every executable at build. `calibration`
    says where the scales came from. Absent: the cache is in the artifact's `dtype`."""

    dtype: str = field(STR)
    k_scale: tuple[float, ...] = field(list_of(NUMBER))
    v_scale: tuple[float, ...] = field(list_of(NUMBER))
    calibration: str = field(STR)


@dataclasses.dataclass(**RECORD)
class WeightEntry(Record):
    """One weight of one mesh: its files (one per layer when stacked; none for executables-only
    builds), global shape, dtype and sharding."""

    files: tuple[str, ...] = field(list_of(STR))
    shape: tuple[int, ...] = field(list_of(INT))
    dtype: str = field(STR)
    spec: tuple = field(SPEC)
    stacked: bool = field(BOOL)


@dataclasses.dataclass(**RECORD)
class ExpertLayoutEntry(Record):
    """How a mesh holds the MoE experts: split over `expert_axes` (expert parallelism), their
    intermediate width over `width_axes`; what one device holds. The executables and the weight
    entries' specs already agree on it: this is for people and tools."""

    name: str = field(STR)
    expert_axes: tuple[str, ...] = field(list_of(STR))
    width_axes: tuple[str, ...] = field(list_of(STR))
    local_experts: int = field(INT)
    local_width: int = field(INT)


# Artifacts from before expert layouts were recorded held every expert on every device, its width
# split over all of them.
WIDTH_LAYOUT = "width"


@dataclasses.dataclass(**RECORD)
class HbmEntry(Record):
    """Per-device memory of one mesh on the TPU generation it was built for, against that chip's HBM.
    `temp_measured`: the executables' temp comes from compiling them here; else it is an estimate."""

    generation: str = field(STR)
    capacity_bytes: int = field(INT)
    weight_bytes: int = field(INT)
    kv_bytes: int = field(INT)
    temp_bytes: int = field(INT)
    temp_measured: bool = field(BOOL)
    page_bytes: int = field(INT)  # KV bytes per page of one group, per device
    max_pages_per_group: int = field(INT)  # the most pages per group (page 0 included) that fit

    @property
    def used_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.temp_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes


@dataclasses.dataclass(**RECORD)
class WeightQuantizationEntry(Record):
    """How the weights were quantized at build (`--quantize`). Each quantized weight `w` is stored as
    `dtype` values and its scales as the weight `w<scale_suffix>` (float32, size 1 on the axes the
    matmul contracts: one scale per output channel, the embedding's per row). Values are
    round-half-to-even(w / scale) clipped to +-127, scale = absmax over the contracted axes / 127.
    Artifacts without this field hold their weights unquantized."""

    dtype: str = field(STR)  # "int8"
    granularity: str = field(STR)  # "per-output-channel"
    scale_suffix: str = field(STR)
    weights: tuple[str, ...] = field(list_of(STR))  # the quantized weights' names
    lm_head: bool = field(BOOL)  # embedding and lm_head quantized too


@dataclasses.dataclass(**RECORD)
class MeshEntry(Record):
    """A device mesh the artifact was built for: its weights and every array's sharding."""

    name: str = field(STR)
    shape: tuple[int, int] = field(list_of(INT))
    devices: int = field(INT)
    compiled_here: bool = field(BOOL)
    axes: tuple[str, ...] = field(list_of(STR))
    weights: dict[str, WeightEntry] = field(map_of(record(WeightEntry)))
    cache_spec: tuple = field(SPEC)
    cache_shape: tuple[int, ...] = field(list_of(INT))
    batch_specs: dict[str, tuple] = field(map_of(SPEC))
    output_specs: dict[str, tuple] = field(map_of(SPEC))
    expert_layout: ExpertLayoutEntry | None = field(record(ExpertLayoutEntry), omit_none=True, default=None)
    hbm: HbmEntry | None = field(record(HbmEntry), omit_none=True, default=None)

    @property
    def dp(self) -> int:
        return self.shape[0]

    @property
    def experts(self) -> ExpertLayoutEntry | None:
        """The expert layout; for an artifact that predates the field, the one it was built with
        (every expert on every device, width split over all), read off its weights. None without MoE."""
        if self.expert_layout is not None:
            return self.expert_layout
        gate = self.weights.get("moe.gate")
        if gate is None:
            return None
        return ExpertLayoutEntry(name=WIDTH_LAYOUT, expert_axes=(), width_axes=tuple(self.axes),
                                 local_experts=gate.shape[1], local_width=gate.shape[-1] // self.devices)

    @classmethod
    def from_json(cls, d, where: Where = Where()) -> MeshEntry:
        entry = super().from_json(d, where)
        if len(entry.shape) != 2:
            raise where.key("shape").error("[data, tensor] (two integers)", _found(list(entry.shape)))
        return entry


@dataclasses.dataclass(**RECORD)
class Cost(Record):
    """What one executable costs per device, measured from its compiled HLO at build time; the
    memory figures are absent where XLA gives no memory analysis."""

    flops: float = field(NUMBER)
    xla_flops: float = field(NUMBER)
    collective_bytes: float = field(NUMBER)
    bytes_accessed: float = field(NUMBER)
    collectives: dict[str, int] = field(map_of(INT))
    argument_bytes: int | None = field(INT, omit_none=True, default=None)
    output_bytes: int | None = field(INT, omit_none=True, default=None)
    temp_bytes: int | None = field(INT, omit_none=True, default=None)
    code_bytes: int | None = field(INT, omit_none=True, default=None)
    alias_bytes: int | None = field(INT, omit_none=True, default=None)


@dataclasses.dataclass(**RECORD)
class ExecutableEntry(Record):
    """One serialized export for one (mesh, bucket). The fields after `batch_dtypes` are filled
    as the build goes on (compiled, probed, checksummed) and are absent when it didn't get there."""

    mesh: str = field(STR)
    bucket: Bucket = field(BUCKET)
    file: str = field(STR)
    compiled_here: bool = field(BOOL)
    export_seconds: float = field(NUMBER)
    batch_shapes: dict[str, tuple[int, ...]] = field(map_of(list_of(INT)))
    batch_dtypes: dict[str, str] = field(map_of(STR))
    compile_seconds: float | None = field(NUMBER, omit_none=True, default=None)
    cost: Cost | None = field(record(Cost), omit_none=True, default=None)
    probe: str | None = field(STR, omit_none=True, default=None)
    probe_max_error: float | None = field(NUMBER, omit_none=True, default=None)
    # Per platform it was timed on (a build with weights times it where it compiles it): median
    # seconds of one step on its probe batch, transfers included. The scheduler sizes prefill by it.
    step_seconds: dict[str, float] | None = field(map_of(NUMBER), omit_none=True, default=None)
    sha256: str | None = field(STR, omit_none=True, default=None)

    @property
    def mode(self) -> str:
        return self.bucket.mode

    def to_json(self) -> dict:
        d = super().to_json()
        return {"mesh": d.pop("mesh"), "mode": str(self.mode), **d}  # "mode" repeats the bucket's for readers

    @classmethod
    def from_json(cls, d, where: Where = Where()) -> ExecutableEntry:
        d = dict(_object(d, where))
        mode = _get(d, where, "mode", MODE)
        del d["mode"]
        entry = super().from_json(d, where)
        if mode != entry.bucket.mode:
            raise where.key("mode").error(f"the bucket's mode {str(entry.bucket.mode)!r}", _found(mode))
        return entry


@dataclasses.dataclass(**RECORD)
class FastLoadEntry(Record):
    """A persistent compilation cache for one platform, usable only with exactly these versions.
    `meshes` and `executables` say what `export warm` compiled (a build's own section lacks them).
    `process_devices`: how many devices the compiling process had. XLA keys its cache by the host's
    whole device topology, so a process with another count misses every entry (older sections
    lack it). `mesh_processes`: meshes whose executables were compiled again in a process holding
    just that mesh's devices, so a process of that size finds them too (a mesh runs slower in a
    process with more virtual CPU devices than it uses)."""

    jax_version: str = field(STR)
    jaxlib_version: str = field(STR)
    files: tuple[str, ...] = field(list_of(STR))
    meshes: tuple[str, ...] | None = field(list_of(STR), omit_none=True, default=None)
    executables: int | None = field(INT, omit_none=True, default=None)
    process_devices: int | None = field(INT, omit_none=True, default=None)
    mesh_processes: tuple[str, ...] | None = field(list_of(STR), omit_none=True, default=None)

    def serves(self, mesh, devices: int) -> bool:
        """Whether a process with `devices` devices finds `mesh`'s executables (a MeshEntry, or None
        for any mesh) in this section."""
        if self.process_devices is None or devices == self.process_devices:
            return True
        return mesh is not None and mesh.name in (self.mesh_processes or ()) and devices == mesh.devices


@dataclasses.dataclass(**RECORD)
class SavedModelEntry(Record):
    """The TensorFlow SavedModel beside the exports (1x1 builds with --tf-savedmodel)."""

    dir: str = field(STR)
    signatures: tuple[str, ...] = field(list_of(STR))
    warmup: str = field(STR)
    inputs: tuple[str, ...] = field(list_of(STR))
    outputs: tuple[str, ...] = field(list_of(STR))
    cache_shape: tuple[int, ...] = field(list_of(INT))
    platforms: tuple[str, ...] = field(list_of(STR))
    probe_max_error: dict[str, float] | None = field(map_of(NUMBER), omit_none=True, default=None)


@dataclasses.dataclass(**RECORD)
class BuildInfo(Record):
    """How the artifact was built: `inputs_hash` makes an identical rebuild a no-op."""

    inputs_hash: str = field(STR)
    created: str = field(STR)
    token_ladder: tuple[int, ...] = field(list_of(INT))
    max_seqs: int = field(INT)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """The model's config as the model code writes it (dp_attention.ModelConfig.to_json).

    It belongs to the model code, which rebuilds its config from `config`; the runtime, which has no
    model code, reads only the fields below, so only those are checked here.
    """

    config: dict

    CHECKED = {"name": STR, "vocab_size": INT, "num_layers": INT, "num_experts": INT}

    name = property(lambda self: self.config["name"])
    vocab_size = property(lambda self: self.config["vocab_size"])
    num_layers = property(lambda self: self.config["num_layers"])
    num_experts = property(lambda self: self.config["num_experts"])

    def to_json(self) -> dict:
        return dict(self.config)

    @classmethod
    def from_json(cls, d, where: Where = Where()) -> ModelEntry:
        d = _object(d, where)
        for key, kind in cls.CHECKED.items():
            _get(d, where, key, kind)
        return cls(dict(d))


@dataclasses.dataclass(**RECORD)
class Manifest(Record):
    """manifest.json: everything the runtime needs to know about an artifact, and its checksums."""

    format_version: int = field(INT, default=FORMAT_VERSION)
    model: ModelEntry = field(record(ModelEntry))
    dtype: str = field(STR)
    platforms: tuple[str, ...] = field(list_of(STR))
    jax_version: str = field(STR)
    jaxlib_version: str = field(STR)
    cache: CacheEntry = field(record(CacheEntry))
    meshes: tuple[MeshEntry, ...] = field(list_of(record(MeshEntry)))
    executables: tuple[ExecutableEntry, ...] = field(list_of(record(ExecutableEntry)))
    fastload: dict[str, FastLoadEntry] = field(map_of(record(FastLoadEntry)))
    files: dict[str, str] = field(map_of(STR))  # every file but the manifest -> its sha256
    build: BuildInfo = field(record(BuildInfo))
    weights_included: bool = field(BOOL)
    attention: str = field(STR)
    tpu_device_kind: str | None = field(optional(STR))
    logprobs: int = field(INT)
    tokenizer: tuple[str, ...] | None = field(optional(list_of(STR)))
    # The checkpoint's tokenizer_config.json `model_max_length`: the artifact's copy says the
    # artifact's context instead. Absent when the checkpoint gave none (and in older artifacts).
    tokenizer_model_max_length: int | None = field(INT, omit_none=True, default=None)
    tf_savedmodel: SavedModelEntry | None = field(record(SavedModelEntry), omit_none=True, default=None)
    weight_quantization: WeightQuantizationEntry | None = field(record(WeightQuantizationEntry), omit_none=True,
                                                                default=None)
    kv_cache: KvCacheEntry | None = field(record(KvCacheEntry), omit_none=True, default=None)

    @property
    def kv_dtype(self) -> str:
        """The KV cache's dtype: 8-bit where the build quantized it, else the build dtype."""
        return self.kv_cache.dtype if self.kv_cache is not None else self.dtype

    @classmethod
    def from_json(cls, d, where: Where = Where()) -> Manifest:
        # The version first: another version may differ in any field, so nothing else is checked.
        version = d.get("format_version") if isinstance(d, dict) else None
        if version != FORMAT_VERSION:
            raise ArtifactError(f"{where.file}: format_version is {version!r}, this runtime reads {FORMAT_VERSION}")
        return super().from_json(d, where)

    def mesh(self, name: str) -> MeshEntry | None:
        return next((m for m in self.meshes if m.name == name), None)

    def executables_of(self, mesh: str) -> list[ExecutableEntry]:
        return [e for e in self.executables if e.mesh == mesh]

    def cpu_devices_for(self, mesh: str | None) -> int:
        """The virtual CPU devices of one process serving `mesh` (None: the largest mesh): just its
        own where the build compiled it for such a process (fast-load `mesh_processes`), else the
        largest mesh's, the count the fast-load section was compiled with."""
        section = self.fastload.get("cpu")
        entry = self.mesh(mesh) if mesh is not None else None
        if entry is not None and section is not None and mesh in (section.mesh_processes or ()):
            return entry.devices
        return max((m.devices for m in self.meshes), default=8)
