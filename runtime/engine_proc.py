"""The engine in a process of its own, apart from the HTTP process.

The HTTP process (event loop, tokenizer, templates, detokenization, stop strings, SSE) and the
engine (scheduler and device loop) used to share one interpreter and so one GIL: every streamed
token's JSON and socket write competed with planning, packing and collecting, and the device
waited for the host. Here the engine runs in a child process. Out of it comes one message per
step: per request its new token events (with only the top logprobs it asked for), finish reasons
and errors, plus the engine's counters for /metrics. Into it go the new and cancelled requests of
one turn of the HTTP side's event loop, one message per turn, all applied before the next step.

Why a pipe (`multiprocessing.connection` over a socketpair) and not shared memory or ZeroMQ: a
message is a few hundred bytes to a few tens of KB, one per step, so copying it costs microseconds
against a step of milliseconds; what matters is the wake-up, and a pipe is its own wake-up (the
event loop watches its file descriptor; the engine's reader blocks on it). Its end of file is how
each side learns that the other is gone, a SIGKILL included, at once and with no heartbeat.
Shared memory would need a wake-up and a liveness check of its own for no measurable gain, and
ZeroMQ is not a dependency and adds nothing for two processes on one host.

Why fork: the engine process is forked before the HTTP process starts any thread or touches a
device, so it needs no command line or import path of its own, and what a launcher set up in the
interpreter before `runtime.cli.main` (a stand-in device, an injected fault) applies to it too. A
multi-process (multi-host) leader joins the JAX cluster in the engine process, after the fork;
the HTTP process never imports a JAX backend.

Token events cross as tuples of all of `TokenEvent`'s dataclass fields, in field order, so a field
added to it passes through with no change here.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import pickle
import signal
import struct
import sys
import types
from typing import Callable

from .engine_loop import EngineFailed, EngineLoop, QueueFull, TokenEvent, describe
from .sampling import SamplingParams

_FIELDS = tuple(f.name for f in dataclasses.fields(TokenEvent))
_UNLIMITED = 1 << 62  # the HTTP side applies --max-queue; the engine never refuses for it


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What the HTTP side needs of a loaded engine: its name, the cache and vocabulary limits a
    request is checked against before it is sent, and how the load went."""

    model_name: str
    dp: int
    page_size: int
    num_pages: int
    pages_per_seq: int
    vocab_size: int
    buckets: list
    num_logprobs: int
    eos_ids: tuple[int, ...]
    load_info: object


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """How the engine process loads and runs (picklable, though a fork needs no pickling)."""

    artifact: str
    load_kwargs: dict
    padding_mode: str = "auto"
    multi_process: bool = False
    setup: Callable[[], None] | None = None  # run first in the engine process (join a JAX cluster)
    prefix_cache: bool = True


# ------------------------------------------------------------------------------------ the HTTP side

@dataclasses.dataclass(eq=False)
class RemoteHandle:
    """A request sent to the engine process, as the HTTP side sees it."""

    rid: int
    on_event: Callable
    done: bool = False


class EngineClient:
    """The HTTP side's view of the engine process: submit, cancel, its counters, its failure.

    `start` forks the engine; `wait_ready` (on any thread) blocks until it has loaded; `attach`
    hands the pipe to the asyncio loop, after which every call is made on that loop's thread.
    """

    def __init__(self, spec: EngineSpec, max_queue: int):
        self.spec, self.max_queue = spec, max_queue
        self.info: EngineInfo | None = None
        self.limits = None  # a scheduler over the engine's shape: checks a request before it is sent
        self.stats: dict = {}  # the engine's counters, as of its last message
        self.error: str | None = None
        self.on_failure: Callable[[str], None] = lambda message: None
        self._handles: dict[int, RemoteHandle] = {}
        self._outbox: list = []
        self._next_rid = self._sent = 0
        self._step_seconds: list[float] = []
        self._stopping = False
        self._aio = None

    # ---- life

    def start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_engine_main, args=(child, self._conn, self.spec), name="engine",
                                   daemon=True)
        self.process.start()
        child.close()

    def wait_ready(self) -> EngineInfo:
        """Block until the engine has loaded; raise LoadFailed (message, exit code) if it could not."""
        try:
            kind, *body = self._conn.recv()
        except (EOFError, OSError):
            raise LoadFailed(self._death(), 1) from None
        if kind == "load_failed":
            raise LoadFailed(*body)
        self.info = body[0]
        self.limits = _limits(self.info, self.spec.padding_mode)
        return self.info

    def attach(self, aio) -> None:
        """From now on messages are read on the asyncio loop, as they arrive."""
        self._aio = aio
        aio.add_reader(self._conn.fileno(), self._readable)

    def stop(self, timeout: float = 30) -> None:
        """Let the engine finish its step and exit (the multi-process followers are told to stop)."""
        self._stopping = True
        if self.process.is_alive():
            try:
                self._conn.send([("stop",)])
            except OSError:
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    @property
    def failed(self) -> bool:
        return self.error is not None

    # ---- requests

    def submit(self, prompt, max_tokens: int, sampling: SamplingParams, on_event, top_logprobs: int = 0):
        if self.error is not None:
            raise EngineFailed(self.error)
        waiting = self.stats.get("waiting", 0) + self._sent - self.stats.get("received", 0)
        if waiting >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting; retry later")
        rid = self._next_rid
        self._next_rid += 1
        handle = RemoteHandle(rid, on_event)
        self._handles[rid] = handle
        self._send(("submit", rid, list(prompt), max_tokens, sampling, top_logprobs))
        self._sent += 1
        return handle

    def cancel(self, handle: RemoteHandle, reason: str = "cancelled") -> None:
        """End a request early: "cancelled" (its client left) or "stop" (a stop string was found)."""
        if not handle.done:
            handle.done = True
            self._handles.pop(handle.rid, None)
            self._send(("cancel", handle.rid, reason))

    def take_step_seconds(self) -> list[float]:
        times, self._step_seconds = self._step_seconds, []
        return times

    def _send(self, op) -> None:
        """Ops made in one turn of the event loop go as one message, at the end of that turn."""
        if not self._outbox:
            self._aio.call_soon(self._flush)
        self._outbox.append(op)

    def _flush(self) -> None:
        ops, self._outbox = self._outbox, []
        if ops and self.error is None:
            try:
                self._conn.send(ops)
            except OSError:
                pass  # the engine is gone: its end of file is read next, and says so

    # ---- what the engine says

    def _readable(self) -> None:
        try:
            while self._conn.poll():
                self._receive(self._conn.recv())
        except (EOFError, OSError):
            self._aio.remove_reader(self._conn.fileno())
            if not self._stopping and self.error is None:
                self._fail(self._death())

    def _receive(self, message) -> None:
        kind, events, stats = message
        handles = self._handles
        for rid, what, payload in events:
            h = handles.get(rid)
            if h is None:
                continue  # cancelled here meanwhile
            if what == "token":
                ev = TokenEvent(*payload)
                if ev.finish_reason is not None:
                    h.done = True
                    del handles[rid]
                h.on_event(ev)
            else:
                h.done = True
                del handles[rid]
                h.on_event(_error(what, payload))
        if stats is not None:
            self._step_seconds += stats.pop("step_seconds")
            self.stats = stats
        if kind == "failed":
            self._fail(self.stats["error"])

    def _fail(self, message: str) -> None:
        """Every open request ends with an error now; then the owner hears of it."""
        self.error = message
        failure = EngineFailed(message)
        handles, self._handles = self._handles, {}
        for h in handles.values():
            h.done = True
            h.on_event(failure)
        self.on_failure(message)

    def _death(self) -> str:
        self.process.join(1.0)
        code = self.process.exitcode
        how = "closed its pipe but is still running" if code is None else \
            f"was killed by signal {signal.Signals(-code).name}" if code < 0 else \
            f"exited with status {code} without saying why"
        return f"the engine failed: its process (pid {self.process.pid}) {how}"


class LoadFailed(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _error(what: str, payload) -> Exception:
    from .scheduler import RequestError

    return RequestError(payload) if what == "request_error" else EngineFailed(payload)


def _limits(info: EngineInfo, padding_mode: str):
    """A scheduler over the engine's shape alone: `check` and `max_context` as the engine's own."""
    from .scheduler import Scheduler

    shape = types.SimpleNamespace(dp=info.dp, page_size=info.page_size, num_pages=info.num_pages,
                                  pages_per_seq=info.pages_per_seq, vocab_size=info.vocab_size,
                                  buckets=info.buckets, num_logprobs=info.num_logprobs)
    return Scheduler(shape, padding_mode=padding_mode, eos_token_id=list(info.eos_ids) or None,
                     pipeline=False)


# ------------------------------------------------------------------------------------ the engine side

def _engine_main(conn, http_end, spec: EngineSpec) -> None:
    """The engine process: load, say so, then apply the HTTP side's messages until told to stop or
    the HTTP process is gone (its end of the pipe, inherited by the fork, is closed here first, or
    the pipe would never reach its end of file)."""
    http_end.close()
    # A terminal's Ctrl-C, or a supervisor's SIGTERM to the whole process group (systemd does so), is
    # the HTTP process's to handle: it drains, then tells the engine to stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        loop, info = _load(spec)
    except Exception as e:  # noqa: BLE001 - said in one line by the HTTP process
        from .format import ArtifactError

        conn.send(("load_failed", str(e) if isinstance(e, ArtifactError) else f"{type(e).__name__}: {e}", 2))
        return
    outbox = _Outbox(conn, loop)
    loop.after_callbacks = outbox.flush
    loop.on_failure = outbox.failed
    conn.send(("ready", info))
    loop.start()
    handles: dict[int, object] = {}
    while _apply(conn, loop, handles, outbox):
        pass
    loop.stop(timeout=60)


def _load(spec: EngineSpec):
    from pathlib import Path

    from . import engine as engine_module  # looked up at call time: a launcher may have replaced `load`
    from .tokenizer import TextTokenizer

    if spec.setup is not None:
        spec.setup()
    engine = engine_module.load(spec.artifact, **spec.load_kwargs)
    tokenizer = TextTokenizer.from_dir(Path(spec.artifact) / "tokenizer")
    eos = tuple(tokenizer.eos_ids) if tokenizer else ()
    channel = None
    if spec.multi_process:
        from .distributed import StepChannel

        channel = StepChannel()
    loop = EngineLoop(engine, eos_ids=eos, channel=channel, padding_mode=spec.padding_mode, max_queue=_UNLIMITED,
                      prefix_cache=spec.prefix_cache)
    info = EngineInfo(engine.manifest.model.name, engine.dp, engine.page_size, engine.num_pages,
                      engine.pages_per_seq, engine.vocab_size, list(engine.buckets), loop.scheduler.top_logprobs,
                      eos, engine.load_info)
    return loop, info


def _apply(conn, loop: EngineLoop, handles: dict, outbox: "_Outbox") -> bool:
    """Apply one message of the HTTP side; False when it is time to stop."""
    try:
        ops = conn.recv()
    except (EOFError, OSError):
        return False  # the HTTP process is gone: nobody is left to serve
    for op in ops:
        if op[0] == "submit":
            _, rid, prompt, max_tokens, sampling, top = op
            outbox.received += 1
            try:
                handles[rid] = loop.submit(prompt, max_tokens, sampling, functools.partial(outbox.post, rid, handles),
                                           top_logprobs=top)
            except (EngineFailed, QueueFull):
                pass  # the HTTP side hears of the failure in the engine's last message
        elif op[0] == "cancel":
            h = handles.pop(op[1], None)
            if h is not None:
                loop.cancel(h, op[2])
        else:
            return False
    return True


def send_whole(conn, message) -> None:
    """`conn.send(message)` in one write: `Connection.send` writes a message over 16 KiB (a step's
    events for a few hundred streams) as its length, then its bytes, and the reader, woken by the
    length, would wait in a blocking read, its event loop stalled, until this process is scheduled
    again to write the rest. The framing is `Connection`'s own: `recv` reads it."""
    buf = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    data = memoryview(struct.pack("!i", len(buf)) + buf)
    fd = conn.fileno()
    while data:
        data = data[os.write(fd, data):]


class _Outbox:
    """What the engine says, gathered on the loop thread and sent once per step (and once after a
    round of admissions and cancels that changed a counter)."""

    def __init__(self, conn, loop: EngineLoop):
        self.conn, self.loop = conn, loop
        self.events: list = []
        self.received = 0  # submissions read from the HTTP side (guarded by the GIL: one writer)
        self._last: tuple | None = None
        self.error: str | None = None  # set when the engine failed

    def post(self, rid: int, handles: dict, ev) -> None:
        if isinstance(ev, TokenEvent):
            self.events.append((rid, "token", tuple(getattr(ev, f) for f in _FIELDS)))
            if ev.finish_reason is None:
                return
        else:
            from .scheduler import RequestError

            self.events.append((rid, "request_error" if isinstance(ev, RequestError) else "failed", str(ev)))
        handles.pop(rid, None)

    def flush(self, kind: str = "step") -> None:
        stats = self._stats()
        key = tuple(v for k, v in stats.items() if k != "step_seconds")
        if not self.events and not stats["step_seconds"] and key == self._last and kind == "step":
            return
        self._last = key
        events, self.events = self.events, []
        send_whole(self.conn, (kind, events, stats))

    def failed(self, e: BaseException) -> None:
        """On the loop thread, after every open request was told: say why, and end the process."""
        self.error = describe(e)
        self.flush("failed")
        sys.stdout.flush()
        os._exit(1)

    def _stats(self) -> dict:
        loop, sched = self.loop, self.loop.scheduler
        stats, s, engine = loop.stats, sched.stats, loop.engine
        times, stats.step_seconds = stats.step_seconds, []
        return {"received": self.received, "waiting": loop.waiting, "running": sched.running,
                "steps": stats.steps, "prompt_tokens": stats.prompt_tokens,
                "generated_tokens": stats.generated_tokens, "finished": tuple(sorted(stats.finished.items())),
                "real_tokens": s.real_tokens, "padded_tokens": s.padded_tokens, "preemptions": s.preemptions,
                "pages_used": sched.pages_used, "pages_total": sched.dp * (engine.num_pages - 1),
                "compiles_after_load": engine.compiles_after_load, "repeats": getattr(engine, "repeats", 0),
                "transfers": tuple(sorted(getattr(engine, "transfers", {}).items())),
                "prefix_hit_tokens": sched.pages.hit_tokens, "prefix_cached_pages": sched.pages.cached,
                "prefix_evictions": sched.pages.evictions,
                "error": self.error, "step_seconds": times}
