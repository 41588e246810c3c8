"""Every weight declared once (shape, sharding, HF source), and loaders that place them on a mesh.

Weights are kept in a "placed" layout that fits the mesh evenly:
  * the vocab of lm_head and the dense-MLP width are zero-padded to a multiple of tp,
  * experts are split over some mesh axes and their intermediate width over the rest (the expert
    layout, see ExpertLayout); experts are zero-padded to a multiple of their shards and the width
    to a multiple of its shards (padded experts are never routed to),
  * kv heads fewer than tp are repeated so each tensor shard holds the kv head its q heads use.
Zero padding is exact: padded logits are sliced off, silu(0) * 0 contributes nothing.
With `quantize="int8"` the projections are declared as int8 values plus a `<name>.scale` weight of
per-output-channel scales (quantized_specs), both computed from the same checkpoint tensors.

Loading reads, for each device's shard, only the rows that shard needs (`make_array_from_callback`
over lazily opened safetensors), so no device ever sees, and the host never builds, a full copy of
a large expert stack.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open

from .config import ModelConfig
from .mesh import MeshShape

class WeightError(ValueError):
    """A checkpoint that lacks a tensor or holds one of the wrong shape."""


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def np_dtype(name: str):
    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "int8": np.int8}[name]


LANES = 128  # a TPU matrix unit's tile edge (v6e's is 256, which 128-aligned shapes half fill at worst)

# --expert-layout name -> (mesh axes the experts are split over, axes their intermediate width is split over)
EXPERT_LAYOUTS = {
    "width": ((), ("data", "tensor")),
    "ep-data": (("data",), ("tensor",)),
    "ep-tensor": (("tensor",), ("data",)),
    "ep": (("data", "tensor"), ()),
}


def _axes_spec(axes: tuple[str, ...]):
    """A PartitionSpec entry for a tuple of mesh axes."""
    return None if not axes else axes[0] if len(axes) == 1 else axes


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """Which mesh axes split the experts (expert parallelism) and which split their intermediate width.

    Every layout computes the same thing with the same collectives (tokens gathered in, partial sums
    reduced out): a device computes the pairs routed to its experts on its columns. They differ in
    the shape of each device's matmuls, and a TPU's matrix unit wastes the lanes of a width that is
    not a multiple of 128; the layout is chosen per (config, mesh) to fill them.
    """

    name: str
    expert_axes: tuple[str, ...]
    width_axes: tuple[str, ...]
    experts: int  # padded to a multiple of the expert shards
    width: int  # padded to a multiple of the width shards
    local_experts: int
    local_width: int

    @staticmethod
    def make(cfg: ModelConfig, mesh: MeshShape, name: str) -> "ExpertLayout":
        if name not in EXPERT_LAYOUTS:
            raise WeightError(f"expert layout {name!r} is not one of {', '.join(EXPERT_LAYOUTS)} (or auto)")
        expert_axes, width_axes = EXPERT_LAYOUTS[name]
        size = {"data": mesh.dp, "tensor": mesh.tp}
        ep = int(np.prod([size[a] for a in expert_axes]))
        wp = int(np.prod([size[a] for a in width_axes]))
        experts, width = round_up(cfg.num_experts, ep), round_up(cfg.moe_intermediate_size, wp)
        return ExpertLayout(name, expert_axes, width_axes, experts, width, experts // ep, width // wp)

    @property
    def shards(self) -> int:
        """How many devices split the experts (the rest split the width)."""
        return self.experts // self.local_experts

    def lane_fill(self, n: int | None = None) -> float:
        """The share of 128-lane tiles that hold real columns, for a dimension of n (default the local width)."""
        n = self.local_width if n is None else n
        return n / round_up(n, LANES)

    def efficiency(self, cfg: ModelConfig) -> float:
        """Lane fill of the local width times the share of the stored expert weights that is real."""
        real = cfg.num_experts * cfg.moe_intermediate_size / (self.experts * self.width)
        return real * self.lane_fill()

    def specs(self):
        """PartitionSpecs of one layer's gate/up [E, H, I] and down [E, I, H]."""
        e, w = _axes_spec(self.expert_axes), _axes_spec(self.width_axes)
        return P(e, None, w), P(e, w, None)

    @staticmethod
    def choose(cfg: ModelConfig, mesh: MeshShape, name: str | None = None) -> "ExpertLayout":
        """`name`, or the layout whose matmuls fill the most lanes; among equals the one with the fewest
        expert shards, whose worst routing (every pair on one device) costs least."""
        if name not in (None, "auto"):
            return ExpertLayout.make(cfg, mesh, name)
        layouts = [ExpertLayout.make(cfg, mesh, n) for n in EXPERT_LAYOUTS]
        return max(layouts, key=lambda lay: (round(lay.efficiency(cfg), 6), -lay.shards))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Padded sizes for one mesh shape; the model and the loaders agree through this."""

    vocab: int  # lm_head columns, multiple of tp
    kv_heads: int  # kv heads after repetition, multiple of tp
    kv_repeat: int
    experts: ExpertLayout
    dense_width: int  # dense MLP intermediate, multiple of tp

    @property
    def expert_width(self) -> int:
        return self.experts.width

    @staticmethod
    def for_mesh(cfg: ModelConfig, mesh: MeshShape, expert_layout: str | None = None) -> "Layout":
        tp = mesh.tp
        if cfg.num_heads % tp:
            raise WeightError(
                f"num_attention_heads={cfg.num_heads} does not divide by tp={tp} (mesh {mesh}); "
                f"choose a mesh whose T divides {cfg.num_heads}")
        if cfg.num_kv_heads % tp == 0:
            kv_repeat = 1
        elif tp % cfg.num_kv_heads == 0:
            kv_repeat = tp // cfg.num_kv_heads
        else:
            raise WeightError(
                f"num_key_value_heads={cfg.num_kv_heads} neither divides by nor divides tp={tp} (mesh {mesh})")
        return Layout(
            vocab=round_up(cfg.vocab_size, tp),
            kv_heads=cfg.num_kv_heads * kv_repeat,
            kv_repeat=kv_repeat,
            experts=ExpertLayout.choose(cfg, mesh, expert_layout),
            dense_width=round_up(cfg.intermediate_size, tp),
        )


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One placed weight: its global shape, its sharding, and how to read it from an HF checkpoint.

    `hf` names the source tensor(s): `{e}` means one tensor per expert, stacked on the expert axis;
    `{layer}` with `layers` set means one tensor per layer, stacked on a new leading axis (the
    layer scan's axis, never sharded). `transpose`/`reshape` turn HF's [out, in] Linear layout into
    ours; `pad_axis` zero-pads and `repeat_axis` repeats (kv heads) on the way into the placed shape.
    Axis numbers count within one layer.
    """

    shape: tuple[int, ...]
    spec: P
    hf: str
    hf_shape: tuple[int, ...]
    transpose: bool = False
    reshape: tuple[int, ...] | None = None  # canonical shape after transpose
    pad_axis: int | tuple[int, ...] | None = None  # one axis or several
    repeat_axis: int | None = None
    repeat: int = 1
    per_expert: int = 0  # >0: stack this many per-expert tensors on axis 0
    layers: tuple[int, ...] = ()  # HF layer index of each entry of the leading axis
    dtype: str | None = None  # stored dtype; None: the build's
    quant: str | None = None  # "int8": int8 values of a quantized weight; "scale": that weight's scales
    contracted: tuple[int, ...] = ()  # with quant: the axes a scale spans (size 1 in the scale's shape)

    @property
    def pad_axes(self) -> tuple[int, ...]:
        return () if self.pad_axis is None else (self.pad_axis,) if isinstance(self.pad_axis, int) else self.pad_axis

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.layers else self.shape

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        if self.per_expert:
            return (self.per_expert,) + tuple(reversed(self.hf_shape) if self.transpose else self.hf_shape)
        if self.reshape:
            return self.reshape
        return tuple(reversed(self.hf_shape)) if self.transpose else self.hf_shape

    def hf_names(self, layer: int | None) -> list[str]:
        """The checkpoint tensors behind one layer of this weight."""
        base = self.hf.replace("{layer}", str(layer)) if layer is not None else self.hf
        return [base.format(e=e) for e in range(self.per_expert)] if self.per_expert else [base]


def weight_specs(cfg: ModelConfig, mesh: MeshShape, expert_layout: str | None = None, quantize: str = "none",
                 quantize_lm_head: bool = False) -> dict[str, WeightSpec]:
    """The whole model's weights, stacked per layer kind (the layer scan's layout). `expert_layout`:
    a name of EXPERT_LAYOUTS, or None / "auto" for ExpertLayout.choose's. `quantize` "int8": the
    projections (and with `quantize_lm_head` the embedding and lm_head) become int8 values plus
    per-output-channel scales (see quantized_specs)."""
    lay = Layout.for_mesh(cfg, mesh, expert_layout)
    H, V, hd = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    nq, nkv, E, Im, Id = cfg.num_heads, cfg.num_kv_heads, cfg.num_experts, cfg.moe_intermediate_size, cfg.intermediate_size
    rep = lay.kv_repeat
    every = tuple(range(cfg.num_layers))
    moe = tuple(i for i in every if cfg.is_moe_layer(i))
    dense = tuple(i for i in every if not cfg.is_moe_layer(i))

    def W(shape, spec, hf, hf_shape, layers=(), **kw):
        if layers:
            shape, spec = (len(layers),) + shape, P(None, *spec)
        return WeightSpec(shape, spec, hf, hf_shape, layers=layers, **kw)

    pre, ex = "model.layers.{layer}.", "model.layers.{layer}.mlp.experts.{e}."
    specs = {
        "embed": W((V, H), P(), "model.embed_tokens.weight", (V, H)),
        "final_norm": W((H,), P(), "model.norm.weight", (H,)),
        "lm_head": W((H, lay.vocab), P(None, "tensor"),
                     "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight",
                     (V, H), transpose=True, pad_axis=1),
        "layers.attn_norm": W((H,), P(), pre + "input_layernorm.weight", (H,), every),
        "layers.mlp_norm": W((H,), P(), pre + "post_attention_layernorm.weight", (H,), every),
        "layers.q_norm": W((hd,), P(), pre + "self_attn.q_norm.weight", (hd,), every),
        "layers.k_norm": W((hd,), P(), pre + "self_attn.k_norm.weight", (hd,), every),
        "layers.q_proj": W((H, nq, hd), P(None, "tensor", None), pre + "self_attn.q_proj.weight",
                           (nq * hd, H), every, transpose=True, reshape=(H, nq, hd)),
        "layers.k_proj": W((H, lay.kv_heads, hd), P(None, "tensor", None), pre + "self_attn.k_proj.weight",
                           (nkv * hd, H), every, transpose=True, reshape=(H, nkv, hd), repeat_axis=1, repeat=rep),
        "layers.v_proj": W((H, lay.kv_heads, hd), P(None, "tensor", None), pre + "self_attn.v_proj.weight",
                           (nkv * hd, H), every, transpose=True, reshape=(H, nkv, hd), repeat_axis=1, repeat=rep),
        "layers.o_proj": W((nq, hd, H), P("tensor", None, None), pre + "self_attn.o_proj.weight",
                           (H, nq * hd), every, transpose=True, reshape=(nq, hd, H)),
    }
    if moe:
        # Experts over some mesh axes, their intermediate width over the rest (ExpertLayout); both
        # zero-padded to fit their shards.
        ex_lay = lay.experts
        gate_spec, down_spec = ex_lay.specs()
        Ep, Ip = ex_lay.experts, ex_lay.width
        specs |= {
            "moe.router": W((H, E), P(), pre + "mlp.gate.weight", (E, H), moe, transpose=True),
            "moe.gate": W((Ep, H, Ip), gate_spec, ex + "gate_proj.weight",
                          (Im, H), moe, transpose=True, pad_axis=(0, 2), per_expert=E),
            "moe.up": W((Ep, H, Ip), gate_spec, ex + "up_proj.weight",
                        (Im, H), moe, transpose=True, pad_axis=(0, 2), per_expert=E),
            "moe.down": W((Ep, Ip, H), down_spec, ex + "down_proj.weight",
                          (H, Im), moe, transpose=True, pad_axis=(0, 1), per_expert=E),
        }
    if dense:
        specs |= {
            "dense.gate": W((H, lay.dense_width), P(None, "tensor"), pre + "mlp.gate_proj.weight",
                            (Id, H), dense, transpose=True, pad_axis=1),
            "dense.up": W((H, lay.dense_width), P(None, "tensor"), pre + "mlp.up_proj.weight",
                          (Id, H), dense, transpose=True, pad_axis=1),
            "dense.down": W((lay.dense_width, H), P("tensor", None), pre + "mlp.down_proj.weight",
                            (H, Id), dense, transpose=True, pad_axis=0),
        }
    return quantized_specs(specs, quantize, quantize_lm_head)


# ---------------------------------------------------------------------------------------------
# Weight-only int8: each output channel of a projection scaled by its absmax / 127 over the axes the
# matmul contracts, so a scale multiplies the matmul's output column and commutes with the sum,
# however the contracted axis is split over devices.

QUANTIZE = ("none", "int8")
SCALE = ".scale"  # a quantized weight `w`'s scales are the weight `w.scale`
# Per weight, the axes (within one layer) its matmul contracts; the rest are output channels. The
# embedding is a lookup: its "channels" are its rows (one scale per token), which is also what
# lm_head's scales are when the two are tied.
CONTRACTED = {"layers.q_proj": (0,), "layers.k_proj": (0,), "layers.v_proj": (0,), "layers.o_proj": (0, 1),
              "moe.gate": (1,), "moe.up": (1,), "moe.down": (1,),
              "dense.gate": (0,), "dense.up": (0,), "dense.down": (0,)}
LM_HEAD_CONTRACTED = {"embed": (1,), "lm_head": (0,)}


def quantized_specs(specs: dict[str, WeightSpec], quantize: str = "none", lm_head: bool = False
                    ) -> dict[str, WeightSpec]:
    """`specs` with each quantized weight declared as its int8 values and, beside it, `<name>.scale`:
    float32, the weight's shape with 1 on the contracted axes, sharded like the weight's output
    axes and replicated over the contracted ones. Both read the same checkpoint tensors."""
    if quantize not in QUANTIZE:
        raise WeightError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZE)}")
    if quantize == "none":
        return specs
    which = CONTRACTED | (LM_HEAD_CONTRACTED if lm_head else {})
    out = {}
    for name, spec in specs.items():
        if name not in which:
            out[name] = spec
            continue
        axes = which[name]
        off = 1 if spec.layers else 0
        shape = tuple(1 if ax - off in axes else n for ax, n in enumerate(spec.shape))
        parts = tuple(spec.spec) + (None,) * (len(spec.shape) - len(spec.spec))
        sharding = P(*(None if ax - off in axes else a for ax, a in enumerate(parts)))
        out[name] = dataclasses.replace(spec, dtype=quantize, quant=quantize, contracted=axes)
        out[name + SCALE] = dataclasses.replace(spec, shape=shape, spec=sharding, dtype="float32", quant="scale",
                                                contracted=axes)
    return out


def quantize_int8(block: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scales with size 1 on `axes`): symmetric, absmax / 127 over `axes`,
    rounded half to even. An all-zero channel (padding) gets scale 0 and values 0: exact zeros,
    no division by zero."""
    block = np.asarray(block, np.float32)
    scale = (np.max(np.abs(block), axis=axes, keepdims=True) / np.float32(127)).astype(np.float32)
    q = np.clip(np.round(block / np.where(scale > 0, scale, np.float32(1))), -127, 127)
    return q.astype(np.int8), scale


# ---------------------------------------------------------------------------------------------
# Reading a shard: map the placed index back to canonical rows, read only those, pad or repeat.

def _source_slice(spec: WeightSpec, index: tuple[slice, ...]):
    """For a placed index within one layer, the canonical index to read and how to finish each axis."""
    canon = spec.canonical_shape
    src, post = [], []
    for ax, (sl, n_placed) in enumerate(zip(index, spec.layer_shape)):
        a, b, _ = sl.indices(n_placed)
        if ax == spec.repeat_axis:
            lo, hi = a // spec.repeat, (b - 1) // spec.repeat + 1
            src.append(slice(lo, hi))
            post.append(("repeat", spec.repeat, a - lo * spec.repeat, b - a))
        elif ax in spec.pad_axes:
            src.append(slice(min(a, canon[ax]), min(b, canon[ax])))
            post.append(("pad", b - a))
        else:
            src.append(slice(a, b))
            post.append(None)
    return tuple(src), post


def _finish(block: np.ndarray, post) -> np.ndarray:
    for ax, op in enumerate(post):
        if op is not None and op[0] == "repeat":
            _, r, start, size = op
            block = np.take(np.repeat(block, r, axis=ax), np.arange(start, start + size), axis=ax)
        elif op is not None and block.shape[ax] < op[1]:
            widths = [(0, 0)] * block.ndim
            widths[ax] = (0, op[1] - block.shape[ax])
            block = np.pad(block, widths)
    return block


Reader = Callable[[str, WeightSpec, "int | None", tuple[slice, ...]], np.ndarray]
"""reads the canonical block `index` of one layer (None: not stacked) of weight `name`"""


def read_placed(name: str, spec: WeightSpec, read: Reader, layer: int | None,
                index: tuple[slice, ...], dtype: str) -> np.ndarray:
    """One layer's block of a placed weight (index within the layer), read straight from the source."""
    src, post = _source_slice(spec, index)
    if spec.quant:
        return _finish(_read_quantized(name, spec, read, layer, src), post)
    return _finish(read(name, spec, layer, src), post).astype(np_dtype(spec.dtype or dtype))


def _read_quantized(name: str, spec: WeightSpec, read: Reader, layer: int | None, src: tuple[slice, ...]):
    """The int8 values or the scales of canonical block `src`. A scale spans the whole contracted
    axis even where a shard holds part of it (moe.down's width, o_proj's heads), so the block is
    read over the full contracted axes, quantized, and cut back to `src`."""
    canon = spec.canonical_shape
    full = tuple(slice(0, canon[ax]) if ax in spec.contracted else s for ax, s in enumerate(src))
    base = name.removesuffix(SCALE) if spec.quant == "scale" else name
    q, scale = quantize_int8(read(base, spec, layer, full), spec.contracted)
    if spec.quant == "scale":
        return scale
    return q[tuple(s if ax in spec.contracted else slice(None) for ax, s in enumerate(src))]


def place(specs: dict[str, WeightSpec], read: Reader, mesh, dtype: str) -> dict[str, jax.Array]:
    """Build every weight on `mesh`, each device's shard read straight from the source, layer by layer."""
    out = {}
    for name, spec in specs.items():
        def shard(index, name=name, spec=spec):
            if not spec.layers:
                return read_placed(name, spec, read, None, index, dtype)
            picked = spec.layers[index[0]]
            return np.stack([read_placed(name, spec, read, l, index[1:], dtype) for l in picked])

        out[name] = jax.make_array_from_callback(spec.shape, NamedSharding(mesh, spec.spec), shard)
    return out


def placed_numpy(specs: dict[str, WeightSpec], read: Reader, dtype: str):
    """Yield (name, position on the layer axis or None, full placed array of that layer), one at a
    time, for writing artifacts: a stacked expert weight is never held whole."""
    for name, spec in specs.items():
        whole = tuple(slice(0, n) for n in spec.layer_shape)
        if not spec.layers:
            yield name, None, read_placed(name, spec, read, None, whole, dtype)
        for pos, layer in enumerate(spec.layers):
            yield name, pos, read_placed(name, spec, read, layer, whole, dtype)


# ---------------------------------------------------------------------------------------------
# Sources: a Hugging Face safetensors directory, or deterministic random weights.

class HFCheckpoint:
    """Lazily opened safetensors files of an HF checkpoint (single file or index.json shards)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise WeightError(f"{self.dir}: no *.safetensors files and no model.safetensors.index.json")
            weight_map = {}
            for f in files:
                with safe_open(f, "numpy") as h:
                    weight_map |= {k: f.name for k in h.keys()}
        self.weight_map = weight_map
        self._handles = {}

    def _tensor(self, key: str):
        if key not in self.weight_map:
            raise WeightError(f"{self.dir}: checkpoint is missing tensor {key!r}")
        fname = self.weight_map[key]
        if fname not in self._handles:
            path = self.dir / fname
            if not path.is_file():
                raise WeightError(f"{self.dir}: index names {fname!r} for {key!r} but the file is missing")
            self._handles[fname] = safe_open(path, "numpy")
        return self._handles[fname].get_slice(key)

    def check(self, specs: dict[str, WeightSpec]) -> None:
        """Fail before any device work if a tensor is missing or misshapen, naming it."""
        for spec in specs.values():
            for layer in spec.layers or (None,):
                for key in spec.hf_names(layer):
                    found = tuple(self._tensor(key).get_shape())
                    if found != spec.hf_shape:
                        raise WeightError(
                            f"{self.dir}: tensor {key!r} has shape {list(found)}, expected {list(spec.hf_shape)}")

    def read(self, name: str, spec: WeightSpec, layer: int | None, src: tuple[slice, ...]) -> np.ndarray:
        keys = spec.hf_names(layer)
        if spec.per_expert:
            picked = keys[src[0]]
            if not picked:
                return np.zeros((0,) + tuple(s.stop - s.start for s in src[1:]), np.float32)
            return np.stack([self._read_one(key, spec, src[1:]) for key in picked])
        return self._read_one(keys[0], spec, src)

    def _read_one(self, key: str, spec: WeightSpec, src: tuple[slice, ...]) -> np.ndarray:
        t = self._tensor(key)
        if not spec.transpose:
            return np.asarray(t[src])
        if spec.reshape is not None and not spec.per_expert:
            return _read_heads(t, spec, src)
        hf_src = tuple(reversed(src))
        return np.asarray(t[hf_src]).T


def _read_heads(t, spec: WeightSpec, src: tuple[slice, ...]) -> np.ndarray:
    """A block of a head-split projection, reading only the HF rows or columns of its heads.

    HF stores q/k/v as [heads*hd, in] and o as [out, heads*hd]; ours are [in, heads, hd] and
    [heads, hd, out]. A shard takes whole heads (hd is never split), a contiguous HF range.
    """
    canon = spec.reshape
    if canon[1] * canon[2] == spec.hf_shape[0]:  # q/k/v: [in, heads, hd]
        h, i, d = src
        hd = canon[2]
        block = np.asarray(t[i.start * hd:i.stop * hd, h]).T  # [in, heads*hd]
        return block.reshape(block.shape[0], i.stop - i.start, hd)[:, :, d]
    i, d, h = src  # o: [heads, hd, out]
    hd = canon[1]
    block = np.asarray(t[h, i.start * hd:i.stop * hd]).T  # [heads*hd, out]
    return block.reshape(i.stop - i.start, hd, block.shape[1])[:, d, :]


def random_reader(cfg: ModelConfig, seed: int) -> Reader:
    """Deterministic random canonical weights: the same numbers whatever the mesh.

    Each weight draws from its own seed (a hash of its name), so a shard can be generated without
    generating the rest, and norms sit near (not at) 1 and the router is sharp, as in a trained model.
    """
    import zlib

    def read(name: str, spec: WeightSpec, layer: int | None, src: tuple[slice, ...]) -> np.ndarray:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 0 if layer is None else layer + 1])
        shape = spec.canonical_shape
        if name.endswith("norm"):
            full = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith("router"):
            full = 1.0 * rng.standard_normal(shape)
        elif name == "embed":
            full = rng.standard_normal(shape)
        else:
            fan_in = np.prod(shape[:-1]) if name.endswith("o_proj") else shape[1 if spec.per_expert else 0]
            full = rng.standard_normal(shape) / np.sqrt(fan_in)
        return full.astype(np.float32)[src]

    return read
