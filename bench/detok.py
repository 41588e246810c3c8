"""Incremental detokenization per streamed token: runtime's `StreamDetokenizer` (what the server
uses: `DecodeStream`'s algorithm over a bytes table for a byte-level decoder such as this one's),
tokenizers' `DecodeStream` itself, and the prefix-offset `IncrementalDetokenizer` in Python, over
the same sampled-looking id streams of the default artifact's tokenizer.

Both keep the same guarantees (pieces never split a character; with `flush` they add up to the
full decode; tests/test_tokenizer.py checks both), so the cheaper one per token serves.
"""

from __future__ import annotations

import time

import numpy as np

from bench.common import ARTIFACT, ensure_artifact, write_result


TEXT = ("The quick brown fox jumps over the lazy dog. Bonjour, ça va ? Grüße aus Köln. "
        "你好，世界！こんにちは。 emoji: 👍🎉 def f(x):\n\treturn x ** 2\n")


def per_token_us(make, tokenizer, streams: list[list[int]], repeats: int) -> float:
    """Least time over `repeats` of pushing every stream through a fresh detokenizer, per token."""
    best = float("inf")
    tokens = sum(map(len, streams))
    for _ in range(repeats):
        t0 = time.perf_counter()
        for ids in streams:
            d = make(tokenizer, skip_special_tokens=True)
            for t in ids:
                d.push(t)
            d.flush()
        best = min(best, time.perf_counter() - t0)
    return best / tokens * 1e6


def main() -> None:
    from runtime.tokenizer import IncrementalDetokenizer, StreamDetokenizer, TextTokenizer

    # only the tokenizer is used: a built artifact of any build will do
    tok = TextTokenizer.from_dir((ARTIFACT if (ARTIFACT / "tokenizer").is_dir() else ensure_artifact()) / "tokenizer")
    rng = np.random.default_rng(0)
    vocab = tok._tok.get_vocab_size()
    streams = [rng.integers(0, vocab, 256).tolist() for _ in range(64)]
    def decode_stream(tokenizer, skip_special_tokens):
        return StreamDetokenizer(tokenizer, skip_special_tokens, byte_table=False)

    for ids in streams:  # same text every way: the comparison is only worth making if so
        a, b, c = IncrementalDetokenizer(tok, True), StreamDetokenizer(tok, True), decode_stream(tok, True)
        texts = ["".join(d.push(t) for t in ids) + d.flush() for d in (a, b, c)]
        assert texts[0] == texts[1] == texts[2]
    # and text: what a trained model streams (random ids are mostly bytes that are not UTF-8)
    text = [tok.encode(TEXT * 4)] * 64
    # and what the sleeping device of `bench.serve --fake-step-ms` streams: one token, 32 times
    from bench.fake_device import plain_token

    fake = [[plain_token(ARTIFACT)] * 32] * 256
    result = {"vocab": vocab, "streams": 64, "tokens_per_stream": 256, "text_tokens_per_stream": len(text[0]),
              "sleeping_device_token": fake[0][0]}
    has_table = tok.byte_level_pieces(True) is not None
    for name, ids in (("random_ids", streams), ("text", text), ("sleeping_device", fake)):
        ours = per_token_us(IncrementalDetokenizer, tok, ids, 5)
        rust = per_token_us(decode_stream, tok, ids, 5)
        table = per_token_us(StreamDetokenizer, tok, ids, 5) if has_table else None
        print(f"{name}: per token StreamDetokenizer "
              f"{'(no byte-level decoder)' if table is None else f'{table:.2f} us'}, DecodeStream {rust:.2f} us, "
              f"IncrementalDetokenizer {ours:.2f} us ({len(ids)} streams x {len(ids[0])} ids, vocab {vocab}, best of 5)")
        result[name] = {"stream_detokenizer_us_per_token": table, "decode_stream_us_per_token": rust,
                        "incremental_us_per_token": ours}
    write_result("detok", result)


if __name__ == "__main__":
    main()
