"""`python -m runtime serve ARTIFACT`: an OpenAI-compatible HTTP server over one engine loop.

FastAPI and uvicorn (what vLLM and SGLang use) and prometheus-client are imported here only, so
`import runtime` stays slim; the two generation routes are answered straight from uvicorn (`api`),
the rest (health, metrics, models) through FastAPI. The server answers /health with 503 while the
artifact loads; once it is ready, every request is validated, tokenized with the checkpoint's
tokenizer (copied into the artifact), and handed to the engine loop, which batches it with
whatever else is running. Tokens stream back as they are sampled; text is detokenized
incrementally (never half a character) and cut at the first stop string.

What a fleet relies on: a client that goes away, streamed or not, has its request cancelled at the
next step and its KV pages freed. An engine that fails is seen at once: every open request ends
with an error, /health answers 503 with the cause, new requests get 503, and the process exits 1
so that its supervisor restarts it. SIGTERM stops admission (503, /health too) while running
requests finish, then the process exits 0; a second SIGTERM stops at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import gc
import json
import signal
import sys
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from .engine_loop import EngineFailed, QueueFull
from .engine_proc import EngineClient, EngineSpec
from .openai_api import ApiError, Request, chunk_choice, chunk_head, completion_choice, logprobs_block
from .openai_api import parse_chat, parse_completion
from .openai_api import response, usage
from .scheduler import RequestError

LINGER_S = 1.5  # after an engine failure: long enough for /health to be seen answering 503
PROG = "python -m runtime serve"
HEAVY_TEXT = 2000  # characters: longer prompts are tokenized on a worker thread, off the event loop


def log(message: str) -> None:
    """One line on stdout per event a supervisor wants (address, ready, shutdown); errors go to stderr."""
    print(f"{PROG}: {message}", flush=True)


class ServerState:
    """What the handlers share: status, the engine process, the tokenizer, and how the process
    ends (`exit_code`, and `stop_serving` set by the HTTP server)."""

    def __init__(self, engine: EngineClient, artifact: str, model_name: str | None):
        self.engine, self.artifact = engine, artifact
        self.status = "loading"  # -> ready -> draining, or -> failed
        self.model_name = model_name
        self.tokenizer = None
        self.error: str | None = None
        self.exit_code = 0
        self.created = int(time.time())
        self.in_flight = 0  # API requests being answered (a drain waits for 0)
        self.aio: asyncio.AbstractEventLoop | None = None
        self.stop_serving = lambda: None  # the HTTP server sets it

    def load(self) -> None:
        """Runs in a thread at startup: the HTTP side answers 503 until the engine process has
        loaded the artifact and this one its tokenizer."""
        from .engine_proc import LoadFailed
        from .tokenizer import TextTokenizer

        try:
            self.tokenizer = TextTokenizer.from_dir(Path(self.artifact) / "tokenizer")
            if self.tokenizer is not None:
                self.tokenizer.byte_level_pieces(skip_special_tokens=True)  # streams detokenize with it
            info = self.engine.wait_ready()
        except LoadFailed as e:  # one line, then the server exits with its status
            self.fail(str(e), e.code, linger=0)
            return
        except Exception as e:  # noqa: BLE001 - the tokenizer: one line, exit 2
            self.fail(f"{type(e).__name__}: {e}", 2, linger=0)
            return
        self.model_name = self.model_name or info.model_name
        self.engine.on_failure = self.engine_failed
        self.aio.call_soon_threadsafe(self._serving, info)

    def _serving(self, info) -> None:
        """On the event loop: messages from the engine are read here from now on."""
        self.engine.attach(self.aio)
        if self.status == "loading":  # a SIGTERM during the load leaves it draining
            self.status = "ready"
        # What is loaded by now (the app, the tokenizer's wrappers, every module) lives as long as the
        # process: out of the collector's sight, a full collection walks only what requests allocate.
        gc.collect()
        gc.freeze()
        load = info.load_info
        log(f"ready: model {self.model_name}, mesh {load.mesh}, {load.executables} executables, "
            f"loaded in {load.seconds:.1f} s")

    def engine_failed(self, message: str) -> None:
        """On the event loop, after every open request was told: stop serving, exit 1."""
        self.fail(message, 1, linger=LINGER_S)

    def fail(self, message: str, code: int, linger: float) -> None:
        self.status, self.error, self.exit_code = "failed", message, code
        print(f"python -m runtime: error: {message}", file=sys.stderr, flush=True)
        self.aio.call_soon_threadsafe(self.aio.call_later, linger, self.stop_serving)

    def check_ready(self) -> None:
        if self.status != "ready":
            raise ApiError(503, f"the server is {self.status}" + (f": {self.error}" if self.error else ""),
                           type_="service_unavailable")

    async def drain(self, then) -> None:
        """Wait until no API request is being answered, then call `then` (stop serving)."""
        while self.in_flight:
            await asyncio.sleep(0.05)
        then()


# ------------------------------------------------------------------------------------ text out

class TextStream:
    """Token ids in, text out: incremental detokenization, stop ids kept out of the text, stop strings."""

    def __init__(self, tokenizer, stops: list[str]):
        from .tokenizer import StreamDetokenizer

        self.tokenizer, self.stops = tokenizer, stops
        self.detok = StreamDetokenizer(tokenizer, skip_special_tokens=True) if tokenizer is not None else None
        self.held = ""  # text that might be the start of a stop string
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, token: int, finish_reason: str | None, stops_apply: bool = True) -> str:
        """New text to emit after this token; sets `stopped` when a stop string was reached. The
        token that ended the request by its id (finish "stop": an EOS or a stop token id) adds
        no text; stop strings count only once `stops_apply` (after min_tokens)."""
        if self.detok is None:
            return ""
        new = "" if finish_reason == "stop" else self.detok.push(token)
        last = finish_reason is not None
        if last:
            new += self.detok.flush()
        if not self.stops:  # nothing to look for or hold back
            self.text += new
            return new
        return self._cut(self.held + new, last, self.stops if stops_apply else [])

    def _cut(self, pending: str, last: bool, stops: list[str]) -> str:
        hits = [(pending.find(s), s) for s in stops if s in pending]
        if hits:
            at = min(hits)[0]
            self.stopped, self.held = True, ""
            return self._emit(pending[:at])
        keep = 0 if last else max((len(s) - 1 for s in stops), default=0)
        # hold back the longest tail that could still grow into a stop string
        keep = max((k for k in range(min(keep, len(pending)), 0, -1)
                    if any(s.startswith(pending[-k:]) for s in stops)), default=0)
        self.held = pending[len(pending) - keep:] if keep else ""
        return self._emit(pending[:len(pending) - keep])

    def _emit(self, text: str) -> str:
        self.text += text
        return text

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else f"token_id:{token}"

    def token_bytes(self, token: int) -> bytes:
        return self.tokenizer.token_bytes(token) if self.tokenizer is not None else self.token_text(token).encode()


# ------------------------------------------------------------------------------------ handlers

def _state(http: HttpRequest) -> ServerState:
    return http.app.state.server


async def health(http: HttpRequest):
    state = _state(http)
    body = {"status": state.status} | ({"error": state.error} if state.error else {})
    return JSONResponse(body, status_code=200 if state.status == "ready" else 503)


async def prometheus(http: HttpRequest):
    return PlainTextResponse(http.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "qwen3-moe-aot"}


async def models(http: HttpRequest):
    state = _state(http)
    state.check_ready()
    return {"object": "list", "data": [_model_card(state)]}


async def model(http: HttpRequest, model_id: str):
    state = _state(http)
    state.check_ready()
    if model_id != state.model_name:
        raise ApiError(404, f"model '{model_id}' does not exist; this server serves '{state.model_name}'",
                       param="model", code="model_not_found")
    return _model_card(state)


MAX_BODY_BYTES = 32 << 20  # a request body past this gets a 413: no prompt of any context needs as much


async def body_of(receive) -> dict | None:
    """The request's JSON object, read from the connection (None if the client left first)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


class Connection:
    """What serving a request needs of its connection: `receive`, which a non-streamed request
    watches for its client leaving."""

    __slots__ = ("receive",)

    def __init__(self, receive):
        self.receive = receive


API_ROUTES = {"/v1/completions": parse_completion, "/v1/chat/completions": parse_chat}


async def api(state: ServerState, parse, scope, receive, send) -> None:
    """POST /v1/completions and /v1/chat/completions, straight from the HTTP server: the
    framework's middleware, routing and request objects cost each request more than its parsing
    (a profile of 256 one-token streams put ~18% of the HTTP process there), and these two routes
    need none of it. Errors answer as the framework's handlers would, in the API's shape."""
    try:
        if scope["method"] != "POST":
            raise ApiError(405, f"{scope['path']} takes POST, not {scope['method']}")
        state.check_ready()
        body = await body_of(receive)
        if body is None:
            return
        response = await serve(Connection(receive), state, parse(body, state.engine.info.num_logprobs))
    except ApiError as e:
        response = JSONResponse(e.body(), status_code=e.status)
    except Exception as e:  # noqa: BLE001 - any failure answers 500 in the API's shape
        response = JSONResponse(internal_error(e).body(), status_code=500)
    await response(scope, receive, send)


async def serve(http: Connection, state: ServerState, req: Request):
    if req.model != state.model_name:
        raise ApiError(404, f"model '{req.model}' does not exist; this server serves '{state.model_name}'",
                       param="model", code="model_not_found")
    prompt = await prompt_ids(state, req)
    if not req.stream:
        return JSONResponse(await serve_choices(http, state, req, prompt))
    handles, events = submit_choices(state, req, prompt)
    return EventStream(functools.partial(stream, state, req, handles, events, len(prompt)))


async def serve_choices(http: Connection, state: ServerState, req: Request, prompt: list[int]) -> dict:
    """Not streamed: one engine request per choice (n of them), submitted together, so that the
    prefix cache gives each group's copies of the prompt one set of pages. Choice i samples with
    the request's seed + i, so a seeded request answers the same choices every time. Nothing is
    sent to the client until the end, so only the connection tells that it left: watch it and
    cancel every choice at once."""
    handles, watcher = [], None
    try:
        for i in range(req.n):
            handles.append(submit(state, dataclasses.replace(req, sampling=req.sampling.for_request(i)), prompt))
        watcher = asyncio.create_task(_watch_all(http, state, handles))
        results = await asyncio.gather(*(_choice(state, req, h, events) for h, events in handles))
    finally:
        if watcher is not None:
            watcher.cancel()
        for h, _ in handles:  # a refused submission or a failure cancels the choices already queued
            if not h.done:
                state.engine.cancel(h)
    choices = [choice | {"index": i} for i, (choice, _, _) in enumerate(results)]
    body = response(req, choices[0], len(prompt), sum(n for _, n, _ in results), max(c for _, _, c in results))
    return body | {"choices": choices}


async def _watch_all(http: Connection, state: ServerState, handles) -> None:
    """The client leaving cancels every choice of its request (pages freed at the next step). A
    streamed response has its own watcher (`_until_gone`)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    for handle, events in handles:
        state.engine.cancel(handle)
        events.put(_GONE)


async def _choice(state: ServerState, req: Request, handle, events) -> tuple[dict, int, int]:
    """One choice of a non-streamed request: (choice, completion tokens, cached prompt tokens)."""
    text, ids, entries, offsets, finish, cached = TextStream(state.tokenizer, req.stop), [], [], [], None, 0
    async for ev in tokens(handle, events):
        offsets.append(len(text.text))
        ids.append(ev.token)
        cached = max(cached, ev.cached_tokens)
        text.push(ev.token, ev.finish_reason, len(ids) >= req.sampling.min_tokens)
        if req.logprobs is not None:
            entries.append((ev.token, ev.logprob, ev.top))
        finish = ev.finish_reason
        if text.stopped:
            state.engine.cancel(handle, "stop")
            finish = "stop"
            break
    lp = logprobs_block(req, entries, offsets, text.token_text, text.token_bytes)
    return completion_choice(req, text.text, ids, finish, lp), len(ids), cached


def submit_choices(state: ServerState, req: Request, prompt: list[int]):
    """Streamed: one engine request per choice (choice i with seed + i), all putting their events,
    tagged (i, event), in one queue. A refused submission cancels those already queued."""
    events, handles = Events(), []
    try:
        for i in range(req.n):
            put = functools.partial(lambda i, ev: events.put((i, ev)), i)
            handles.append(submit(state, dataclasses.replace(req, sampling=req.sampling.for_request(i)), prompt,
                                  put)[0])
    except BaseException:
        for h in handles:
            state.engine.cancel(h)
        raise
    return handles, events


def submit(state: ServerState, req: Request, prompt: list[int], put=None):
    """Check the request against the engine's limits and queue it: its handle and its event queue
    (or None, with `put` given: the callback its events go to)."""
    sched = state.engine.limits
    max_tokens = req.max_tokens or sched.max_context - len(prompt)
    where = "prompt" if req.kind == "completion" else "messages"
    if max_tokens < 1:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens, which fills the max context of "
                            f"{sched.max_context}: no room for a new token; shorten it", param=where)
    try:
        sched.check(prompt, max_tokens, req.sampling)
    except RequestError as e:
        msg = str(e)
        param = "min_tokens" if "min_tokens" in msg else "stop_token_ids" if "stop token id" in msg \
            else where if "token id" in msg else "max_tokens"
        raise ApiError(400, msg, param=param) from None
    events = Events() if put is None else None
    try:
        handle = state.engine.submit(prompt, max_tokens, req.sampling, events.put if put is None else put,
                                     top_logprobs=req.logprobs or 0)
    except QueueFull as e:
        raise ApiError(429, str(e), type_="rate_limit_error") from None
    except EngineFailed as e:
        raise ApiError(503, str(e), type_="service_unavailable") from None
    return handle, events


_GONE = object()  # put in a request's event queue when its client disconnected


class Events:
    """A request's events, from the engine client to its handler, on the event loop's thread: a
    deque and, while the handler waits, one future to wake it (asyncio.Queue does more per item)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None

    @property
    def ready(self) -> bool:
        return bool(self._items)

    def put(self, event) -> None:
        self._items.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self):
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


def _engine_error(ev: BaseException) -> ApiError:
    if isinstance(ev, RequestError):
        return ApiError(400, str(ev))
    return ApiError(500, str(ev) if isinstance(ev, EngineFailed) else f"the engine failed: {ev}", type_="server_error")


async def tokens(handle, events):
    """The request's token events; raises ApiError on an engine error, stops if the client left."""
    while True:
        ev = await events.get()
        if ev is _GONE:
            return
        if isinstance(ev, BaseException):
            raise _engine_error(ev)
        yield ev
        if ev.finish_reason is not None:
            return


RAW_SEND = "qwen3_moe.send"  # in the scope: the HTTP server's own `send`, set by `Counted`
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]


class EventStream(Response):
    """A streamed response of server-sent events, written by `write(send, receive)`.

    The status line and headers go through the middleware stack's `send` like any response's (the
    exception handlers see that the response started); the events, body messages the middlewares
    pass through untouched, go straight to the HTTP server's `send`, which this app's outermost
    layer put in the scope: no wrapper per token. The last event goes with the end of the body, in
    one write.
    """

    media_type = "text/event-stream"

    def __init__(self, write):
        self.status_code, self.background, self.raw_headers = 200, None, SSE_HEADERS
        self.write = write

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await self.write(scope.get(RAW_SEND, send), receive)


async def _until_gone(receive, events: "Events") -> None:
    """The client leaving ends its stream (`_GONE`); the stream then cancels its request."""
    while (await receive())["type"] != "http.disconnect":
        pass
    events.put(_GONE)


async def stream(state: ServerState, req: Request, handles: list, events: "Events", prompt_tokens: int,
                 send, receive) -> None:
    """Write a streamed request's events as its tokens arrive: one write per batch of tokens at
    hand (one token, unless the client lags), the last token with [DONE] and the end of the body.
    `events` holds (choice index, event) of the request's n engine requests (n > 1: choices
    interleaved, each event naming its index as OpenAI streams them, each choice with its own
    stop strings and finish; a chat stream opens every choice with its role); one usage event
    counts them all. An engine error ends the stream with an error event."""
    n = len(handles)
    texts = [TextStream(state.tokenizer, req.stop) for _ in handles]
    sent, done, left, cached = [0] * n, [False] * n, n, 0
    event = ChunkEncoder(req)
    plain = req.logprobs is None  # a token's event from the encoder's template
    min_tokens = req.sampling.min_tokens
    out = []  # events for the tokens at hand
    watcher = asyncio.ensure_future(_until_gone(receive, events))
    try:
        if req.kind == "chat":  # the role comes first, as OpenAI streams it
            out += [event(chunk_choice(req, None, [], first=True) | {"index": i}) for i in range(n)]
        while left:  # `tokens()` inlined: an async generator's resume costs per token on this path
            if out and not events.ready:  # what is at hand goes now; the last goes with [DONE]
                await send({"type": "http.response.body", "body": b"".join(out) if len(out) > 1 else out[0],
                            "more_body": True})
                out = []
            item = await events.get()
            if item is _GONE:
                return
            i, ev = item
            if isinstance(ev, BaseException):
                raise _engine_error(ev)
            if done[i]:  # after its stop string: the cancel crossed a token already sampled
                continue
            sent[i] += 1
            if ev.cached_tokens > cached:
                cached = ev.cached_tokens
            text = texts[i]
            if plain:
                piece = text.push(ev.token, ev.finish_reason, sent[i] >= min_tokens)
                out.append(event.token(piece, ev.token, "stop" if text.stopped else ev.finish_reason, i))
            else:
                offset = len(text.text)
                piece = text.push(ev.token, ev.finish_reason, sent[i] >= min_tokens)
                lp = logprobs_block(req, [(ev.token, ev.logprob, ev.top)], [offset], text.token_text,
                                    text.token_bytes)
                choice = chunk_choice(req, piece, (ev.token,), "stop" if text.stopped else ev.finish_reason, lp)
                out.append(event(choice | {"index": i}))
            if text.stopped:
                state.engine.cancel(handles[i], "stop")
            if text.stopped or ev.finish_reason is not None:
                done[i] = True
                left -= 1
        if req.include_usage:
            out.append(sse(chunk_head(req) | {"choices": [], "usage": usage(prompt_tokens, sum(sent), cached)}))
        out.append(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"".join(out), "more_body": False})
    except ApiError as e:  # the engine failed: an error event, then the stream closes
        await send({"type": "http.response.body", "body": b"".join(out) + sse(e.body()), "more_body": False})
    finally:
        watcher.cancel()
        for h in handles:
            if not h.done:
                state.engine.cancel(h)  # the client went away mid-stream: free its pages now


_encode = json.JSONEncoder(separators=(",", ":")).encode
_string = json.encoder.encode_basestring_ascii  # what `_encode` writes for a str (ensure_ascii)


def sse(obj: dict) -> bytes:
    return b"data: %s\n\n" % _encode(obj).encode()


class ChunkEncoder:
    """A stream's events as `sse(chunk(...))` writes them, with the part every event repeats (id,
    object, created, model) encoded once: per token, only the choice is encoded. `token` writes a
    token's event without logprobs from a template: the text piece, the finish reason and the id
    filled in, the same bytes as encoding `chunk_choice` whole."""

    def __init__(self, req: Request):
        self.head = b"data: %s,\"choices\":[" % _encode(chunk_head(req))[:-1].encode()
        self._text_key = b',"delta":{"content":' if req.kind == "chat" else b',"text":'
        close = b"}" if req.kind == "chat" else b""
        self._before_text = {}  # per choice index
        self._after_text = close + b',"logprobs":null,"finish_reason":'
        self._finish = {None: b"null"}

    def __call__(self, choice: dict) -> bytes:
        return b"%s%s]}\n\n" % (self.head, _encode(choice).encode())

    def token(self, text: str, token: int, finish_reason: str | None, index: int = 0) -> bytes:
        finish = self._finish.get(finish_reason)
        if finish is None:
            finish = self._finish[finish_reason] = _encode(finish_reason).encode()
        before = self._before_text.get(index)
        if before is None:
            before = self._before_text[index] = b'%s{"index":%d%s' % (self.head, index, self._text_key)
        return b'%s%s%s%s,"token_ids":[%d]}]}\n\n' % (before, _string(text).encode(), self._after_text, finish, token)


async def prompt_ids(state: ServerState, req: Request) -> list[int]:
    """The prompt's token ids. Templates and long texts are worked on a thread: the event loop
    keeps streaming other requests' tokens meanwhile (the tokenizer releases the GIL)."""
    if req.prompt_ids is not None:
        return req.prompt_ids
    tok = state.tokenizer
    if tok is None:
        raise ApiError(400, "this artifact has no tokenizer: send the prompt as a list of token ids "
                            "(/v1/completions), or build it from a checkpoint directory with tokenizer.json",
                       param="prompt" if req.kind == "completion" else "messages")
    if req.kind == "chat":
        try:
            rendered = await asyncio.to_thread(tok.render_chat, req.messages, add_generation_prompt=True)
            return await asyncio.to_thread(tok.encode, rendered)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
    text = req.prompt_text
    ids = await asyncio.to_thread(tok.encode, text) if len(text) > HEAVY_TEXT else tok.encode(text)
    if not ids:
        raise ApiError(400, "'prompt' is empty after tokenization", param="prompt")
    return ids


# ------------------------------------------------------------------------------------ the app

async def api_error(_, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status)


async def http_error(_, e: HTTPException):
    err = ApiError(e.status_code, str(e.detail), type_="invalid_request_error" if e.status_code < 500 else
                   "server_error", code="not_found" if e.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=e.status_code)


def internal_error(e: Exception) -> ApiError:
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error")


async def server_error(_, e: Exception):
    return JSONResponse(internal_error(e).body(), status_code=500)


def make_app(state: ServerState) -> FastAPI:
    from .metrics import Metrics

    app = FastAPI(title="qwen3-moe-aot")
    app.state.server, app.state.metrics = state, Metrics(state)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    # /v1/completions and /v1/chat/completions never get here: `Counted` answers them (`api`)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", model, methods=["GET"])
    return app


class Counted:
    """ASGI wrapper that counts the API requests being answered, streams included until their
    last byte: a drain waits for them to reach 0."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        self.state.in_flight += 1
        scope[RAW_SEND] = send
        try:
            parse = API_ROUTES.get(scope["path"])
            if parse is not None:
                await api(self.state, parse, scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


# ------------------------------------------------------------------------------------ running it

def run(artifact: str, *, host: str, port: int, max_queue: int, padding_mode: str, mesh: str | None,
        fast_load: bool, model_name: str | None, multi_process: bool = False, setup=None,
        prefix_cache: bool = True, kv_cache_dtype: str | None = None) -> int:
    """Serve until drained or failed; the exit status. `setup` runs first in the engine process
    (a multi-process leader joins the JAX cluster there). kv_cache_dtype: the KV cache dtype the
    caller expects the artifact to have (the engine refuses another)."""
    import uvicorn

    # Forked first, before this process has a thread or a listening socket to hand down.
    load_kwargs = {"mesh": mesh, "fast_load": fast_load, "kv_cache_dtype": kv_cache_dtype}
    engine = EngineClient(EngineSpec(artifact, load_kwargs, padding_mode, multi_process, setup, prefix_cache), max_queue)
    engine.start()
    state = ServerState(engine, artifact, model_name)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            """Listening first (/health answers 503 while loading), then the load starts."""
            await super().startup(sockets)
            if self.should_exit:  # could not bind: uvicorn has said why
                state.exit_code = 1
                return
            state.aio = asyncio.get_running_loop()
            log(f"listening on http://{host}:{port}, loading {artifact}")
            threading.Thread(target=state.load, name="artifact-load", daemon=True).start()

        def handle_exit(self, sig, frame):
            """The first SIGTERM / SIGINT drains: admission stops (503, /health too) while the
            listener stays open and running requests finish; a second one stops at once."""
            if state.status in ("ready", "loading") and state.aio is not None:
                state.status = "draining"
                log(f"draining: {state.in_flight} requests in flight, new ones get 503")
                stop = super().handle_exit
                state.aio.call_soon_threadsafe(lambda: state.aio.create_task(state.drain(lambda: stop(sig, frame))))
                return
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

    config = uvicorn.Config(Counted(make_app(state), state), host=host, port=port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=None)
    server = Server(config)

    def stop_serving():
        server.should_exit = True
        if state.status == "failed":  # connections that would keep a dead server up are not waited for long
            state.aio.call_later(5.0, lambda: setattr(server, "force_exit", True))

    state.stop_serving = stop_serving
    try:
        server.run()
    finally:
        engine.stop(timeout=30)
    log(f"shut down ({state.status}{': ' + state.error if state.error else ''}), exit {state.exit_code}")
    return state.exit_code
