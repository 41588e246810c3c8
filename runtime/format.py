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

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

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


def spec_to_json(spec) -> list:
    """A PartitionSpec as the manifest stores it: axis names, lists for several axes, null."""
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def spec_from_json(entry: list):
    """The PartitionSpec a manifest entry describes."""
    from jax.sharding import PartitionSpec

    return PartitionSpec(*[tuple(a) if isinstance(a, list) else a for a in entry])


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


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (an incomplete or interrupted build leaves no manifest)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version is {version!r}, this runtime reads {FORMAT_VERSION}")
    for key in ("model", "meshes", "executables", "files", "platforms", "jax_version"):
        if key not in manifest:
            raise ArtifactError(f"{path}: missing field {key!r}")
    return manifest


def verify_file(root: Path, manifest: dict, rel: str) -> Path:
    """The verified path of a file the manifest lists; raises naming the file if it doesn't match."""
    full = resolve(root, rel)
    expected = manifest["files"].get(rel)
    if expected is None:
        raise ArtifactError(f"{root / MANIFEST}: file {rel!r} is used but has no checksum in 'files'")
    if not full.is_file():
        raise ArtifactError(f"{full}: missing (listed in the manifest)")
    found = sha256_file(full)
    if found != expected:
        raise ArtifactError(f"{full}: sha256 {found[:16]}... does not match the manifest's {expected[:16]}... "
                            f"(corrupted or truncated)")
    return full


def verify_all(root: str | Path, manifest: dict) -> None:
    root = Path(root)
    for rel in manifest["files"]:
        verify_file(root, manifest, rel)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
