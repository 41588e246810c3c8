"""Incremental detokenization per streamed token: tokenizers' `DecodeStream` (runtime's
`StreamDetokenizer`, what the server uses) against the prefix-offset `IncrementalDetokenizer` in
Python, over the same sampled-looking id streams of the default artifact's tokenizer.

Both keep the same guarantees (pieces never split a character; with `flush` they add up to the
full decode; tests/test_tokenizer.py checks both), so the cheaper one per token serves.
"""

from __future__ import annotations

import time

import numpy as np

from bench.common import ARTIFACT, ensure_artifact, write_result


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
    for ids in streams:  # same text either way: the comparison is only worth making if so
        a, b = IncrementalDetokenizer(tok, True), StreamDetokenizer(tok, True)
        assert "".join(a.push(t) for t in ids) + a.flush() == "".join(b.push(t) for t in ids) + b.flush()
    ours = per_token_us(IncrementalDetokenizer, tok, streams, 5)
    rust = per_token_us(StreamDetokenizer, tok, streams, 5)
    print(f"per token: DecodeStream {rust:.2f} us, IncrementalDetokenizer {ours:.2f} us: "
          f"{ours / rust:.1f}x less with DecodeStream (64 streams x 256 ids, vocab {vocab}, best of 5)")
    write_result("detok", {"vocab": vocab, "streams": 64, "tokens_per_stream": 256,
                           "decode_stream_us_per_token": rust, "incremental_us_per_token": ours})


if __name__ == "__main__":
    main()
