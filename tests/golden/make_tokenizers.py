"""Train the small tokenizers (with a ChatML chat template) that ship beside the tiny models.

For each target this writes ``tokenizer.json``, ``tokenizer_config.json`` and
``generation_config.json``:

| target | vocab | scheme |
|---|---|---|
| ``dp_attention/assets/qwen3-moe-tiny/`` | 500 (the preset's ``vocab_size``) | byte-level BPE |
| ``tests/golden/hf-tiny-a/`` | 250 (``config.json``) | nibble-level BPE |
| ``tests/golden/hf-tiny-b/`` | 256 (``config.json``) | nibble-level BPE |

The vocabulary size always EQUALS the model's, so every id the model can sample
decodes.  Three special tokens sit at the top of the vocabulary, in Qwen's order:
``<|endoftext|>`` (V-3), ``<|im_start|>`` (V-2), ``<|im_end|>`` (V-1).

Byte-level BPE (as Qwen's): a Qwen-style regex split, the GPT-2 ByteLevel
pre-tokenizer and decoder, all 256 byte symbols in the alphabet, then merges.
It needs 256 + 3 = 259 ids before the first merge, which a 250- or 256-entry
vocabulary cannot hold.

Nibble-level BPE (for a vocabulary under 259): every byte is written as two
symbols, its high nibble from ``⓪①…⑨ⓐ…ⓕ`` and its low nibble from ``０１…９ａ…ｆ``
(32 symbols, which never occur in the byte-mapped text), and BPE merges them.
The normalizer maps the text's UTF-8 bytes to GPT-2's byte characters
(``normalizers.ByteLevel``), then each of those to its two nibble symbols (256
``Replace`` rules).  The decoder fuses the tokens, maps each (high, low) pair
back to its byte character, turns any nibble left unpaired (only possible for
id sequences no text encodes to) into byte 0xFF, which is never valid UTF-8 and
so decodes to U+FFFD, and ends with the ByteLevel decoder.  So, like a byte-level
tokenizer, it round-trips ANY UTF-8 text exactly, with 32 + 3 base ids and the
rest of the vocabulary as merges; text simply takes more tokens.

Neither tokenizer normalizes Unicode (Qwen's applies NFC), so the round trip is
byte-exact for every input.

The corpus is built in below and training is deterministic: rerunning gives
byte-identical files.  Needs ``tokenizers``.  Run from the repository root:
``python tests/golden/make_tokenizers.py``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[2]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen2/Qwen3's pre-tokenizer split.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

HIGH_NIBBLES = "⓪①②③④⑤⑥⑦⑧⑨ⓐⓑⓒⓓⓔⓕ"
LOW_NIBBLES = "０１２３４５６７８９ａｂｃｄｅｆ"

# ChatML as Qwen writes it: one block per message, then the assistant header when asked.
# Content may be a string or a list of OpenAI-style parts; only text parts are accepted.
CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' }}\n"
    "    {%- if message['content'] is string %}\n"
    "        {{- message['content'] }}\n"
    "    {%- elif message['content'] is defined %}\n"
    "        {%- for part in message['content'] %}\n"
    "            {%- if part['type'] == 'text' %}\n"
    "                {{- part['text'] }}\n"
    "            {%- else %}\n"
    "                {{- raise_exception('only text content parts are supported, got a ' ~ part['type'] ~ ' part') }}\n"
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

CORPUS = [
    # English
    "The quick brown fox jumps over the lazy dog. A model that serves text must turn words into "
    "numbers and numbers back into words, and it must never lose a single byte on the way.",
    "Once upon a time, in a small town by the sea, there lived an old clockmaker who repaired "
    "every clock in the town. Each morning he opened his shop, made a cup of tea, and listened "
    "to the ticking of a hundred clocks. \"Time,\" he liked to say, \"is the one thing we cannot "
    "repair.\" The children of the town loved to visit him after school.",
    "Large language models are trained on text from many sources. The tokenizer splits the text "
    "into tokens; the model predicts the next token; the server streams the answer back to the "
    "user, one piece at a time. What is the capital of France? The capital of France is Paris.",
    "Hello! How can I help you today? I'd like to know how this works, and why it's fast. "
    "Sure, here's an example: you ask a question, and I'll answer it as well as I can.",
    # Code and numbers
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i, add(i, 2 * i))\n",
    "{\"role\": \"user\", \"content\": \"Hi there\"} 2024-06-07 12:34:56 3.14159 100% [1, 2, 3]",
    # French, German, Spanish, Portuguese, Italian
    "Bonjour tout le monde ! Le café est très bon ce matin, et la journée sera belle. "
    "Où est la bibliothèque ? Elle est à côté de l'école.",
    "Guten Morgen! Die Straße ist heute sehr ruhig, und die Bäume blühen schön. "
    "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
    "¡Hola, mundo! ¿Cómo estás? El niño come una manzana y la señora lee un libro en español.",
    "Olá! A informação está correta e a canção é bonita. Buongiorno, come stai? Tutto bene, grazie.",
    # Russian, Greek
    "Привет, мир! Как дела? Сегодня хорошая погода, и мы идём гулять в парк.",
    "Γειά σου κόσμε! Η γλώσσα είναι όμορφη και η θάλασσα είναι γαλάζια.",
    # Chinese, Japanese, Korean
    "你好，世界！今天天气很好，我们一起去公园散步吧。机器学习是人工智能的一个分支。",
    "こんにちは、世界！今日はいい天気ですね。私は日本語を勉強しています。",
    "안녕하세요, 세계! 오늘 날씨가 좋네요. 저는 한국어를 공부하고 있습니다.",
    # Arabic, Hebrew, Hindi
    "مرحبا بالعالم! كيف حالك اليوم؟",
    "שלום עולם! מה שלומך היום?",
    "नमस्ते दुनिया! आप कैसे हैं?",
    # Emoji and symbols
    "héllo 世界 🙂 Good job! 👍🎉 I love it ❤️ — see you soon 😀🚀✨ 5 € ≈ 5.4 $ … ©®™",
]


def corpus() -> list[str]:
    # A little weight on the English and chat-like text, the way a real corpus leans.
    return CORPUS + CORPUS[:4] * 2 + [f"<|im_start|>user\n{CORPUS[3]}<|im_end|>"]


def _byte_chars() -> list[str]:
    """GPT-2's printable character for each byte 0..255: what normalizers.ByteLevel emits."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) if b in printable else chr(256 + others.index(b)) for b in range(256)]
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    sample = "".join(map(chr, range(128))) + "é世🙂\u07ff\U0010ffff"
    assert normalizers.ByteLevel().normalize_str(sample) == "".join(chars[b] for b in sample.encode())
    return chars


def byte_level(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def nibble_level(vocab_size: int) -> Tokenizer:
    chars = _byte_chars()
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence(
        [normalizers.ByteLevel()]
        + [normalizers.Replace(chars[b], HIGH_NIBBLES[b >> 4] + LOW_NIBBLES[b & 15]) for b in range(256)])
    # words start at a space or a newline, which keep to the word that follows
    space, newline = (HIGH_NIBBLES[b >> 4] + LOW_NIBBLES[b & 15] for b in (0x20, 0x0A))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{space}|{newline}"), behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Fuse()]
        + [decoders.Replace(HIGH_NIBBLES[b >> 4] + LOW_NIBBLES[b & 15], chars[b]) for b in range(256)]
        + [decoders.Replace(Regex(f"[{HIGH_NIBBLES}{LOW_NIBBLES}]"), chars[0xFF]), decoders.ByteLevel()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=list(HIGH_NIBBLES + LOW_NIBBLES), special_tokens=[])
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def build(vocab_size: int) -> Tokenizer:
    tok = byte_level(vocab_size) if vocab_size >= 256 + len(SPECIAL_TOKENS) else nibble_level(vocab_size)
    tok.add_special_tokens(SPECIAL_TOKENS)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise SystemExit(f"trained {got} tokens, want {vocab_size}: the corpus has too few merges")
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(vocab_size - len(SPECIAL_TOKENS), vocab_size)), ids
    return tok


def write(out: Path, vocab_size: int, max_length: int) -> None:
    tok = build(vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=False) + "\n", encoding="utf-8")
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "model_max_length": max_length,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True} for t, i in ids.items()},
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    gen = {"eos_token_id": [ids[EOS_TOKEN], ids["<|endoftext|>"]], "pad_token_id": ids[PAD_TOKEN]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    print(f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}: vocab {vocab_size}, "
          f"{'byte' if vocab_size >= 259 else 'nibble'}-level BPE, specials {ids}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = ap.parse_args()
    root = args.root
    sys.path.insert(0, str(root))
    from dp_attention.config import PRESETS

    preset = PRESETS["qwen3-moe-tiny"]
    write(root / "dp_attention" / "assets" / preset.name, preset.vocab_size, preset.max_position_embeddings)
    for name in ("hf-tiny-a", "hf-tiny-b"):
        d = root / "tests" / "golden" / name
        cfg = json.loads((d / "config.json").read_text())
        write(d, int(cfg["vocab_size"]), int(cfg["max_position_embeddings"]))


if __name__ == "__main__":
    main()
