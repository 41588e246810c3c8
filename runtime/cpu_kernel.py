"""The C++ kernels of `--attention cpu` artifacts (runtime/kernels/): paged attention and the MoE experts.

XLA:CPU reads a paged KV cache only by gathering each block of pages into a dense copy before its
dot products read it again (in a decode step those copies are most of attention's time), copies
each expert's weights out of the layer stack before its dots, and runs the dots on one core. The
kernels read the cache, the tokens and the weights where they lie and share their work among the
intra-op pool's threads, through XLA's FFI, so an executable calls them by name (TARGETS) like any
op. The model's step calls them (dp_attention.attention, dp_attention.model); the runtime registers
them before it compiles or fast-loads an executable that does. They are compiled on first use with
the host's C++ compiler, for this CPU, into a cache keyed by everything the binary depends on, and
loaded once a process. The standard library only: `import runtime` stays slim, and the model may
import this module as it does runtime.contract.
"""

from __future__ import annotations

import concurrent.futures
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
_building: concurrent.futures.Future | None = None


class KernelUnavailable(RuntimeError):
    """The kernels cannot be built here (no C++ compiler, or it failed)."""


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
    """Compile the kernels unless this exact build is cached; returns the shared library's path.
    Each source compiles in a process of its own, at once, then they link: a first build's wait is
    its slowest file's."""
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
    with tempfile.TemporaryDirectory(dir=out.parent) as work:  # compile aside, rename into place: atomic
        objects = [str(Path(work) / f"{name}.o") for name in SOURCES]
        jobs = [subprocess.Popen([cxx, *FLAGS, "-c", f"-I{jax.ffi.include_dir()}", str(KERNELS / name), "-o", obj],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for name, obj in zip(SOURCES, objects)]
        linked = Path(work) / out.name
        steps = [(j.args, j.wait(), j.stderr.read()) for j in jobs]
        if all(code == 0 for _, code, _ in steps):
            link = subprocess.run([cxx, *FLAGS, *objects, "-o", str(linked)], capture_output=True, text=True)
            steps.append((link.args, link.returncode, link.stderr))
        for args, code, err in steps:
            if code != 0:
                raise KernelUnavailable(f"building the CPU kernels failed: `{' '.join(args)}` exited {code}:\n"
                                        f"{err.strip()[-2000:]}")
        os.replace(linked, out)
    return out


def prepare() -> None:
    """Start building the kernels in the background (a build's exports need no kernel, its
    compiles do): register() then waits for it."""
    global _building
    with _lock:
        if _building is None and not _registered:
            _building = concurrent.futures.ThreadPoolExecutor(1).submit(build)


def register() -> None:
    """Make every target callable by CPU executables in this process (builds the kernels if needed)."""
    global _registered
    with _lock:
        if _registered:
            return
        import jax

        library = ctypes.CDLL(str(_building.result() if _building is not None else build()))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        _registered = True
