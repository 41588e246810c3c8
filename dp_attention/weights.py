"""Every weight declared once (shape, sharding, HF source), and loaders that place them on a mesh.

Weights are kept in a "placed" layout that fits the mesh evenly:
  * the vocab of lm_head and the dense-MLP width are zero-padded to a multiple of tp,
  * experts are zero-padded to a multiple of dp*tp (padded experts are never routed to),
  * kv heads fewer than tp are repeated so each tensor shard holds the kv head its q heads use.
Zero padding is exact: padded logits are sliced off, silu(0) * 0 contributes nothing.

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

EXPERT_AXES = ("data", "tensor")


class WeightError(ValueError):
    """A checkpoint that lacks a tensor or holds one of the wrong shape."""


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def np_dtype(name: str):
    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[name]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Padded sizes for one mesh shape; the model and the loaders agree through this."""

    vocab: int  # lm_head columns, multiple of tp
    kv_heads: int  # kv heads after repetition, multiple of tp
    kv_repeat: int
    experts: int  # multiple of dp*tp
    dense_width: int  # dense MLP intermediate, multiple of tp

    @staticmethod
    def for_mesh(cfg: ModelConfig, mesh: MeshShape) -> "Layout":
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
            experts=round_up(max(cfg.num_experts, 1), mesh.num_devices),
            dense_width=round_up(cfg.intermediate_size, tp),
        )


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One placed weight: its global shape, its sharding, and how to read it from an HF checkpoint.

    `hf` names the source tensor(s); `{e}` in a name means one tensor per expert, stacked on axis 0.
    `transpose`/`reshape` turn HF's [out, in] Linear layout into ours; `pad_axis` zero-pads and
    `repeat_axis` repeats (kv heads) on the way into the placed shape.
    """

    shape: tuple[int, ...]
    spec: P
    hf: str
    hf_shape: tuple[int, ...]
    transpose: bool = False
    reshape: tuple[int, ...] | None = None  # canonical shape after transpose
    pad_axis: int | None = None
    repeat_axis: int | None = None
    repeat: int = 1
    per_expert: int = 0  # >0: stack this many per-expert tensors on axis 0

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        if self.per_expert:
            return (self.per_expert,) + tuple(reversed(self.hf_shape) if self.transpose else self.hf_shape)
        if self.reshape:
            return self.reshape
        return tuple(reversed(self.hf_shape)) if self.transpose else self.hf_shape


def weight_specs(cfg: ModelConfig, mesh: MeshShape) -> dict[str, WeightSpec]:
    """The whole model's weights, in the order a reader would expect."""
    lay = Layout.for_mesh(cfg, mesh)
    H, V, hd = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    nq, nkv, E, Im, Id = cfg.num_heads, cfg.num_kv_heads, cfg.num_experts, cfg.moe_intermediate_size, cfg.intermediate_size
    rep = lay.kv_repeat
    W = WeightSpec
    specs = {
        "embed": W((V, H), P(), "model.embed_tokens.weight", (V, H)),
        "final_norm": W((H,), P(), "model.norm.weight", (H,)),
        "lm_head": W((H, lay.vocab), P(None, "tensor"),
                     "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight",
                     (V, H), transpose=True, pad_axis=1),
    }
    for i in range(cfg.num_layers):
        pre, L = f"model.layers.{i}.", f"layers.{i}."
        specs |= {
            L + "attn_norm": W((H,), P(), pre + "input_layernorm.weight", (H,)),
            L + "mlp_norm": W((H,), P(), pre + "post_attention_layernorm.weight", (H,)),
            L + "q_norm": W((hd,), P(), pre + "self_attn.q_norm.weight", (hd,)),
            L + "k_norm": W((hd,), P(), pre + "self_attn.k_norm.weight", (hd,)),
            L + "q_proj": W((H, nq, hd), P(None, "tensor", None), pre + "self_attn.q_proj.weight",
                            (nq * hd, H), transpose=True, reshape=(H, nq, hd)),
            L + "k_proj": W((H, lay.kv_heads, hd), P(None, "tensor", None), pre + "self_attn.k_proj.weight",
                            (nkv * hd, H), transpose=True, reshape=(H, nkv, hd), repeat_axis=1, repeat=rep),
            L + "v_proj": W((H, lay.kv_heads, hd), P(None, "tensor", None), pre + "self_attn.v_proj.weight",
                            (nkv * hd, H), transpose=True, reshape=(H, nkv, hd), repeat_axis=1, repeat=rep),
            L + "o_proj": W((nq, hd, H), P("tensor", None, None), pre + "self_attn.o_proj.weight",
                            (H, nq * hd), transpose=True, reshape=(nq, hd, H)),
        }
        if cfg.is_moe_layer(i):
            ex = pre + "mlp.experts.{e}."
            specs |= {
                L + "router": W((H, E), P(), pre + "mlp.gate.weight", (E, H), transpose=True),
                L + "expert_gate": W((lay.experts, H, Im), P(EXPERT_AXES, None, None), ex + "gate_proj.weight",
                                     (Im, H), transpose=True, pad_axis=0, per_expert=E),
                L + "expert_up": W((lay.experts, H, Im), P(EXPERT_AXES, None, None), ex + "up_proj.weight",
                                   (Im, H), transpose=True, pad_axis=0, per_expert=E),
                L + "expert_down": W((lay.experts, Im, H), P(EXPERT_AXES, None, None), ex + "down_proj.weight",
                                     (H, Im), transpose=True, pad_axis=0, per_expert=E),
            }
        else:
            specs |= {
                L + "mlp_gate": W((H, lay.dense_width), P(None, "tensor"), pre + "mlp.gate_proj.weight",
                                  (Id, H), transpose=True, pad_axis=1),
                L + "mlp_up": W((H, lay.dense_width), P(None, "tensor"), pre + "mlp.up_proj.weight",
                                (Id, H), transpose=True, pad_axis=1),
                L + "mlp_down": W((lay.dense_width, H), P("tensor", None), pre + "mlp.down_proj.weight",
                                  (H, Id), transpose=True, pad_axis=0),
            }
    return specs


# ---------------------------------------------------------------------------------------------
# Reading a shard: map the placed index back to canonical rows, read only those, pad or repeat.

def _source_slice(spec: WeightSpec, index: tuple[slice, ...]):
    """For a placed-array index, the canonical index to read and how to finish each axis."""
    canon = spec.canonical_shape
    src, post = [], []
    for ax, (sl, n_placed) in enumerate(zip(index, spec.shape)):
        a, b, _ = sl.indices(n_placed)
        if ax == spec.repeat_axis:
            lo, hi = a // spec.repeat, (b - 1) // spec.repeat + 1
            src.append(slice(lo, hi))
            post.append(("repeat", spec.repeat, a - lo * spec.repeat, b - a))
        elif ax == spec.pad_axis:
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


Reader = Callable[[str, WeightSpec, tuple[slice, ...]], np.ndarray]
"""reads the canonical block `index` of weight `name`"""


def place(specs: dict[str, WeightSpec], read: Reader, mesh, dtype: str) -> dict[str, jax.Array]:
    """Build every weight on `mesh`, each device's shard read straight from the source."""
    out = {}
    for name, spec in specs.items():
        sharding = NamedSharding(mesh, spec.spec)

        def shard(index, name=name, spec=spec):
            src, post = _source_slice(spec, index)
            return _finish(read(name, spec, src), post).astype(np_dtype(dtype))

        out[name] = jax.make_array_from_callback(spec.shape, sharding, shard)
    return out


def placed_numpy(specs: dict[str, WeightSpec], read: Reader, dtype: str):
    """Yield (name, full placed array) one weight at a time, for writing artifacts."""
    for name, spec in specs.items():
        index = tuple(slice(0, n) for n in spec.shape)
        src, post = _source_slice(spec, index)
        yield name, _finish(read(name, spec, src), post).astype(np_dtype(dtype))


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
            keys = [spec.hf.format(e=e) for e in range(spec.per_expert)] if spec.per_expert else [spec.hf]
            for key in keys:
                found = tuple(self._tensor(key).get_shape())
                if found != spec.hf_shape:
                    raise WeightError(
                        f"{self.dir}: tensor {key!r} has shape {list(found)}, expected {list(spec.hf_shape)}")

    def read(self, name: str, spec: WeightSpec, src: tuple[slice, ...]) -> np.ndarray:
        if spec.per_expert:
            e_lo, e_hi = src[0].start, src[0].stop
            if e_hi <= e_lo:
                return np.zeros((0,) + tuple(s.stop - s.start for s in src[1:]), np.float32)
            blocks = [self._read_one(spec.hf.format(e=e), spec, src[1:]) for e in range(e_lo, e_hi)]
            return np.stack(blocks)
        return self._read_one(spec.hf, spec, src)

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

    def read(name: str, spec: WeightSpec, src: tuple[slice, ...]) -> np.ndarray:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
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
