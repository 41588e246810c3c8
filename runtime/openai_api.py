"""The OpenAI API's request and response shapes, with no HTTP framework in sight.

Requests are checked field by field: anything this server does not implement is refused with a
400 that names the field, rather than silently ignored (a client asking for n=3 or a logit bias
must not get something else). Responses follow the OpenAI schema; `token_ids` on each choice is an
extension that carries the generated ids (useful for token-id prompts and for artifacts without a
tokenizer).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
import uuid

from .sampling import SamplingParams


class ApiError(Exception):
    """An error with its HTTP status and OpenAI error type; `param` names the offending field."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code = code or {400: "invalid_request", 404: "model_not_found", 429: "rate_limit_exceeded",
                             503: "unavailable"}.get(status, "error")

    def body(self) -> dict:
        # a message quoting the client's own bad text must still encode as UTF-8
        message = self.message.encode("utf-8", "backslashreplace").decode("utf-8")
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}}


# Fields accepted with any value (informational), and fields accepted only at their neutral value.
_IGNORED = {"user", "stream_options", "service_tier", "metadata", "store"}
_NEUTRAL = {"best_of": 1, "echo": False, "presence_penalty": 0, "frequency_penalty": 0,
            "logit_bias": None, "suffix": None, "parallel_tool_calls": None, "tools": None, "tool_choice": None,
            "functions": None, "function_call": None, "modalities": None}
# top_k, ignore_eos, min_tokens and stop_token_ids are extensions (vLLM's and SGLang's): load tools
# send the last three to fix output lengths.
_COMMON = {"n", "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "response_format",
           "ignore_eos", "min_tokens", "stop_token_ids"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}


@dataclasses.dataclass
class Request:
    """A validated request, whichever endpoint it came from."""

    kind: str  # "completion" | "chat"
    model: str
    prompt_text: str | None  # to tokenize (None: prompt_ids given)
    prompt_ids: list[int] | None
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    logprobs: int | None  # None: no logprobs; else that many top alternatives
    include_usage: bool = False
    messages: list[dict] | None = None  # chat: text content only
    n: int = 1  # choices: choice i samples with seed + i (greedy ones are all alike)
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


MAX_CHOICES = 16


def _choices(body: dict) -> int:
    return _number(body, "n", 1, lo=1, hi=MAX_CHOICES, integer=True)


def _number(body, name, default, lo=None, hi=None, integer=False, lo_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if integer:
        ok = ok and float(value).is_integer()
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]" if lo is not None else ""
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind}{' in ' + rng if rng else ''}, got {value!r}", param=name)
    return int(value) if integer else float(value)


def _check_fields(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed or name in _IGNORED:
            continue
        if name in _NEUTRAL:
            if value is not None and value != _NEUTRAL[name] and value not in ({}, []):
                raise ApiError(400, f"'{name}'={value!r} is not supported by this server "
                                    f"(only {_NEUTRAL[name]!r})", param=name)
            continue
        raise ApiError(400, f"unsupported field '{name}'", param=name)


def _sampling(body: dict) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0, lo=0, hi=2)
    top_p = _number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)
    top_k = _number(body, "top_k", 0, lo=-1, integer=True)
    seed = body.get("seed")
    seed = secrets.randbelow(2**31) if seed is None else _number(body, "seed", 0, integer=True)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise ApiError(400, f"'stop_token_ids' must be a list of token ids, got {stop_ids!r}", param="stop_token_ids")
    return SamplingParams(temperature, max(top_k, 0), top_p, seed % 2**31, ignore_eos=_bool(body, "ignore_eos"),
                          stop_token_ids=tuple(stop_ids), min_tokens=_number(body, "min_tokens", 0, lo=0, integer=True))


def _response_format(body: dict) -> None:
    """Plain text is what this server produces; JSON modes would need constrained decoding."""
    fmt = body.get("response_format")
    if fmt is None or fmt == {"type": "text"}:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    raise ApiError(400, f"'response_format' {kind!r} is not supported; only {{'type': 'text'}}",
                   param="response_format")


def valid_text(value: str, param: str) -> str:
    """`value`, if it is text UTF-8 can carry: JSON's \\ud800 escapes give lone surrogates, which
    no tokenizer (nor a UTF-8 response) can take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"'{param}' holds a lone UTF-16 surrogate {value[e.start]!r} at character "
                            f"{e.start}; send valid Unicode", param=param) from None
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    return [valid_text(s, "stop") for s in stops]


def parse_completion(body: dict, max_logprobs: int) -> Request:
    _check_fields(body, COMPLETION_FIELDS)
    _response_format(body)
    prompt = body.get("prompt")
    text, ids = None, None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        text = valid_text(prompt, "prompt")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise ApiError(400, "'prompt' must be a string or a non-empty list of token ids (one prompt per request)",
                       param="prompt")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _number(body, "logprobs", 0, lo=0, hi=max_logprobs, integer=True)
    return Request("completion", _model(body), text, ids, _max_tokens(body, "max_tokens", 16), _sampling(body),
                   _stop(body), _bool(body, "stream"), logprobs, _include_usage(body), n=_choices(body))


def parse_chat(body: dict, max_logprobs: int) -> Request:
    _check_fields(body, CHAT_FIELDS)
    _response_format(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    messages = [{"role": m["role"], "content": _content(m.get("content"))} for m in messages]
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    logprobs = None
    if _bool(body, "logprobs"):
        logprobs = _number(body, "top_logprobs", 0, lo=0, hi=max_logprobs, integer=True)
    elif body.get("top_logprobs") is not None:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return Request("chat", _model(body), None, None, _max_tokens(body, name, None), _sampling(body), _stop(body),
                   _bool(body, "stream"), logprobs, _include_usage(body), messages, n=_choices(body))


def _content(content) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines, as vLLM does)."""
    if isinstance(content, str):
        return valid_text(content, "messages")
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content} - {"text"}
        if kinds:
            raise ApiError(400, f"message content parts of type {sorted(map(str, kinds))} are not supported; "
                                "this model reads text parts only", param="messages")
        if all(isinstance(p.get("text"), str) for p in content):
            return valid_text("\n".join(p["text"] for p in content), "messages")
    raise ApiError(400, "a message's 'content' must be a string or a list of {'type': 'text', 'text': ...} parts",
                   param="messages")


def _model(body) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required", param="model")
    return model


def _max_tokens(body, name, default):
    if body.get(name) is None and default is None:
        return None  # until the end of the context
    return _number(body, name, default, lo=1, integer=True)


def _bool(body, name) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {value!r}", param=name)
    return value


def _include_usage(body) -> bool:
    options = body.get("stream_options") or {}
    return isinstance(options, dict) and bool(options.get("include_usage"))


# ------------------------------------------------------------------------------------ responses

def completion_choice(req: Request, text: str, token_ids, finish_reason, logprobs=None) -> dict:
    if req.kind == "chat":
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason, "token_ids": list(token_ids)}
    return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "token_ids": list(token_ids)}


def response(req: Request, choice: dict, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"id": ("chatcmpl-" if req.kind == "chat" else "cmpl-") + req.id,
            "object": "chat.completion" if req.kind == "chat" else "text_completion",
            "created": req.created, "model": req.model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage block; `cached_tokens`: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chunk(req: Request, text: str | None, token_ids, finish_reason=None, logprobs=None, first=False) -> dict:
    """One server-sent event of a stream."""
    return chunk_head(req) | {"choices": [chunk_choice(req, text, token_ids, finish_reason, logprobs, first)]}


def chunk_head(req: Request) -> dict:
    """What every event of a stream repeats (a streaming server encodes it once)."""
    return {"id": ("chatcmpl-" if req.kind == "chat" else "cmpl-") + req.id,
            "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
            "created": req.created, "model": req.model}


def chunk_choice(req: Request, text: str | None, token_ids, finish_reason=None, logprobs=None, first=False) -> dict:
    if req.kind == "chat":
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                "token_ids": list(token_ids)}
    return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason,
            "token_ids": list(token_ids)}


def logprobs_block(req: Request, entries, offsets, text_of, bytes_of):
    """OpenAI logprobs for some tokens. entries: (token id, logprob, [(alternative id, logprob)]);
    offsets: where each token's text starts in the choice's text; text_of / bytes_of: a token's
    text and its own bytes (a piece of a character has bytes, but its text is U+FFFD)."""
    if req.logprobs is None or not entries:
        return None
    if req.kind == "chat":
        return {"content": [{"token": text_of(t), "logprob": lp, "bytes": list(bytes_of(t)),
                             "top_logprobs": [{"token": text_of(a), "logprob": alp, "bytes": list(bytes_of(a))}
                                              for a, alp in top[:req.logprobs]]}
                            for t, lp, top in entries]}
    return {"tokens": [text_of(t) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [_by_text(top[:req.logprobs], text_of) for _, _, top in entries],
            "text_offset": list(offsets)}


def _by_text(top, text_of) -> dict[str, float]:
    """The completions API keys alternatives by text; two tokens with one text (pieces of a
    character, spellings with and without a merge) keep both: the second under its id."""
    out: dict[str, float] = {}
    for i, lp in top:
        key = text_of(i)
        out["token_id:%d" % i if key in out else key] = lp
    return out
