"""An 8-bit KV cache through the build and the runtime: pages sized by bytes, the manifest's record,
a round trip with no compiles after load, the runtime's refusals, and the TPU export."""

import dataclasses
import json
import shutil

import jax
import pytest
from conftest import build_artifact
from test_export import run_cli

from dp_attention import MeshShape
from export.build import DEFAULT_PAGES_PER_GROUP, BuildConfig
from export.source import open_model
from runtime import format as fmt
from runtime.engine import load


def _model(dtype):
    return open_model("qwen3-moe-tiny", dtype, weights=False).config


def test_pages_are_sized_by_bytes():
    """Same bytes: an 8-bit cache holds twice the pages of bfloat16 (four times float32's), on every
    mesh of the build; an explicit page count stays what it says."""
    bf16, f32 = _model("bfloat16"), _model("float32")
    meshes = (MeshShape(2, 4), MeshShape(1, 2))
    auto = BuildConfig(meshes=meshes)
    assert auto.num_pages(bf16) == auto.num_pages(f32) == DEFAULT_PAGES_PER_GROUP
    for kv in ("int8", "fp8_e4m3", "fp8_e5m2"):
        assert BuildConfig(meshes=meshes, kv_cache_dtype=kv).num_pages(bf16) == 2 * DEFAULT_PAGES_PER_GROUP
        assert BuildConfig(meshes=meshes, kv_cache_dtype=kv).num_pages(f32) == 4 * DEFAULT_PAGES_PER_GROUP
    budget = 3 * 2**20
    for model in (bf16, f32):
        wide = BuildConfig(meshes=meshes, kv_cache_bytes=budget)
        narrow = dataclasses.replace(wide, kv_cache_dtype="int8")
        ratio = 2 if model is bf16 else 4
        assert abs(narrow.num_pages(model) - ratio * wide.num_pages(model)) < ratio  # floor of the same bytes
        for cfg in (wide, narrow):
            fits = [budget // cfg.page_bytes(model, s) for s in meshes]
            assert cfg.num_pages(model) == min(fits)  # what fits on every mesh
            assert cfg.num_pages(model) * cfg.page_bytes(model, meshes[0]) <= budget
    explicit = BuildConfig(meshes=meshes, kv_cache_dtype="int8", pages_per_group=100)
    assert explicit.num_pages(bf16) == 100


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory):
    return build_artifact(tmp_path_factory.mktemp("kv") / "int8", ladder=(8, 32), modes=("max_len",),
                          kv_cache_dtype="int8")


def test_8bit_artifact_round_trip(int8_artifact):
    """Built, loaded, served: the cache is int8 with the manifest's per-layer scales, the probes
    match, nothing compiles after load."""
    m = fmt.read_manifest(int8_artifact)
    assert m.kv_cache.dtype == m.kv_dtype == "int8" and m.dtype == "float32"
    layers = m.model.num_layers
    assert len(m.kv_cache.k_scale) == len(m.kv_cache.v_scale) == layers
    assert all(s > 0 for s in m.kv_cache.k_scale + m.kv_cache.v_scale) and len(set(m.kv_cache.k_scale)) > 1
    assert m.cache.num_pages == 4 * DEFAULT_PAGES_PER_GROUP  # float32 build: four times the pages
    engine = load(int8_artifact)
    assert str(engine.cache.dtype) == "int8" and engine.cache.shape[2] == m.cache.num_pages
    outputs, stats = engine.generate([[1, 2, 3, 4, 5], [7, 8], list(range(40, 90))], [12, 12, 12])
    assert [len(o) for o in outputs] == [12, 12, 12] and stats["compiles_after_load"] == 0
    r = run_cli("runtime", "verify", str(int8_artifact))
    assert r.returncode == 0, r.stdout + r.stderr


def test_runtime_refuses_a_mismatched_cache(int8_artifact, tmp_path):
    """A --kv-cache-dtype the artifact wasn't built with, and a manifest whose cache dtype is not
    what its executables take: one line each, naming both dtypes."""
    with pytest.raises(fmt.ArtifactError, match="asked, but this artifact's KV cache is int8"):
        load(int8_artifact, kv_cache_dtype="fp8_e4m3")
    r = run_cli("runtime", "generate", str(int8_artifact), "--prompt-ids", "1,2", "--kv-cache-dtype", "fp8_e5m2")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "--kv-cache-dtype fp8_e5m2 asked" in r.stderr and "--kv-cache-dtype int8" in r.stderr
    load(int8_artifact, kv_cache_dtype="int8", jobs=1)  # the right one is accepted

    edited = tmp_path / "edited"
    shutil.copytree(int8_artifact, edited)
    data = json.loads((edited / fmt.MANIFEST).read_text())
    data["kv_cache"]["dtype"] = "float8_e4m3fn"
    (edited / fmt.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(fmt.ArtifactError, match="KV cache input is int8 but the manifest says the cache is "
                                                "float8_e4m3fn"):
        load(edited, fast_load=False)


def test_unquantized_artifacts_are_unchanged(tiny_artifact):
    """An artifact built without --kv-cache-dtype records no kv_cache (older runtimes read it as
    before), keeps the default page count, and asking for an 8-bit cache from it is refused."""
    data = json.loads((tiny_artifact / fmt.MANIFEST).read_text())
    assert "kv_cache" not in data and data["cache"]["num_pages"] == DEFAULT_PAGES_PER_GROUP
    assert fmt.read_manifest(tiny_artifact).kv_dtype == data["dtype"]
    with pytest.raises(fmt.ArtifactError, match="built with --kv-cache-dtype auto"):
        load(tiny_artifact, kv_cache_dtype="int8")


def test_tpu_export_reads_an_8bit_cache(tmp_path, golden_dir):
    """fp8 for --platform tpu from this CPU machine: the Pallas kernel in each export, over an fp8
    cache input; a mesh that leaves the kernel one kv head per device is refused in one line."""
    buckets = tmp_path / "b.json"
    buckets.write_text(json.dumps({"tokens": [8], "max_seqs": 4}))
    common = ("export", "build", "--model", str(golden_dir / "hf-tiny-b"), "--platform", "tpu", "--tpu-generation",
              "v5e", "--padding-modes", "max_len", "--buckets", str(buckets), "--quiet")
    r = run_cli(*common, "--mesh", "2x2", "--kv-cache-dtype", "fp8_e4m3", "--out", str(tmp_path / "tpu"))
    assert r.returncode == 0, r.stderr
    m = fmt.read_manifest(tmp_path / "tpu")
    assert m.attention == "fa" and m.kv_dtype == "float8_e4m3fn" and m.cache.num_pages == 4 * DEFAULT_PAGES_PER_GROUP
    for e in m.executables:
        exported = jax.export.deserialize(bytearray((tmp_path / "tpu" / e.file).read_bytes()))
        (_, cache, _), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
        assert str(cache.dtype) == "float8_e4m3fn" and "tpu_custom_call" in exported.mlir_module()
    r = run_cli(*common, "--mesh", "2x4", "--kv-cache-dtype", "int8", "--out", str(tmp_path / "no"))
    assert r.returncode == 2 and "needs an even number of kv heads per device; mesh 2x4 leaves 1" in r.stderr
    r = run_cli(*common, "--mesh", "2x2", "--pages-per-group", "9", "--kv-cache-gib", "1", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
