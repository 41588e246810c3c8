"""Text in and out: a checkpoint's Hugging Face tokenizer files, read without transformers.

`TextTokenizer.from_dir(path)` reads `tokenizer.json` (the `tokenizers` library), and beside it
`tokenizer_config.json` (chat template, named special tokens) and `generation_config.json` (EOS
ids). `render_chat` renders the chat template with jinja2 as transformers' `apply_chat_template`
does, `encode`/`decode` map text to ids and back, and `IncrementalDetokenizer` turns a stream of
sampled ids into text pieces that never split a character.

`tokenizers` and `jinja2` are imported inside the functions that use them, so `import runtime`
does not need them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPLACEMENT = "\ufffd"

# The named special tokens transformers passes to a chat template (when set).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Names a message's reasoning may come under; templates read the first (transformers' aliasing).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table): char -> byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_alphabet()


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class TextTokenizer:
    """A checkpoint's tokenizer: encode, decode, EOS ids and the chat template."""

    def __init__(self, tokenizer, *, config: dict | None = None, generation_config: dict | None = None,
                 chat_template: str | None = None, path: Path | None = None):
        self._tok = tokenizer  # tokenizers.Tokenizer
        self.path = path
        self.config = config or {}
        self.generation_config = generation_config or {}
        self.chat_template = chat_template
        self.special_tokens: dict[str, str] = {}
        for name in NAMED_SPECIAL_TOKENS:
            text = _token_text(self.config.get(name))
            if text is not None:
                self.special_tokens[name] = text
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_ids: tuple[int, ...] = self._eos_ids()
        self._template = None  # compiled lazily
        self._byte_pieces: dict[bool, list[bytes] | None] = {}  # built on first use

    # ---------------------------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, path) -> TextTokenizer | None:
        """The tokenizer in `path`, or None when it has no tokenizer.json."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            return None
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise ValueError(f"{file}: not a tokenizers tokenizer.json ({e})") from None
        config = _read_json(path / "tokenizer_config.json") or {}
        generation = _read_json(path / "generation_config.json") or {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates, as transformers saves several
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and (path / "chat_template.jinja").is_file():  # newer transformers save it apart
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{path / 'tokenizer_config.json'}: chat_template is not a string")
        return cls(tok, config=config, generation_config=generation, chat_template=template, path=path)

    def _eos_ids(self) -> tuple[int, ...]:
        eos = self.generation_config.get("eos_token_id")
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError(f"generation_config.json: eos_token_id must be an int or a list of ints, got {eos!r}")
            return tuple(dict.fromkeys(ids))
        text = self.special_tokens.get("eos_token")
        if text is None:
            return ()
        i = self._tok.token_to_id(text)
        if i is None:
            raise ValueError(f"tokenizer_config.json: eos_token {text!r} is not in the vocabulary")
        return (i,)

    # ---------------------------------------------------------------------------------- text <-> ids

    def encode(self, text: str) -> list[int]:
        """The ids of `text`. No BOS/EOS is added; special tokens written in the text are recognised."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of `ids`; bytes that do not form a character come out as U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i stands for. Its decoded text is U+FFFD when it holds part of a
        character; a byte-level BPE piece (Qwen's tokenizers) or a byte-fallback piece (<0xE4>)
        says which bytes exactly. Other tokenizers give the UTF-8 of the token's text."""
        piece = self._tok.id_to_token(int(i))
        if piece is not None:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
            if type(self._tok.decoder).__name__ == "ByteLevel" and all(c in _BYTE_OF for c in piece):
                return bytes(_BYTE_OF[c] for c in piece)
        return self.decode([i]).encode("utf-8")

    def byte_level_pieces(self, skip_special_tokens: bool = False) -> list[bytes] | None:
        """Per id, the bytes `decode` makes of it, when the decoder is byte-level BPE's alone
        (Qwen's, GPT-2's); None for any other decoder. `decode(ids)` is then these bytes joined,
        read as UTF-8 with U+FFFD for each maximal ill-formed subsequence, as tokenizers does
        (Rust's `from_utf8_lossy`, Python's errors="replace"): a token whose characters are all
        byte stand-ins gives those bytes, any other its own UTF-8 (an added token's text); a skipped
        special token and an id with no token give nothing. Built once per flag (a vocabulary of
        150k ids: a fraction of a second)."""
        key = bool(skip_special_tokens)
        if key not in self._byte_pieces:
            self._byte_pieces[key] = self._byte_level_table(key)
        return self._byte_pieces[key]

    def _byte_level_table(self, skip_special_tokens: bool) -> list[bytes] | None:
        if type(self._tok.decoder).__name__ != "ByteLevel":
            return None
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special} \
            if skip_special_tokens else set()
        table = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or piece in special:
                table.append(b"")
            elif all(c in _BYTE_OF for c in piece):
                table.append(bytes(_BYTE_OF[c] for c in piece))
            else:
                table.append(piece.encode("utf-8"))
        return table

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    # ---------------------------------------------------------------------------------- chat

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat template rendered over `messages`, as transformers' apply_chat_template(tokenize=False).

        The template sees `messages`, `add_generation_prompt`, `tools` and `documents` (None unless
        given), the named special tokens that are set (`bos_token`, `eos_token`, ...) and `kwargs`.
        Raises ValueError when there is no chat template or the template rejects the messages.
        """
        if self.chat_template is None:
            where = f" in {self.path}" if self.path is not None else ""
            raise ValueError(f"this tokenizer has no chat_template (tokenizer_config.json{where}): "
                             "send a plain prompt instead of chat messages")
        import jinja2

        if not isinstance(messages, (list, tuple)):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} objects")
        if not messages:
            raise ValueError("messages is empty: a chat needs at least one message")
        chat = []
        for m in messages:
            if not isinstance(m, dict):
                raise ValueError(f"each message must be an object, got {type(m).__name__}")
            # like transformers: drop None values (OpenAI's content=None), alias reasoning fields
            m = {k: v for k, v in m.items() if v is not None}
            reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
            if reasoning is not None:
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
            chat.append(_plain(m))
        tools, documents = kwargs.pop("tools", None), kwargs.pop("documents", None)
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return self._compiled().render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                           add_generation_prompt=bool(add_generation_prompt), **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template: {e.message or e}") from None
        except TypeError as e:  # e.g. a non-string role or content meeting '+' in the template
            raise ValueError(f"chat template could not render these messages: {e}") from None

    def _compiled(self):
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template


def _plain(value: Any) -> Any:
    """A copy of `value` made of plain JSON types only: all that a sandboxed template gets to see."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _compile_template(source: str):
    """Compile a chat template in the environment transformers uses (sandboxed, trim and lstrip
    blocks, loop controls, `raise_exception`, `tojson` without HTML escaping, `strftime_now`, and
    a `{% generation %}` block that just renders its body)."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateNamespace(jinja2.utils.Namespace):
        # no underscore attributes, as in transformers
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {e}") from None


class IncrementalDetokenizer:
    """Sampled ids in, text pieces out, never half a character.

    `push(id)` returns the text that is now final; `flush()` returns the rest at the end of the
    stream. For any ids, the pieces concatenated equal `tokenizer.decode(all ids)`.

    The prefix-offset technique (as vLLM and TGI): decode a window of recent ids that starts at a
    character boundary, and diff it against the text already emitted from that window. A decoded
    tail of U+FFFD may be a character whose bytes have not all arrived, so it is held back; the
    window moves forward whenever its text ends cleanly, which keeps it a few tokens long. The
    previous chunk's ids stay in the window as context for decoders that look at the preceding
    token (SentencePiece's leading space).
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: a character boundary
        self._read = 0  # ids before this are emitted in full
        self._prefix_text = ""  # decode(ids[_prefix:_read])
        self._emitted = 0  # characters of the window's text past _prefix_text already emitted

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        """Add one id; the new text that is safe to emit (possibly empty)."""
        self.ids.append(int(token))
        text = self._decode(self.ids[self._prefix:])
        start = len(self._prefix_text) + self._emitted
        stable = len(text.rstrip(REPLACEMENT))  # a trailing U+FFFD run may still become characters
        out = text[start:stable] if stable > start else ""
        self._emitted += len(out)
        if not text.endswith(REPLACEMENT):
            # everything decoded so far is final: the next window starts at the current read point
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self._decode(self.ids[self._prefix:self._read])
            self._emitted = 0
        return out

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes as U+FFFD); call at the end."""
        text = self._decode(self.ids[self._prefix:])
        out = text[len(self._prefix_text) + self._emitted:]
        self._prefix = self._read = len(self.ids)
        self._prefix_text, self._emitted = "", 0
        return out


class StreamDetokenizer:
    """IncrementalDetokenizer's contract (pieces never split a character; with `flush`, they add
    up to `decode(all ids)`) on tokenizers' own incremental decoder, `DecodeStream`: about a fifth
    of the host time per token. Its pieces are always a prefix of the full decode; what it still
    holds at the end (an unfinished character) is taken from one full decode in `flush`.

    With a byte-level decoder (`TextTokenizer.byte_level_pieces`), `DecodeStream.step`'s own
    algorithm runs here over the ids' bytes, the same pieces without two calls into the tokenizer
    per token: a few times cheaper again. Any other decoder steps `DecodeStream` itself."""

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = False, byte_table: bool = True):
        """byte_table=False: step `DecodeStream` itself whatever the decoder (for comparisons)."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._emitted = 0  # characters returned so far
        self._held = False  # the last push returned nothing: bytes may be waiting
        self._pieces = tokenizer.byte_level_pieces(skip_special_tokens) if byte_table else None
        if self._pieces is None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        else:  # DecodeStream's state: the ids since its last boundary (as bytes), their text, where it ends
            self._window: list[bytes] = []
            self._prefix = ""
            self._prefix_index = 0

    def push(self, token: int) -> str:
        token = int(token)
        self.ids.append(token)
        if self._pieces is None:
            piece = self._stream.step(self.tokenizer._tok, token)
        else:
            piece = self._step(token)
        self._held = piece is None
        piece = piece or ""
        self._emitted += len(piece)
        return piece

    def _step(self, token: int) -> str | None:
        """tokenizers' `step_decode_stream` (decoders.rs), with `decode` over the bytes table: the
        window's text grows past the text it started from and does not end in U+FFFD, the new part
        is emitted, and the window restarts at the ids of this emission."""
        pieces, window = self._pieces, self._window
        window.append(pieces[token] if 0 <= token < len(pieces) else b"")
        string = b"".join(window).decode("utf-8", "replace")
        prefix = self._prefix
        # Rust compares UTF-8 lengths; for a string that starts with the prefix, characters agree
        if len(string) <= len(prefix) or string.endswith(REPLACEMENT):
            return None
        if not string.startswith(prefix):
            raise ValueError("Invalid prefix encountered")  # DecodeStream's error; no byte-level text gets here
        index = len(window) - self._prefix_index
        del window[:self._prefix_index]
        self._prefix = b"".join(window).decode("utf-8", "replace")
        self._prefix_index = index
        return string[len(prefix):]

    def flush(self) -> str:
        if not self._held:
            return ""
        rest = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)[self._emitted:]
        self._emitted += len(rest)
        self._held = False
        return rest
