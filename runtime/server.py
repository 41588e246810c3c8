"""`python -m runtime serve ARTIFACT`: an OpenAI-compatible HTTP server over one engine loop.

FastAPI and uvicorn (what vLLM and SGLang use) and prometheus-client are imported here only, so
`import runtime` stays slim. The server answers /health with 503 while the artifact loads; once it
is ready, every request is validated, tokenized with the checkpoint's tokenizer (copied into the
artifact), and handed to the engine loop, which batches it with whatever else is running. Tokens
stream back as they are sampled; text is detokenized incrementally (never half a character) and
cut at the first stop string. A client that goes away has its request cancelled and its KV pages
freed. SIGTERM stops admission (503), lets running requests finish, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .engine_loop import EngineLoop, QueueFull, TokenEvent
from .openai_api import ApiError, Request, chunk, completion_choice, logprobs_block, parse_chat, parse_completion
from .openai_api import response, usage
from .scheduler import RequestError


class Mailbox:
    """Token events from the engine thread to the asyncio loop, handed over once per step.

    One `call_soon_threadsafe` per event would wake the event loop (a pipe write and a loop
    iteration) for every token of every stream; batching them costs one wake-up per step.
    """

    def __init__(self, aio: asyncio.AbstractEventLoop):
        self._aio = aio
        self._lock = threading.Lock()
        self._pending: list = []

    def post(self, events: asyncio.Queue, event) -> None:
        with self._lock:
            self._pending.append((events, event))

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            self._aio.call_soon_threadsafe(_hand_over, batch)


def _hand_over(batch) -> None:
    for events, event in batch:
        events.put_nowait(event)


class ServerState:
    """What the HTTP side shares: status, the engine loop once loaded, the tokenizer."""

    def __init__(self, artifact: str, model_name: str | None, load_kwargs: dict, loop_kwargs: dict,
                 multi_process: bool = False):
        self.artifact, self.load_kwargs, self.loop_kwargs = artifact, load_kwargs, loop_kwargs
        self.multi_process = multi_process
        self.status = "loading"
        self.model_name = model_name
        self.loop: EngineLoop | None = None
        self.tokenizer = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.on_failure = lambda: None  # the HTTP server sets it: stop serving
        self.mailbox: Mailbox | None = None  # set by the HTTP side before loading starts

    def load(self) -> None:
        """Runs in a thread at startup: the HTTP side answers 503 until this is done."""
        from .engine import load
        from .tokenizer import TextTokenizer

        try:
            engine = load(self.artifact, **self.load_kwargs)
            self.tokenizer = TextTokenizer.from_dir(Path(self.artifact) / "tokenizer")
            self.model_name = self.model_name or engine.manifest.model.name
            eos = self.tokenizer.eos_ids if self.tokenizer else ()
            channel = None
            if self.multi_process:
                from .distributed import StepChannel

                channel = StepChannel()
            self.loop = EngineLoop(engine, eos_ids=eos, channel=channel, **self.loop_kwargs)
            self.loop.after_callbacks = self.mailbox.flush
            self.loop.start()
            self.status = "ready"
        except Exception as e:  # noqa: BLE001 - one line, then the server exits with status 2
            from .format import ArtifactError

            self.status = "failed"
            self.load_error = str(e) if isinstance(e, ArtifactError) else f"{type(e).__name__}: {e}"
            print(f"python -m runtime: error: {self.load_error}", file=sys.stderr, flush=True)
            self.on_failure()

    def check_ready(self) -> None:
        if self.status != "ready":
            raise ApiError(503, f"the server is {self.status}" + (f": {self.load_error}" if self.load_error else ""),
                           type_="service_unavailable")


# ------------------------------------------------------------------------------------ text out

class TextStream:
    """Token ids in, text out: incremental detokenization, EOS kept out of the text, stop strings."""

    def __init__(self, tokenizer, stops: list[str], eos_ids):
        from .tokenizer import IncrementalDetokenizer

        self.tokenizer, self.stops, self.eos_ids = tokenizer, stops, set(eos_ids)
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True) if tokenizer is not None else None
        self.held = ""  # text that might be the start of a stop string
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, token: int, last: bool) -> str:
        """New text to emit after this token; sets `stopped` when a stop string was reached."""
        if self.detok is None:
            return ""
        new = "" if token in self.eos_ids else self.detok.push(token)
        if last:
            new += self.detok.flush()
        return self._cut(self.held + new, last)

    def _cut(self, pending: str, last: bool) -> str:
        hits = [(pending.find(s), s) for s in self.stops if s in pending]
        if hits:
            at = min(hits)[0]
            self.stopped, self.held = True, ""
            return self._emit(pending[:at])
        keep = 0 if last else max((len(s) - 1 for s in self.stops), default=0)
        # hold back the longest tail that could still grow into a stop string
        keep = max((k for k in range(min(keep, len(pending)), 0, -1)
                    if any(s.startswith(pending[-k:]) for s in self.stops)), default=0)
        self.held = pending[len(pending) - keep:] if keep else ""
        return self._emit(pending[:len(pending) - keep])

    def _emit(self, text: str) -> str:
        self.text += text
        return text

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else f"token_id:{token}"


# ------------------------------------------------------------------------------------ the app

def make_app(state: ServerState):
    from .metrics import Metrics

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.mailbox = Mailbox(asyncio.get_running_loop())
        threading.Thread(target=state.load, name="artifact-load", daemon=True).start()
        yield
        if state.loop is not None:
            state.loop.stop(timeout=30)

    app = FastAPI(title="qwen3-moe-aot", lifespan=lifespan)
    metrics = Metrics(state)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        err = ApiError(e.status_code, str(e.detail), type_="invalid_request_error" if e.status_code < 500 else
                       "server_error", code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        err = ApiError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health():
        body = {"status": state.status} | ({"error": state.load_error} if state.load_error else {})
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        state.check_ready()
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                             "owned_by": "qwen3-moe-aot"}]}

    async def body_of(http: HttpRequest) -> dict:
        try:
            body = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        state.check_ready()
        req = parse_completion(await body_of(http), state.loop.engine.num_logprobs)
        return await serve(http, req)

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        state.check_ready()
        req = parse_chat(await body_of(http), state.loop.engine.num_logprobs)
        return await serve(http, req)

    async def serve(http: HttpRequest, req: Request):
        if req.model != state.model_name:
            raise ApiError(404, f"model '{req.model}' does not exist; this server serves '{state.model_name}'",
                           param="model", code="model_not_found")
        prompt = prompt_ids(state, req)
        sched = state.loop.scheduler
        max_tokens = req.max_tokens or sched.max_context - len(prompt)
        try:
            sched.check(prompt, max_tokens)
        except RequestError as e:
            raise ApiError(400, str(e), param="prompt" if "token id" in str(e) else "max_tokens") from None
        events: asyncio.Queue = asyncio.Queue()
        try:
            handle = state.loop.submit(prompt, max_tokens, req.sampling, lambda ev: state.mailbox.post(events, ev))
        except QueueFull as e:
            raise ApiError(429, str(e), type_="rate_limit_error") from None
        text = TextStream(state.tokenizer, req.stop, state.loop.scheduler.eos_ids)
        if req.stream:
            return StreamingResponse(stream(http, req, handle, events, text, len(prompt)),
                                     media_type="text/event-stream")
        ids, entries, finish = [], [], None
        try:
            async for ev in tokens(http, handle, events):
                ids.append(ev.token)
                text.push(ev.token, ev.finish_reason is not None)
                if req.logprobs is not None:
                    entries.append(entry(text, ev))
                finish = ev.finish_reason
                if text.stopped:
                    state.loop.cancel(handle)
                    finish = "stop"
                    break
        finally:
            if not handle.done:
                state.loop.cancel(handle)
        choice = completion_choice(req, text.text, ids, finish, logprobs_block(req, entries))
        return response(req, choice, len(prompt), len(ids))

    async def tokens(http: HttpRequest, handle, events: asyncio.Queue):
        """The request's token events; raises ApiError on an engine error, stops if the client left."""
        while True:
            try:
                async with asyncio.timeout(0.5):  # cheaper per token than wait_for's extra task
                    ev = await events.get()
            except TimeoutError:
                if await http.is_disconnected():
                    state.loop.cancel(handle)
                    return
                continue
            if isinstance(ev, RequestError):
                raise ApiError(400, str(ev))
            if isinstance(ev, BaseException):
                raise ApiError(500, f"the engine failed: {type(ev).__name__}: {ev}", type_="server_error")
            yield ev
            if ev.finish_reason is not None:
                return

    async def stream(http, req: Request, handle, events, text: TextStream, prompt_tokens: int):
        sent = 0
        try:
            if req.kind == "chat":  # the role comes first, as OpenAI streams it
                yield sse(chunk(req, None, [], first=True))
            offset = 0
            async for ev in tokens(http, handle, events):
                piece = text.push(ev.token, ev.finish_reason is not None)
                finish = "stop" if text.stopped else ev.finish_reason
                lp = logprobs_block(req, [entry(text, ev)], offset) if req.logprobs is not None else None
                offset += len(piece)
                sent += 1
                yield sse(chunk(req, piece, [ev.token], finish, lp))
                if text.stopped:
                    state.loop.cancel(handle)
                    break
            if req.include_usage:
                final = chunk(req, None, [])
                final["choices"], final["usage"] = [], usage(prompt_tokens, sent)
                yield sse(final)
            yield b"data: [DONE]\n\n"
        except ApiError as e:
            yield sse(e.body())
        finally:
            if not handle.done:
                state.loop.cancel(handle)  # the client went away mid-stream: free its pages now

    return app


def entry(text: TextStream, ev: TokenEvent):
    return text.token_text(ev.token), ev.logprob, [(text.token_text(t), lp) for t, lp in ev.top]


def sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def prompt_ids(state: ServerState, req: Request) -> list[int]:
    if req.prompt_ids is not None:
        return req.prompt_ids
    if state.tokenizer is None:
        raise ApiError(400, "this artifact has no tokenizer: send the prompt as a list of token ids "
                            "(/v1/completions), or build it from a checkpoint directory with tokenizer.json",
                       param="prompt" if req.kind == "completion" else "messages")
    if req.kind == "chat":
        try:
            rendered = state.tokenizer.render_chat(req.messages, add_generation_prompt=True)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        return state.tokenizer.encode(rendered)
    ids = state.tokenizer.encode(req.prompt_text)
    if not ids:
        raise ApiError(400, "'prompt' is empty after tokenization", param="prompt")
    return ids


# ------------------------------------------------------------------------------------ running it

def run(artifact: str, *, host: str, port: int, max_queue: int, padding_mode: str, mesh: str | None,
        fast_load: bool, model_name: str | None, multi_process: bool = False) -> int:
    import uvicorn

    state = ServerState(artifact, model_name, {"mesh": mesh, "fast_load": fast_load},
                        {"padding_mode": padding_mode, "max_queue": max_queue}, multi_process)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: stop admitting, let running requests finish
            state.status = "draining"
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            """uvicorn's own re-raises the signal after shutting down (exit status -15); a drained
            server has done what SIGTERM asked and exits 0."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(make_app(state), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=None)
    server = Server(config)
    state.on_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    return 2 if state.status == "failed" else 0
