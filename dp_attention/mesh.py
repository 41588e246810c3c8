"""The dp x tp device layout: `--mesh DxT` is D attention groups of T devices each.

Group g owns devices [g*T, (g+1)*T) in `jax.devices()` order. The mesh is built from that exact order
(not `jax.make_mesh`, which may reorder for topology) so a group always means the same devices.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, Mesh

AXES = ("data", "tensor")


class MeshError(ValueError):
    """A mesh spec that is malformed or does not fit the devices at hand."""


@dataclasses.dataclass(frozen=True)
class MeshShape:
    dp: int
    tp: int

    @property
    def num_devices(self) -> int:
        return self.dp * self.tp

    def __str__(self) -> str:
        return f"{self.dp}x{self.tp}"


def parse_mesh(text: str) -> MeshShape:
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    if not m:
        raise MeshError(f"mesh {text!r} is not of the form DxT (e.g. 2x4: 2 data-parallel groups of 4 devices)")
    dp, tp = int(m.group(1)), int(m.group(2))
    if dp < 1 or tp < 1:
        raise MeshError(f"mesh {text!r}: both D and T must be at least 1")
    return MeshShape(dp, tp)


def make_mesh(shape: MeshShape, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < shape.num_devices:
        raise MeshError(
            f"mesh {shape} needs {shape.num_devices} devices, found {len(devices)} "
            f"({devices[0].platform if devices else 'none'}); on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={shape.num_devices} before importing jax"
        )
    grid = np.array(devices[: shape.num_devices]).reshape(shape.dp, shape.tp)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 2)


def abstract_mesh(shape: MeshShape, device_kind: str | None = None, platform: str = "tpu") -> AbstractMesh:
    """A mesh of the right shape with no devices behind it, for exporting to fleets we don't have.

    `device_kind` (e.g. "TPU v5 lite") names the target chip, for kernels whose lowering asks."""
    device = AbstractDevice(device_kind=device_kind, num_cores=1, platform=platform) if device_kind else None
    return AbstractMesh((shape.dp, shape.tp), AXES, axis_types=(AxisType.Auto,) * 2, abstract_device=device)
