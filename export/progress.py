"""What a build prints: the plan up front, a progress bar over executables, a closing summary."""

from __future__ import annotations

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

    def plan(self, model: str, out: Path, plans: dict, platforms) -> None:
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

    def start(self, executables: int, weights: int) -> None:
        if self.quiet:
            return
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=False)
        self.progress.start()
        self._weights = self.progress.add_task("weights", total=weights)
        self._export = self.progress.add_task("export", total=executables)
        self._compile = self.progress.add_task("compile+verify", total=executables)

    def advance_weights(self) -> None:
        if self.progress:
            self.progress.advance(self._weights)

    def exported(self, mesh, bucket) -> None:
        if self.progress:
            self.progress.update(self._export, advance=1, description=f"export {mesh} {bucket.name}")

    def compiled(self, mesh, bucket) -> None:
        if self.progress:
            self.progress.update(self._compile, advance=1, description=f"compile {mesh} {bucket.name}")

    def summary(self, out: Path, manifest: Manifest) -> None:
        if self.progress:
            self.progress.stop()
        if self.quiet:
            return
        files = manifest.files
        size = lambda prefix: sum((out / f).stat().st_size for f in files if f.startswith(prefix))  # noqa: E731
        table = Table(title=f"{out}")
        for col in ("mesh", "executables", "compiled here", "export KiB", "compile s", "max probe error"):
            table.add_column(col, justify="right")
        for mesh in manifest.meshes:
            ex = manifest.executables_of(mesh.name)
            kib = sum((out / e.file).stat().st_size for e in ex) / 1024
            compile_s = sum(e.compile_seconds or 0.0 for e in ex)
            err = max((e.probe_max_error or 0.0 for e in ex), default=0.0)
            table.add_row(mesh.name, str(len(ex)), "yes" if mesh.compiled_here else "no (exported only)",
                          f"{kib:.0f}", f"{compile_s:.1f}", f"{err:.1e}" if mesh.compiled_here else "-")
        self.console.print(table)
        self.console.print(f"weights {size('weights/') / 2**20:.1f} MiB, exports {size('exec/') / 2**20:.1f} MiB, "
                           f"fast-load {size('fastload/') / 2**20:.1f} MiB, {len(files)} files")
