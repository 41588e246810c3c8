"""Where a build's time goes: `export build` with every phase run in line, CPU seconds per phase.

    python -m bench.build_profile [export build flags...]     # default: --mesh 2x4

The real build overlaps its phases (exports are traced while earlier ones compile, two compile jobs
at a time), so its wall time is about the sum below over the cores it has. Here the compile pool
runs each job where it is submitted, so each phase's process CPU time is its own.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class InlinePool:
    """A ThreadPoolExecutor stand-in that runs each job when it is submitted."""

    def __init__(self, *args, **kwargs):
        pass

    def submit(self, fn, *args, **kwargs):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to whoever reads the future
            future.set_exception(e)
        return future

    def shutdown(self, *args, **kwargs):
        pass


def main(argv: list[str]) -> int:
    from export import build as B
    from export.cli import main as export_main
    from runtime import engine as E

    spent, calls = collections.Counter(), collections.Counter()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = cpu_seconds()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += cpu_seconds() - start
                calls[name] += 1
        return wrapper

    B.ThreadPoolExecutor = InlinePool
    B.export_one = timed("trace, lower and serialize each export", B.export_one)
    E.Engine.compile_one = timed("XLA compile of each executable", E.Engine.compile_one)
    B._analysis = timed("cost and memory analysis", B._analysis)
    B._reference_step = timed("the reference step's compile", B._reference_step)
    B._probe = timed("probes against the reference", B._probe)
    B.step_seconds = timed("timing each executable", B.step_seconds)
    B._mesh_entry = timed("weights", B._mesh_entry)
    B._checksum = timed("checksums", B._checksum)

    with tempfile.TemporaryDirectory() as tmp:
        flags = argv or ["--mesh", "2x4"]
        start, wall = cpu_seconds(), time.perf_counter()
        code = export_main(["build", *flags, "--out", os.path.join(tmp, "artifact"), "--quiet"])
        total, wall = cpu_seconds() - start, time.perf_counter() - wall
    for name, seconds in spent.most_common():
        print(f"{name:42s} {seconds:7.1f} CPU s  {seconds / total:5.1%}  ({calls[name]} calls)")
    print(f"{'the whole build, in line':42s} {total:7.1f} CPU s  (wall {wall:.1f} s)")
    return code or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
