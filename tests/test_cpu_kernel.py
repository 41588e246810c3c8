"""The C++ CPU attention kernel (`--attention cpu`) as a build and a server host meet it: the default
for float32 CPU builds where a compiler is found, refused where it cannot work, and a host that
cannot compile it told so in one line. Its numbers are checked in test_attention.py (against the
ragged kernel's reference) and test_export.py (every executable against the native step)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dp_attention import PRESETS, MeshShape
from export.build import BuildConfig, BuildError, build
from runtime import cpu_kernel
from runtime import format as fmt

ROOT = Path(__file__).resolve().parent.parent


def test_float32_cpu_builds_default_to_the_kernel(tiny_artifact, monkeypatch):
    assert cpu_kernel.available(), "no C++ compiler on this host: the suite's artifacts would not use the kernel"
    assert fmt.read_manifest(tiny_artifact).attention == "cpu"
    shown = subprocess.run([sys.executable, "-m", "export", "inspect", str(tiny_artifact)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert "attention: cpu (" in shown.stdout and "C++ compiler" in shown.stdout, shown.stdout + shown.stderr
    tiny = PRESETS["qwen3-moe-tiny"]
    assert BuildConfig(model="qwen3-moe-tiny").default_attention(tiny) == "cpu"
    assert BuildConfig(model="qwen3-moe-tiny", kv_cache_dtype="int8").default_attention(tiny) == "native"
    assert BuildConfig(model="qwen3-moe-tiny", platforms=("cpu", "tpu")).default_attention(tiny) == "native"
    assert BuildConfig(model="qwen3-moe-tiny", platforms=("tpu",)).default_attention(tiny) == "fa"
    monkeypatch.setattr(cpu_kernel, "compiler", lambda: None)
    assert BuildConfig(model="qwen3-moe-tiny").default_attention(tiny) == "native"


@pytest.mark.parametrize("options,message", [
    ({"dtype": "bfloat16"}, "--attention cpu reads a float32 KV cache; this build's is bfloat16"),
    ({"kv_cache_dtype": "int8"}, "--attention cpu reads a float32 KV cache; this build's is int8"),
    ({"platforms": ("cpu", "tpu")}, "--attention cpu is a C++ kernel for CPU executables"),
])
def test_builds_the_kernel_cannot_serve_are_refused(tmp_path, options, message):
    cfg = BuildConfig(model="qwen3-moe-tiny", out=tmp_path / "out", attention="cpu", meshes=(MeshShape(1, 1),),
                      token_ladder=(4,), **options)
    with pytest.raises(BuildError) as refused:
        build(cfg)
    assert message in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_a_host_without_a_compiler_is_told_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tmp_path))  # nothing cached: it must compile
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(cpu_kernel.KernelUnavailable, match=r"\$CXX=no-such-compiler.*--attention native"):
        cpu_kernel.build()
    assert not list(tmp_path.rglob("*.so"))


def test_serving_an_artifact_that_needs_the_kernel_without_a_compiler_fails_in_one_line(tiny_artifact, tmp_path):
    env = {**os.environ, cpu_kernel.CACHE_ENV: str(tmp_path), "CXX": "no-such-compiler"}
    r = subprocess.run([sys.executable, "-m", "runtime", "generate", str(tiny_artifact), "--prompt-ids", "1,2,3",
                        "--max-new-tokens", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "built with --attention cpu" in lines[0] and "no-such-compiler" in lines[0], r.stderr


def test_the_compiled_kernel_is_reused(tmp_path, monkeypatch):
    """Keyed by source, flags, jax and CPU: a second build of the same finds it and compiles nothing."""
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tmp_path))
    first = cpu_kernel.build()
    stamp = first.stat().st_mtime_ns
    assert cpu_kernel.build() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [first.name]  # no temp file left behind


def test_the_kernel_benchmark_runs_every_case(tmp_path):
    """bench/cpu_kernels.py, as bench/README.md runs it, at one call per version: five cases, each
    kernel's output equal to the XLA version's."""
    r = subprocess.run([sys.executable, "-m", "bench.cpu_kernels", "--rounds", "1", "--repeats", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(("attention", "experts"))]
    assert len(rows) == 5, r.stdout
    assert all(float(row.split()[-1]) < 1e-4 for row in rows), r.stdout  # max |diff| column
