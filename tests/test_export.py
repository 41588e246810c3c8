"""`python -m export build`: every export round-trips, the build is atomic, idempotent and checked."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_artifact
from dp_attention import PRESETS, CacheShape, Layout, MeshShape, ModelConfig, init_cache, jit_step, weight_specs
from export.probes import make_probe
from runtime import format as fmt
from runtime.batching import wire_shapes
from runtime.engine import load
from runtime.verify import compare_outputs

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_every_export_equals_in_process_step(tiny_artifact, tiny_engine):
    """Deserialized executables (compiled at load, no fast-load) against the step jitted here."""
    engine = load(tiny_artifact, fast_load=False)
    assert not engine.load_info.fast_load
    cfg, shape = PRESETS["qwen3-moe-tiny"], MeshShape(2, 4)
    m = engine.manifest.cache
    cache = CacheShape(m.num_pages, m.page_size, m.pages_per_seq)
    specs = weight_specs(cfg, shape)
    modes = set()
    for bucket in engine.buckets:
        groups, batch = make_probe(bucket, 2, cfg.vocab_size, cache.page_size, cache.pages_per_seq, seed=7)
        got = engine.run(bucket, batch)
        step = jit_step(cfg, bucket, engine.mesh, specs)
        kv = init_cache(cfg, Layout.for_mesh(cfg, shape), engine.mesh, cache, jnp.float32)
        want, _ = step(engine.weights, kv, batch)
        want = {k: np.asarray(v) for k, v in want.items()}
        num_seqs = [len(chunks) for chunks in groups]
        assert any(batch["temperature"][g, j] > 0 for g, n in enumerate(num_seqs) for j in range(n))
        err, why = compare_outputs(got, want, num_seqs, batch["temperature"] == 0, 1e-5)
        assert not why, f"{bucket.name}: {why}"
        for g, n in enumerate(num_seqs):  # the same ids, and every sampled output there
            assert got["tokens"][g, :n].tolist() == want["tokens"][g, :n].tolist()
            assert got["top_logprobs"].shape[-1] == engine.manifest.logprobs == 8
        modes.add(bucket.mode)
    assert modes == {"max_len", "sum_len"}


def test_executables_only_from_a_real_config_alone(tmp_path, golden_dir):
    """Qwen3-30B-A3B from its config.json alone: exports and costs, no weights, and no serving."""
    model = tmp_path / "qwen3-30b-a3b"
    model.mkdir()
    shutil.copy(ROOT / "bench" / "configs" / "qwen3-30b-a3b" / "config.json", model)
    buckets = tmp_path / "b.json"
    buckets.write_text(json.dumps({"tokens": [8], "max_seqs": 4}))
    out = tmp_path / "art"
    r = run_cli("export", "build", "--model", str(model), "--executables-only", "--dtype", "bfloat16",
                "--padding-modes", "max_len", "--buckets", str(buckets), "--max-context", "512",
                "--page-size", "16", "--pages-per-group", "64", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    m = fmt.read_manifest(out)
    assert m.weights_included is False and m.model.num_layers == 48
    assert not any(f.startswith(("weights/", "probes/")) for f in m.files)
    (e,) = m.executables
    assert e.probe is None and "probe" not in e.to_json() and e.compiled_here
    assert e.cost.temp_bytes > 0 and e.cost.argument_bytes > 1e9  # 30B of bf16 over 8 devices
    # Loops counted by trip count: at least the q/k/v projections of all 48 scanned layers.
    c = ModelConfig.from_json(m.model.to_json())
    projections = 2 * c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim * 48 * 2 * 8 / 8
    assert e.cost.flops > projections
    jax.export.deserialize(bytearray((out / e.file).read_bytes()))  # the round trip
    r = run_cli("export", "inspect", str(out))
    assert r.returncode == 0 and "temp" in r.stdout and "GFLOP" in r.stdout, r.stdout + r.stderr
    r = run_cli("runtime", "generate", str(out), "--prompt-ids", "1,2")
    assert r.returncode == 2 and "--executables-only" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_manifest_describes_what_was_built(tiny_artifact):
    m = fmt.read_manifest(tiny_artifact)
    assert m.jax_version and m.platforms == ("cpu",)
    ex = m.executables
    assert {e.mode for e in ex} == {"max_len", "sum_len"}
    for e in ex:
        assert e.compiled_here and e.sha256 == m.files[e.file]
        assert e.cost.flops > 0 and e.cost.collectives
    assert all(f in m.files for f in m.fastload["cpu"].files)
    # one entry per executable, named after its module; the reference step compiled beside them is not shipped
    names = sorted(f.rsplit("/", 1)[-1].rsplit("-", 2)[0] for f in m.fastload["cpu"].files)
    assert names == sorted("jit_" + e.bucket.name.replace("-", "_") for e in ex if e.compiled_here)


def test_tpu_4x8_exports_from_abstract_shapes(tmp_path):
    buckets = tmp_path / "b.json"
    buckets.write_text(json.dumps({"tokens": [8, 32], "max_seqs": 8}))
    out = tmp_path / "tpu"
    r = run_cli("export", "build", "--platform", "tpu", "--mesh", "4x8", "--buckets", str(buckets),
                "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    r = run_cli("export", "inspect", str(out), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["platforms"] == ["tpu"] and d["format_version"] == fmt.FORMAT_VERSION
    (mesh,) = d["meshes"]
    assert {k: mesh[k] for k in ("name", "shape", "devices", "compiled_here")} == \
        {"name": "4x8", "shape": [4, 8], "devices": 32, "compiled_here": False}
    assert mesh["expert_layout"]["local_experts"] * 32 == 32  # one expert a device: 32 x 32 fills most lanes
    assert mesh["hbm"]["generation"] == "v5e" and mesh["hbm"]["headroom_bytes"] > 0
    assert len(d["executables"]) == 2 + 2  # max_len t8, t32; sum_len t8/g8, t32/g32 (g in [T, 4T))
    for e in d["executables"]:
        assert set(e) >= {"mesh", "mode", "bucket", "file", "sha256", "compiled_here"} and not e["compiled_here"]
        exported = jax.export.deserialize(bytearray((out / e["file"]).read_bytes()))  # the round trip
        assert exported.platforms == ("tpu",) and exported.nr_devices == 32
        # The batch travels packed: its int32 inputs in one [D, K] array (runtime.batching.to_wire).
        entry = next(x for x in fmt.read_manifest(out).executables if x.file == e["file"])
        ints, _ = wire_shapes(entry.batch_shapes)["ints"]
        assert ints[1] > 2 * e["bucket"]["tokens"]  # tokens, positions, ... side by side
        assert [a.dtype for a in exported.in_avals if a.shape == ints] == [np.int32]
    # The runtime here (cpu, 8 devices) refuses it with one clear line.
    r = run_cli("runtime", "generate", str(out), "--prompt-ids", "1,2")
    assert r.returncode != 0 and "built for platforms ['tpu'], this machine is cpu" in r.stderr
    assert "Traceback" not in r.stderr


def test_flipped_byte_in_any_file_is_detected(tiny_artifact, tmp_path):
    manifest = fmt.read_manifest(tiny_artifact)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact, copy)
    for rel in manifest.files:
        path = copy / rel
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(fmt.ArtifactError, match=str(path)):
            fmt.verify_all(copy, manifest)
        path.write_bytes(original)
    # and through the real loader, for each kind of file
    for prefix in ("weights/", "exec/", "probes/", "fastload/"):
        rel = next(f for f in manifest.files if f.startswith(prefix))
        path = copy / rel
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
        with pytest.raises(fmt.ArtifactError, match="sha256"):
            load(copy)
        path.write_bytes(original)


def test_second_identical_build_rebuilds_nothing(tiny_artifact):
    before = {p: p.stat().st_mtime_ns for p in tiny_artifact.rglob("*")}
    build_artifact(tiny_artifact)
    assert {p: p.stat().st_mtime_ns for p in tiny_artifact.rglob("*")} == before  # not one file rewritten


def test_killed_build_leaves_nothing_that_loads(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "export", "build", "--out", str(out), "--quiet"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".killed.tmp-*/exec/2x4/*.jax")):
        time.sleep(0.1)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(fmt.ArtifactError):
        load(out)
    leftovers = list(tmp_path.glob(".killed.tmp-*"))
    assert leftovers  # killed mid-way: only the hidden temp directory exists ...
    for tmp in leftovers:  # ... and it does not load either (no manifest yet)
        with pytest.raises(fmt.ArtifactError):
            load(tmp)


@pytest.mark.parametrize("args,message", [
    (["--mesh", "2x"], "mesh '2x' is not of the form DxT"),
    (["--mesh", "0x4"], "both D and T must be at least 1"),
    (["--model", "no-such-preset"], "unknown model 'no-such-preset'"),
    (["--model", "EMPTYDIR"], "no config.json"),
    (["--padding-modes", "fast"], "--padding-modes 'fast'"),
])
def test_bad_cli_input(args, message, tmp_path):
    args = [str(tmp_path) if a == "EMPTYDIR" else a for a in args]
    r = run_cli("export", "build", "--out", str(tmp_path / "out"), *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_warm_adds_a_fast_load_section_and_nothing_else(tmp_path):
    """Built without fast-load (as on a CPU box for TPU), warmed on a host of the platform: the next
    load takes every executable from the cache, step times are measured there; no other file changed."""
    out = build_artifact(tmp_path / "cold", ladder=(4, 16), fast_load=False, modes=("max_len",))
    before = fmt.read_manifest(out)
    assert not before.fastload
    cold = load(out)
    assert cold.load_info.fast_load_hits == 0
    r = run_cli("export", "warm", str(out))
    assert r.returncode == 0, r.stderr
    after = fmt.read_manifest(out)
    section = after.fastload["cpu"]
    assert section.executables == len(cold.buckets) and section.files
    fmt.verify_all(out, after)
    assert {k: v for k, v in after.files.items() if not k.startswith("fastload/")} == before.files
    # Step times re-measured on this platform; nothing else changed.
    assert all(e.step_seconds["cpu"] > 0 for e in after.executables)
    untimed = lambda m: [dataclasses.replace(e, step_seconds=None) for e in m.executables]  # noqa: E731
    assert untimed(after) == untimed(before)
    assert dataclasses.replace(after, fastload={}, files=before.files, executables=before.executables) == before
    warm = load(out)
    assert warm.load_info.fast_load and warm.load_info.fast_load_hits == len(warm.buckets)
    r = run_cli("export", "warm", str(tmp_path / "nothing-here"))
    assert r.returncode == 2 and "no such artifact directory" in r.stderr


def _mlir(path: Path) -> str:
    return jax.export.deserialize(bytearray(path.read_bytes())).mlir_module()


def test_tpu_exports_run_experts_on_the_gmm_kernel(tmp_path):
    """A TPU-only export computes the experts with the Pallas grouped matmul (native attention, so
    the only Pallas kernel is the experts'), in the layout asked for; a cpu,tpu export cannot hold a
    Pallas kernel beside its CPU branch and keeps ragged_dot for its TPU side."""
    buckets = tmp_path / "b.json"
    buckets.write_text(json.dumps({"tokens": [8], "max_seqs": 4}))
    common = ("--attention", "native", "--mesh", "2x4", "--buckets", str(buckets), "--padding-modes", "max_len",
              "--quiet")
    out = tmp_path / "tpu"
    r = run_cli("export", "build", "--platform", "tpu", "--expert-layout", "ep-tensor", "--out", str(out), *common)
    assert r.returncode == 0, r.stderr
    m = fmt.read_manifest(out)
    lay = m.meshes[0].experts
    assert (lay.name, lay.expert_axes, lay.width_axes, lay.local_experts, lay.local_width) == \
        ("ep-tensor", ("tensor",), ("data",), 8, 16)
    assert m.meshes[0].weights["moe.down"].spec == (None, "tensor", "data", None)
    (e,) = m.executables
    text = _mlir(out / e.file)
    assert "tpu_custom_call" in text and "ragged_dot" not in text
    r = run_cli("export", "inspect", str(out))
    assert "layout ep-tensor, 8 experts x 16 columns per device" in r.stdout, r.stdout
    out = tmp_path / "both"
    r = run_cli("export", "build", "--platform", "cpu,tpu", "--no-fast-load", "--out", str(out), *common)
    assert r.returncode == 0, r.stderr
    text = _mlir(out / fmt.read_manifest(out).executables[0].file)
    assert "ragged_dot" in text and "tpu_custom_call" not in text


def test_build_refuses_what_does_not_fit_the_chip(tmp_path):
    """From config.json alone: 235B on 2x4 cannot fit a v5e at all; 30B on 2x4 fits a v5e only with a
    smaller cache, whose size the refusal names, and a build with that size states its headroom."""
    def build(model, mesh, pages, out):
        return run_cli("export", "build", "--model", str(ROOT / "bench" / "configs" / model), "--executables-only",
                       "--dtype", "bfloat16", "--platform", "tpu", "--tpu-generation", "v5e", "--mesh", mesh,
                       "--padding-modes", "max_len", "--max-context", "4096", "--page-size", "16",
                       "--pages-per-group", str(pages), "--out", str(out), "--quiet")

    r = build("qwen3-235b-a22b", "2x4", 257, tmp_path / "no")  # one 4096-token sequence and page 0
    assert r.returncode == 2 and not (tmp_path / "no").exists()
    (line,) = r.stderr.strip().splitlines()
    assert "a v5e chip has 16 GiB" in line and "try a larger mesh" in line
    needs = float(line.split("needs ")[1].split(" GiB")[0])
    assert needs > 16  # 235B in bf16 over 8 devices: ~55 GiB of weights each

    r = build("qwen3-30b-a3b", "2x4", 100_000, tmp_path / "big")
    (line,) = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "a v5e chip has 16 GiB; try --pages-per-group" in line, r.stderr
    pages = int(line.split("--pages-per-group ")[1].split()[0])
    assert 2 <= pages < 100_000
    r = build("qwen3-30b-a3b", "2x4", pages, tmp_path / "fits")
    assert r.returncode == 0, r.stderr
    hbm = fmt.read_manifest(tmp_path / "fits").meshes[0].hbm
    assert hbm.generation == "v5e" and hbm.capacity_bytes == 16 * 2**30 and not hbm.temp_measured
    assert 0 <= hbm.headroom_bytes < hbm.page_bytes and hbm.max_pages_per_group == pages
    r = build("qwen3-30b-a3b", "2x4", pages + 1, tmp_path / "over")
    assert r.returncode == 2 and f"--pages-per-group {pages}" in r.stderr
    r = run_cli("export", "inspect", str(tmp_path / "fits"))
    assert f"up to {pages} pages per group fit" in r.stdout and "headroom" in r.stdout, r.stdout


def test_artifact_without_a_recorded_layout_loads_as_width_split(tmp_path):
    """Artifacts from before layouts were recorded held every expert on every device, width split:
    such a manifest reads back as that layout and still serves."""
    out = build_artifact(tmp_path / "old", ladder=(8,), modes=("max_len",), fast_load=False,
                         expert_layout="width")
    path = out / fmt.MANIFEST
    data = json.loads(path.read_text())
    for mesh in data["meshes"]:
        del mesh["expert_layout"]
    path.write_text(json.dumps(data, indent=1) + "\n")
    m = fmt.read_manifest(out)
    lay = m.meshes[0].experts
    assert (lay.name, lay.local_experts, lay.local_width, lay.expert_axes) == ("width", 32, 4, ())
    r = run_cli("runtime", "verify", str(out))
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_mesh_of_a_build_loads_from_its_fast_load_entries(tmp_path, monkeypatch):
    """A build of two meshes ships each one's executables, compiled at build: loading either
    compiles nothing, in this process (8 devices) and in a process holding just that mesh's
    devices, which is the process the runtime starts to serve one mesh alone (a mesh runs slower
    beside virtual devices it does not use)."""
    from runtime.cli import _set_device_count

    out = build_artifact(tmp_path / "two", ladder=(4,), modes=("max_len",),
                         meshes=(MeshShape(1, 1), MeshShape(2, 1)))
    m = fmt.read_manifest(out)
    section = m.fastload["cpu"]
    assert section.process_devices == len(jax.devices()) == 8 and section.mesh_processes == ("1x1", "2x1")
    assert len(section.files) == 2 * len(m.executables) == 4  # each compiled for both topologies
    for name in ("1x1", "2x1"):
        engine = load(out, mesh=name)
        assert engine.load_info.fast_load_hits == len(engine.buckets) == 1, engine.load_info
    code = ("import json, jax; from runtime.engine import load; e = load(%r, mesh='1x1'); "
            "print(json.dumps([len(jax.devices()), e.load_info.fast_load_hits, e.compiles_after_load]))") % str(out)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1]) == [1, 1, 0], r.stdout + r.stderr
    for mesh, devices in (("1x1", 1), ("2x1", 2), (None, 2)):  # no mesh asked: the largest's devices
        monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")  # other flags are kept
        _set_device_count(m, 1, mesh)
        assert os.environ["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count={devices}"
