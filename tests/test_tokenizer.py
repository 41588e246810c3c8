"""runtime.tokenizer over the committed tokenizers (tests/golden/make_tokenizers.py writes them)."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from runtime.tokenizer import IncrementalDetokenizer, StreamDetokenizer, TextTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
PRESET_DIR = ROOT / "dp_attention" / "assets" / "qwen3-moe-tiny"
DIRS = {"qwen3-moe-tiny": PRESET_DIR, "hf-tiny-a": GOLDEN / "hf-tiny-a", "hf-tiny-b": GOLDEN / "hf-tiny-b"}

TEXTS = [
    "héllo 世界 🙂",
    "The quick brown fox jumps over the lazy dog.",
    "Bonjour, ça va ? Grüße aus Köln. ¿Qué tal, señor?",
    "Привет, мир! Γειά σου κόσμε! مرحبا بالعالم! שלום עולם! नमस्ते दुनिया!",
    "你好，世界！こんにちは、世界！안녕하세요, 세계!",
    "emoji: 👍🎉❤️😀🚀✨ 👨‍👩‍👧‍👦 🇫🇷 𝄞 龘",  # ZWJ sequence, flag, astral-plane characters
    "def f(x):\n\treturn x ** 2  # tabs, newlines\r\n\n   trailing spaces   ",
    "controls \x00\x01\x1f\x7f and U+FFFD \ufffd and a lone combining mark e\u0301",
    "",
]


def load(name) -> TextTokenizer:
    tok = TextTokenizer.from_dir(DIRS[name])
    assert tok is not None
    return tok


def model_vocab_size(name) -> int:
    if name == "qwen3-moe-tiny":
        from dp_attention.config import PRESETS

        return PRESETS[name].vocab_size
    return json.loads((DIRS[name] / "config.json").read_text())["vocab_size"]


@pytest.fixture(params=sorted(DIRS), scope="module")
def tok(request):
    return load(request.param)


def random_text(rng: random.Random, n: int) -> str:
    """Code points from every plane that is in use (no surrogates)."""
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:
            cp = rng.randrange(0x20, 0x7F)
        elif kind < 0.6:
            cp = rng.randrange(0x80, 0x800)
        elif kind < 0.85:
            cp = rng.choice([rng.randrange(0x800, 0xD800), rng.randrange(0xE000, 0x10000)])
        else:
            cp = rng.randrange(0x10000, 0x110000)
        out.append(chr(cp))
    return "".join(out)


# ------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("name", sorted(DIRS))
def test_vocab_equals_model_vocab(name):
    tok = load(name)
    v = model_vocab_size(name)
    assert tok.vocab_size == v
    # every id the model can sample decodes to something
    assert all(tok.id_to_token(i) is not None for i in range(v))
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [v - 3, v - 2, v - 1]


@pytest.mark.parametrize("name", sorted(DIRS))
def test_eos_ids_from_generation_config(name):
    tok = load(name)
    v = tok.vocab_size
    assert tok.eos_ids == (v - 1, v - 3)  # <|im_end|>, <|endoftext|>
    assert tok.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def copy_without(tmp_path, name, *, drop=(), config_edit=None, generation=None):
    d = tmp_path / name
    d.mkdir()
    for f in DIRS[name].iterdir():
        if f.name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json") and f.name not in drop:
            shutil.copy(f, d / f.name)
    if config_edit is not None:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        config_edit(cfg)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if generation is not None:
        (d / "generation_config.json").write_text(json.dumps(generation))
    return d


def test_eos_ids_fallbacks(tmp_path):
    # no generation_config.json: the tokenizer_config's eos_token
    tok = TextTokenizer.from_dir(copy_without(tmp_path, "hf-tiny-a", drop=("generation_config.json",)))
    assert tok.eos_ids == (249,)
    # an AddedToken dict as eos_token
    d = copy_without(tmp_path, "hf-tiny-b", drop=("generation_config.json",),
                     config_edit=lambda c: c.update(eos_token={"content": "<|endoftext|>", "special": True}))
    assert TextTokenizer.from_dir(d).eos_ids == (253,)
    # an int eos_token_id
    d = copy_without(tmp_path, "qwen3-moe-tiny", generation={"eos_token_id": 497})
    assert TextTokenizer.from_dir(d).eos_ids == (497,)
    # neither
    tmp2 = tmp_path / "bare"
    tmp2.mkdir()
    shutil.copy(PRESET_DIR / "tokenizer.json", tmp2 / "tokenizer.json")
    assert TextTokenizer.from_dir(tmp2).eos_ids == ()
    with pytest.raises(ValueError, match="eos_token_id"):
        TextTokenizer.from_dir(copy_without(tmp2, "hf-tiny-a", generation={"eos_token_id": ["<|im_end|>"]}))


def test_from_dir_without_tokenizer_json(tmp_path):
    assert TextTokenizer.from_dir(tmp_path) is None
    assert TextTokenizer.from_dir(tmp_path / "missing") is None
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert TextTokenizer.from_dir(tmp_path) is None
    assert TextTokenizer.from_dir(GOLDEN) is None


def test_from_dir_bad_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        TextTokenizer.from_dir(tmp_path)


def test_import_runtime_does_not_import_text_libraries():
    code = "import sys, runtime; print(sorted(m for m in ('tokenizers', 'jinja2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ encode / decode


def test_round_trip_multilingual(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    for _ in range(50):
        text = random_text(rng, rng.randrange(1, 40))
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_in_text(tok):
    v = tok.vocab_size
    text = "<|im_start|>user\nhi 🙂<|im_end|>\n<|endoftext|>"
    ids = tok.encode(text)
    assert ids[0] == v - 2 and v - 1 in ids and ids[-1] == v - 3
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi 🙂\n"
    assert tok.encode("") == []


# ------------------------------------------------------------------------------------ incremental


@pytest.fixture(params=[IncrementalDetokenizer, StreamDetokenizer])
def Detok(request):
    """Both incremental detokenizers keep the same guarantees."""
    return request.param


def stream(Detok, tok, ids, **kw):
    detok = Detok(tok, **kw)
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.flush()


@pytest.mark.parametrize("skip", [False, True])
def test_incremental_equals_decode_random_ids(Detok, tok, skip):
    rng = random.Random(1 + skip)
    for n in list(range(12)) + [rng.randrange(12, 120) for _ in range(150)]:
        ids = [rng.randrange(tok.vocab_size) for _ in range(n)]
        pieces, tail = stream(Detok, tok, ids, skip_special_tokens=skip)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip), ids


def test_incremental_equals_decode_text(Detok, tok):
    rng = random.Random(2)
    texts = TEXTS + [random_text(rng, 60) for _ in range(20)]
    for text in texts:
        ids = tok.encode(text)
        pieces, tail = stream(Detok, tok, ids)
        assert "".join(pieces) + tail == text
        assert tail == ""  # valid text ends cleanly: nothing left to flush
        assert not any("\ufffd" in p for p in pieces) or "\ufffd" in text


def test_incremental_chat_with_special_tokens(Detok, tok):
    text = tok.render_chat([{"role": "user", "content": "héllo 世界 🙂"}, {"role": "assistant", "content": "再见 👋"}])
    ids = tok.encode(text)
    assert "".join(stream(Detok, tok, ids)[0]) == text
    pieces, tail = stream(Detok, tok, ids, skip_special_tokens=True)
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in "".join(pieces)


@pytest.mark.parametrize("char", ["龘", "𝄞", "🙂", "é", "👨‍👩‍👧"])
def test_multibyte_character_never_emitted_half(Detok, tok, char):
    text = f"a{char}b{char}{char}"
    detok = Detok(tok)
    emitted = ""
    for i in tok.encode(text):
        piece = detok.push(i)
        assert "\ufffd" not in piece
        emitted += piece
        assert text.startswith(emitted)
    assert emitted + detok.flush() == text


@pytest.mark.parametrize("char", ["龘", "𝄞"])  # not in the training corpus: several tokens in every tokenizer
def test_rare_character_held_until_its_last_token(Detok, tok, char):
    ids = tok.encode(char)
    assert len(ids) > 1
    detok = Detok(tok)
    assert [detok.push(i) for i in ids] == [""] * (len(ids) - 1) + [char]
    assert detok.flush() == ""


def test_split_character_bytes(Detok):
    from tokenizers import normalizers

    tok = load("qwen3-moe-tiny")  # byte-level: every byte has its own token
    ids = [tok.token_to_id(ch) for ch in normalizers.ByteLevel().normalize_str("世")]  # E4 B8 96
    assert len(ids) == 3 and None not in ids
    detok = Detok(tok)
    assert [detok.push(i) for i in ids] == ["", "", "世"]
    detok = Detok(tok)
    assert detok.push(tok.encode("A")[0]) == "A"
    assert detok.push(ids[0]) == "" and detok.push(ids[1]) == ""
    assert detok.flush() == "\ufffd"  # an unfinished character at the end decodes as decode() does
    # an invalid byte before a valid character is emitted once the character completes
    detok = Detok(tok)
    assert [detok.push(i) for i in [ids[1], *ids]] == ["", "", "", "\ufffd世"]


def test_split_character_nibbles(Detok):
    tok = load("hf-tiny-a")  # nibble-level: a byte is two symbols
    ids = [tok.token_to_id(ch) for ch in "⑥１ⓔ４ⓑ８⑨６"]  # "a" 0x61, then 世 E4 B8 96 nibble by nibble
    assert None not in ids
    detok = Detok(tok)
    assert [detok.push(i) for i in ids] == ["", "a", "", "", "", "", "", "世"]
    assert detok.flush() == ""
    # an unpaired nibble decodes as an invalid byte
    assert tok.decode(ids[:1]) == "\ufffd" and tok.decode(ids[1:3]) == "\ufffd\ufffd"


# ------------------------------------------------------------------------------------ chat

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi! 你好 🙂"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]
EXPECTED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi! 你好 🙂<|im_end|>\n"
    "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    "<|im_start|>user\nTell me a joke.<|im_end|>\n"
)


def test_render_chat_chatml(tok):
    assert tok.render_chat(CONVERSATION) == EXPECTED + "<|im_start|>assistant\n"
    assert tok.render_chat(CONVERSATION, add_generation_prompt=False) == EXPECTED
    with pytest.raises(ValueError, match="empty"):  # as transformers
        tok.render_chat([])
    # OpenAI-style content parts, and content None (dropped as transformers does)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi! "}, {"type": "text", "text": "你好 🙂"}]}]
    assert tok.render_chat(parts, add_generation_prompt=False) == "<|im_start|>user\nHi! 你好 🙂<|im_end|>\n"
    assert tok.render_chat([{"role": "assistant", "content": None}], add_generation_prompt=False) == (
        "<|im_start|>assistant\n<|im_end|>\n")
    # the rendered chat tokenizes with its markers as single special tokens
    ids = tok.encode(tok.render_chat(CONVERSATION[:2]))
    assert ids.count(tok.token_to_id("<|im_start|>")) == 3 and ids.count(tok.token_to_id("<|im_end|>")) == 2


def test_render_chat_errors(tmp_path):
    tok = load("hf-tiny-a")
    with pytest.raises(ValueError, match="only text content parts"):
        tok.render_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError, match="chat template"):
        tok.render_chat([{"role": 3, "content": "x"}])
    with pytest.raises(ValueError, match="messages"):
        tok.render_chat("hello")
    no_template = copy_without(tmp_path, "hf-tiny-a", config_edit=lambda c: c.pop("chat_template"))
    with pytest.raises(ValueError, match="no chat_template"):
        TextTokenizer.from_dir(no_template).render_chat(CONVERSATION)
    # without tokenizer_config.json at all, text still works and chat says why it cannot
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(DIRS["hf-tiny-b"] / "tokenizer.json", d)
    t = TextTokenizer.from_dir(d)
    assert t.decode(t.encode("héllo")) == "héllo"
    with pytest.raises(ValueError, match="no chat_template"):
        t.render_chat(CONVERSATION)


def test_render_chat_transformers_environment(tmp_path):
    """Features of transformers' template environment: raise_exception, tojson without HTML
    escaping, loopcontrols, namespace, special tokens and extra variables, sandboxing."""
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }}{% endfor %}|{{ ns.n }}|{{ eos_token }}|{{ pad_token }}"
        "|{{ bos_token is defined }}|{{ tools | tojson }}|{{ extra }}{% generation %}!{% endgeneration %}"
    )
    d = copy_without(tmp_path, "hf-tiny-a", config_edit=lambda c: c.update(chat_template=template))
    tok = TextTokenizer.from_dir(d)
    out = tok.render_chat([{"role": "user", "content": "<b>&"}, {"role": "skip", "content": "x"}],
                          extra=7, tools=[{"name": "f"}])
    assert out == '{"role": "user", "content": "<b>&"}|1|<|im_end|>|<|endoftext|>|False|[{"name": "f"}]|7!'
    cases = [("{{ raise_exception('nope: ' ~ messages[0].role) }}", "nope: user"),
             ("{% set ns = namespace() %}{% set ns._x = 1 %}", "chat template"),  # sandboxed namespace
             ("{{ messages.pop() }}", "chat template"),  # immutable sandbox
             ("{% for %}", "does not compile"),
             ("{{ messages.__class__ }}", None)]  # sandbox: an unsafe attribute is undefined
    for k, (template, error) in enumerate(cases):
        dd = tmp_path / f"t{k}"
        dd.mkdir()
        shutil.copy(DIRS["hf-tiny-a"] / "tokenizer.json", dd)
        (dd / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        t = TextTokenizer.from_dir(dd)
        if error is None:
            assert t.render_chat([{"role": "user", "content": "x"}]) == ""
        else:
            with pytest.raises(ValueError, match=error):
                t.render_chat([{"role": "user", "content": "x"}])
    # a list of named templates picks "default"; a chat_template.jinja file is read too
    d3 = copy_without(tmp_path, "hf-tiny-b", config_edit=lambda c: c.update(
        chat_template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]))
    assert TextTokenizer.from_dir(d3).render_chat(CONVERSATION) == "D"
    (tmp_path / "j").mkdir()
    d4 = copy_without(tmp_path / "j", "qwen3-moe-tiny", config_edit=lambda c: c.pop("chat_template"))
    (d4 / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert TextTokenizer.from_dir(d4).render_chat(CONVERSATION) == "J4"


@pytest.mark.parametrize("name", sorted(DIRS))
def test_matches_transformers(name):
    transformers = pytest.importorskip("transformers")
    d = DIRS[name]
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(d / "tokenizer.json"), chat_template=cfg["chat_template"],
        eos_token=cfg["eos_token"], pad_token=cfg["pad_token"], bos_token=None)
    ours = load(name)
    convs = [CONVERSATION, CONVERSATION[:2],
             [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "世"}]}],
             [{"role": "assistant", "content": None}, {"role": "user", "content": "\n\n  x  \n"}]]
    for conv in convs:
        for gen in (True, False):
            expected = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.render_chat(conv, add_generation_prompt=gen) == expected
    for text in TEXTS + [ours.render_chat(CONVERSATION)]:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    # AutoTokenizer reads the same directory the same way
    auto = transformers.AutoTokenizer.from_pretrained(str(d))
    assert auto.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == ours.render_chat(
        CONVERSATION)
    assert auto.eos_token_id == ours.eos_ids[0] and auto.bos_token is None


@pytest.mark.parametrize("skip", [False, True])
def test_stream_detokenizer_gives_decode_streams_own_pieces(tok, skip):
    """Over a byte-level decoder StreamDetokenizer steps DecodeStream's algorithm itself: every
    piece (and every held-back step) is DecodeStream's, for random ids (most are not UTF-8),
    special tokens and ids past the vocabulary included."""
    from tokenizers.decoders import DecodeStream

    rng = random.Random(3 + skip)
    specials = [i for i in range(tok.vocab_size) if tok.decode([i], skip_special_tokens=True) == ""]
    runs = [[rng.randrange(tok.vocab_size + 4) for _ in range(rng.randrange(1, 80))] for _ in range(300)]
    runs += [[rng.choice(specials + [rng.randrange(tok.vocab_size)]) for _ in range(30)] for _ in range(20)]
    runs += [tok.encode(t) for t in TEXTS]
    for ids in runs:
        ours, theirs = StreamDetokenizer(tok, skip_special_tokens=skip), DecodeStream(skip_special_tokens=skip)
        for i in ids:
            assert (ours.push(i) or None) == theirs.step(tok._tok, i), ids


def test_byte_level_pieces_only_for_byte_level_decoders(tok):
    pieces = tok.byte_level_pieces()
    if type(tok._tok.decoder).__name__ != "ByteLevel":
        assert pieces is None
        return
    for i in range(tok.vocab_size):
        assert pieces[i].decode("utf-8", "replace") == tok.decode([i]), i
