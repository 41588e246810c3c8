"""The C++ kernels of `--attention cpu` artifacts (runtime/kernels/): paged attention and the MoE experts.

XLA:CPU reads a paged KV cache only by gathering each block of pages into a dense copy before its
dot products read it again (in a decode step those copies are most of attention's time), copies
each expert's weights out of the layer stack before its dots, and runs the dots on one core. The
kernels read the cache, the tokens and the weights where they lie and share their work among the
intra-op pool's threads, through XLA's FFI, so an executable calls them by name (TARGETS) like any
op. The model's step calls them (dp_attention.attention, dp_attention.model); the runtime registers
them before it compiles or fast-loads an executable that does. It is compiled on first use with the host's C++
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

# The custom calls' names in the executables that use them -> the library's handler symbols. A name
# carries its contract's version: a kernel whose inputs or meaning change gets a new one.
ATTENTION = "dp_paged_attention_f32_v1"
EXPERTS = "dp_experts_f32_v1"
TARGETS = {ATTENTION: "DpPagedAttention", EXPERTS: "DpExperts"}
KERNELS = Path(__file__).parent / "kernels"
SOURCES = ("paged_attention.cc", "experts.cc")  # compiled into one library, with common.h
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

    texts = [(KERNELS / name).read_text() for name in (*SOURCES, "common.h")]
    key = hashlib.sha256("\0".join([*texts, " ".join(FLAGS), jax.__version__, _cpu_flags(),
                                    compiler() or ""]).encode()).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qwen3-moe-aot") / "kernels"
    return root / f"dp_kernels-{key}.so"


def build() -> Path:
    """Compile the kernels unless this exact build is cached; returns the shared library's path."""
    import jax

    out = library_path()
    if out.exists():
        return out
    cxx = compiler()
    if cxx is None:
        tried = f"$CXX={os.environ['CXX']} not found" if os.environ.get("CXX") else "no c++, g++ or clang++ on PATH"
        raise KernelUnavailable(f"the CPU kernels (runtime/kernels/) need a C++ compiler: {tried}; install one, or "
                                f"build the artifact with --attention native")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)  # compile aside, rename into place: atomic
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", *(str(KERNELS / n) for n in SOURCES),
                               "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelUnavailable(f"compiling {KERNELS} with {cxx} failed (exit {done.returncode}):\n"
                                    f"{done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def register() -> None:
    """Make every target callable by CPU executables in this process (builds the kernels if needed)."""
    global _registered
    with _lock:
        if _registered:
            return
        import jax

        library = ctypes.CDLL(str(build()))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        _registered = True
