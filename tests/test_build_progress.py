"""What a build reports while it runs, and what it writes beside the exports: progress in the order
work finishes, an honest summary, the fast-load cache holding the executables alone, the tokenizer's
context set to the artifact's."""

import dataclasses
import json
import re
import threading
import time

from conftest import build_artifact
from dp_attention import MeshShape
from export.progress import Reporter
from runtime import engine as rt_engine
from runtime import format as fmt

from test_export import ROOT


class Recorder(Reporter):
    """Prints nothing; records (stage, bucket name, thread) as each stage of each executable ends."""

    def __init__(self):
        super().__init__(quiet=True)
        self.events, self.totals = [], None
        self.compiled_any = threading.Event()  # set when some executable is reported compiled

    def start(self, exports, compiles, verifies, weights, jobs=1):
        super().start(exports, compiles, verifies, weights, jobs)
        self.totals = {"exported": exports, "compiled": compiles, "verified": verifies, "timed": verifies}

    def _advance(self, stage, what):
        self.events.append((stage, what.split()[-1], threading.current_thread() is threading.main_thread()))
        if stage == "compiled":
            self.compiled_any.set()


def test_progress_follows_completion_and_the_summary_adds_compile_time(tmp_path, monkeypatch, capsys):
    """The first export is made to compile last (it waits until another executable is reported
    compiled, whatever else shares the pool and however loaded the machine): it must be reported
    compiled after the second, as it happens, not held back to submission order; every stage then
    counts every executable."""
    compile_one = rt_engine.Engine.compile_one
    slow = [True]

    def slow_first(self, bucket):
        if slow[0] and bucket.tokens == 4:  # the first of the ladder, submitted first
            assert recorder.compiled_any.wait(300), "the second executable never compiled"
        return compile_one(self, bucket)

    monkeypatch.setattr(rt_engine.Engine, "compile_one", slow_first)
    from export.build import BuildConfig, build

    recorder, outs = Recorder(), []
    # Built twice from this one line (an export records where it was traced from): the second time
    # compiled one at a time, in submission order.
    for name, jobs, report in (("a", 2, recorder), ("b", 1, None)):
        outs.append(build(BuildConfig(out=tmp_path / name, meshes=(MeshShape(1, 1),), token_ladder=(4, 8),
                                      modes=("max_len",), jobs=jobs, fast_load=False), report))
        slow[0] = False
    out = outs[0]
    names = [e.bucket.name for e in fmt.read_manifest(out).executables]  # in submission order
    assert names[0].startswith("max_len-t4-")
    compiled = [name for stage, name, _ in recorder.events if stage == "compiled"]
    assert compiled == names[::-1], recorder.events  # the slow first one last: completion order
    assert not any(main for stage, _, main in recorder.events if stage == "compiled")  # from the compile jobs
    for stage, total in recorder.totals.items():
        assert [s for s, _, _ in recorder.events].count(stage) == total == 2, (stage, recorder.events)
    for name in names:  # each executable's stages in order
        stages = [s for s, n, _ in recorder.events if n == name]
        assert stages == ["exported", "compiled", "verified", "timed"], stages

    # Both builds wrote the same bytes in every file but XLA's own serialized executables
    # (fast-load, off here, holds those) and the manifest's timings.
    one, two = (fmt.read_manifest(o) for o in outs)
    assert one.files == two.files and len(one.files) > 10

    def untimed(m):
        return dataclasses.replace(m, build=dataclasses.replace(m.build, created=""), executables=tuple(
            dataclasses.replace(e, export_seconds=0, compile_seconds=0, step_seconds=None) for e in m.executables))

    assert untimed(one) == untimed(two)

    # The summary of a printed build: wall time and the compile seconds summed from the manifest.
    printing = Reporter()
    printing.jobs = 2
    printing.t0 = time.perf_counter() - 12.0
    printing.summary(out, fmt.read_manifest(out))
    err = capsys.readouterr().err
    summed = sum(e.compile_seconds for e in fmt.read_manifest(out).executables)
    m = re.search(r"built in ([\d.]+) s wall; compiling took ([\d.]+) s summed over the executables, 2 at a time",
                  re.sub(r"\s+", " ", err))
    assert m, err
    assert float(m.group(1)) >= 12.0 and abs(float(m.group(2)) - summed) < 0.06


def test_fast_load_holds_the_executables_and_nothing_else(tiny_artifact):
    """The reference step compiles in the same process: none of it may land in the fast-load cache,
    and a load takes every executable from it."""
    m = fmt.read_manifest(tiny_artifact)
    assert len(m.fastload["cpu"].files) == len(m.executables)
    engine = rt_engine.load(tiny_artifact)
    assert engine.load_info.fast_load_hits == len(engine.buckets) == len(m.executables)


def test_tokenizer_context_is_the_artifact_s(tiny_artifact):
    m = fmt.read_manifest(tiny_artifact)
    source = json.loads((ROOT / "dp_attention" / "assets" / "qwen3-moe-tiny" / "tokenizer_config.json").read_text())
    copied = json.loads((tiny_artifact / "tokenizer" / "tokenizer_config.json").read_text())
    context = m.cache.pages_per_seq * m.cache.page_size
    assert copied["model_max_length"] == context == 256 != source["model_max_length"]
    assert m.tokenizer_model_max_length == source["model_max_length"]
    assert {k: v for k, v in copied.items() if k != "model_max_length"} == \
        {k: v for k, v in source.items() if k != "model_max_length"}
    assert list(copied) == list(source)  # the same keys in the same order: only the value changed
