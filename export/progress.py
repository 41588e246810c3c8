"""What a build prints: the plan up front, progress per stage, a closing summary.

Each executable goes through up to four stages (exported, compiled, verified on its probe, timed).
Compiles run in parallel and finish out of order, so every stage counts completions as they happen,
from whichever thread finishes them: a bar that waited for the slowest job would look stuck.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from runtime.format import Manifest


class Reporter:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.console = Console(stderr=True, quiet=quiet)
        self.progress = None
        self.tasks: dict[str, int] = {}
        self.t0 = time.perf_counter()
        self.jobs = 1

    def plan(self, model: str, out: Path, plans: dict, platforms) -> None:
        self.t0 = time.perf_counter()
        total = sum(len(b) for b in plans.values())
        self.console.print(f"[bold]{model}[/] -> {out}  platforms: {', '.join(platforms)}")
        for mesh, buckets in plans.items():
            modes = {}
            for b in buckets:
                modes.setdefault(b.mode, []).append(b)
            parts = [f"{m}: " + " ".join(f"t{b.tokens}" + (f"/g{b.global_len}" if m == "sum_len" else "")
                                         for b in bs) for m, bs in modes.items()]
            self.console.print(f"  mesh {mesh}: {len(buckets)} executables ({'; '.join(parts)})")
        self.console.print(f"  {total} executables in all")

    def up_to_date(self, out: Path) -> None:
        self.console.print(f"{out} is up to date (same inputs hash, checksums verified); nothing to build")

    def start(self, exports: int, compiles: int, verifies: int, weights: int, jobs: int = 1) -> None:
        self.jobs = jobs
        if self.quiet:
            return
        self.progress = Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=False)
        self.progress.start()
        stages = (("weights", weights), ("exported", exports), ("compiled", compiles), ("verified", verifies),
                  ("timed", verifies))
        self.tasks = {stage: self.progress.add_task(stage, total=n) for stage, n in stages if n}

    def _advance(self, stage: str, what: str) -> None:
        if self.progress and stage in self.tasks:
            self.progress.update(self.tasks[stage], advance=1, description=f"{stage} {what}")

    def advance_weights(self) -> None:
        if self.progress and "weights" in self.tasks:
            self.progress.advance(self.tasks["weights"])

    def exported(self, mesh, bucket) -> None:
        self._advance("exported", f"{mesh} {bucket.name}")

    def compiled(self, mesh, bucket) -> None:
        self._advance("compiled", f"{mesh} {bucket.name}")

    def verified(self, mesh, bucket) -> None:
        self._advance("verified", f"{mesh} {bucket.name}")

    def timed(self, mesh, bucket) -> None:
        self._advance("timed", f"{mesh} {bucket.name}")

    def note(self, text: str) -> None:
        """One line beside the bars (printed above them while they run)."""
        self.console.print(text)

    def summary(self, out: Path, manifest: Manifest) -> None:
        if self.progress:
            self.progress.stop()
        if self.quiet:
            return
        wall = time.perf_counter() - self.t0
        files = manifest.files
        size = lambda prefix: sum((out / f).stat().st_size for f in files if f.startswith(prefix))  # noqa: E731
        table = Table(title=f"{out}")
        for col in ("mesh", "executables", "compiled here", "export KiB", "compile s, summed", "max probe error"):
            table.add_column(col, justify="right")
        compile_total = 0.0
        for mesh in manifest.meshes:
            ex = manifest.executables_of(mesh.name)
            kib = sum((out / e.file).stat().st_size for e in ex) / 1024
            compile_s = sum(e.compile_seconds or 0.0 for e in ex)
            compile_total += compile_s
            err = max((e.probe_max_error or 0.0 for e in ex), default=0.0)
            table.add_row(mesh.name, str(len(ex)), "yes" if mesh.compiled_here else "no (exported only)",
                          f"{kib:.0f}", f"{compile_s:.1f}", f"{err:.1e}" if mesh.compiled_here else "-")
        self.console.print(table)
        self.console.print(f"weights {size('weights/') / 2**20:.1f} MiB, exports {size('exec/') / 2**20:.1f} MiB, "
                           f"fast-load {size('fastload/') / 2**20:.1f} MiB, {len(files)} files")
        self.console.print(f"built in {wall:.1f} s wall; compiling took {compile_total:.1f} s summed over the "
                           f"executables, {self.jobs} at a time (--jobs)")
