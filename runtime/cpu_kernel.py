"""The C++ paged attention of `--attention cpu` artifacts (runtime/kernels/paged_attention.cc).

XLA:CPU reads a paged KV cache only by gathering each block of pages into a dense copy before its
dot products read it again; in a decode step those copies are most of attention's time. The kernel
reads keys and values where they lie, through XLA's FFI, so an executable calls it by name (TARGET)
like any op. The model's step calls it (dp_attention.attention); the runtime registers it before
it compiles or fast-loads an executable that does. It is compiled on first use with the host's C++
compiler, for this CPU, into a cache keyed by everything the binary depends on; a process holds it
once. The standard library, numpy-free: `import runtime` stays slim, and the model may import this
module as it does runtime.contract.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

TARGET = "dp_paged_attention_f32_v1"  # the custom call's name in every executable that uses it
SOURCE = Path(__file__).parent / "kernels" / "paged_attention.cc"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-std=c++17", "-w")
CACHE_ENV = "QWEN3_MOE_AOT_KERNEL_CACHE"  # where compiled kernels are kept (default ~/.cache/qwen3-moe-aot)

_lock = threading.Lock()
_registered = False


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built here (no C++ compiler, or it failed)."""


def compiler() -> str | None:
    """The C++ compiler to build with: $CXX, else c++ or g++ or clang++ on PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((found for name in ("c++", "g++", "clang++") if (found := shutil.which(name))), None)


def available() -> bool:
    return compiler() is not None


def _cpu_flags() -> str:
    """The CPU features -march=native compiles for: a cache shared between machines must not
    hand one of them another's binary."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), os.uname().machine)


def library_path() -> Path:
    import jax  # the FFI headers' version is part of the key

    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), jax.__version__, _cpu_flags(),
                                    compiler() or ""]).encode()).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qwen3-moe-aot") / "kernels"
    return root / f"paged_attention-{key}.so"


def build() -> Path:
    """Compile the kernel unless this exact build is cached; returns the shared library's path."""
    import jax

    out = library_path()
    if out.exists():
        return out
    cxx = compiler()
    if cxx is None:
        tried = f"$CXX={os.environ['CXX']} not found" if os.environ.get("CXX") else "no c++, g++ or clang++ on PATH"
        raise KernelUnavailable(f"the CPU attention kernel ({SOURCE.name}) needs a C++ compiler: {tried}; install "
                                f"one, or build the artifact with --attention native")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)  # compile aside, rename into place: atomic
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelUnavailable(f"compiling {SOURCE} with {cxx} failed (exit {done.returncode}):\n"
                                    f"{done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def register() -> None:
    """Make TARGET callable by CPU executables in this process (builds the kernel if needed)."""
    global _registered
    with _lock:
        if _registered:
            return
        import jax

        library = ctypes.CDLL(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.DpPagedAttention), platform="cpu")
        _registered = True
