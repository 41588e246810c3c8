"""`python -m runtime generate` with text: prompts through the artifact's tokenizer, text out,
ids and timings with --json."""

import json
import time

from runtime import cli
from runtime.tokenizer import TextTokenizer


def generate(capsys, *argv):
    code = cli.main(["generate", *map(str, argv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, captured.err


def test_text_prompts_and_chat_print_the_decoded_text(tiny_artifact, tiny_engine, capsys):
    tok = TextTokenizer.from_dir(tiny_artifact / "tokenizer")
    prompts = ["The quick brown fox", "Hello"]
    args = [tiny_artifact, "--prompt", prompts[0], "--chat", prompts[1], "--max-new-tokens", 6, "--ignore-eos"]
    out, err = generate(capsys, *args, "--json")
    result = json.loads(out)
    # The same run on token ids: the prompts were tokenized as is and the chat one rendered first.
    ids = [tok.encode(prompts[0]), tok.encode(tok.render_chat([{"role": "user", "content": prompts[1]}]))]
    assert ids[1] != tok.encode(prompts[1])
    by_ids, _ = generate(capsys, tiny_artifact, *(a for p in ids for a in ("--prompt-ids", ",".join(map(str, p)))),
                         "--max-new-tokens", 6, "--json")
    assert json.loads(by_ids)["outputs"] == result["outputs"]
    assert [len(o) for o in result["outputs"]] == [6, 6]
    assert result["texts"] == [tok.decode(o, skip_special_tokens=True) for o in result["outputs"]]
    assert "texts" not in json.loads(by_ids)  # ids in, ids out
    # Without --json: one line per prompt, its text (the model is random, so the text is noise).
    text, err = generate(capsys, *args)
    assert text == "".join(f"[{i}] {t}\n" for i, t in enumerate(result["texts"]))
    assert "tokens/s" in err and "compiles after load 0" in err


def test_json_stats_time_the_generation_alone(tiny_artifact, tiny_engine, capsys):
    t0 = time.perf_counter()
    out, _ = generate(capsys, tiny_artifact, "--prompt-ids", "1,2,3", "--prompt-ids", "4,5", "--max-new-tokens", 8,
                      "--json")
    wall = time.perf_counter() - t0
    stats = json.loads(out)["stats"]
    assert stats["generated_tokens"] == 16
    assert stats["generate_seconds"] > 0 and stats["load_seconds"] > 0
    assert stats["generate_seconds"] + stats["load_seconds"] <= wall  # the load is not counted twice
    assert abs(stats["output_tokens_per_second"] - 16 / stats["generate_seconds"]) <= 0.1 + 1e-3 * 16 / stats[
        "generate_seconds"]


def test_profile_writes_a_trace_and_prints_the_breakdown(tiny_artifact, tiny_engine, capsys, tmp_path):
    out, err = generate(capsys, tiny_artifact, "--prompt-ids", "1,2,3,4,5,6,7,8,9", "--max-new-tokens", 4, "--json",
                        "--profile", tmp_path / "prof")
    stats = json.loads(out)["stats"]
    summary = json.loads((tmp_path / "prof" / "breakdown.json").read_text())
    assert stats["profile"] == summary and summary["steps"] == stats["steps"]
    assert summary["ms_per_step"]["attention"] > 0 and summary["ms_per_step"]["experts"] > 0
    assert "attention" in err and "host" in err
    assert list((tmp_path / "prof").glob("**/*.trace.json.gz"))


def test_no_prefix_cache_gives_the_same_tokens_computing_every_prompt(tiny_artifact, tiny_engine, capsys):
    start = ",".join(map(str, range(100, 130)))
    args = [tiny_artifact, "--prompt-ids", start + ",1", "--prompt-ids", start + ",2", "--prompt-ids", start + ",3",
            "--max-new-tokens", 4, "--json"]
    cached, plain = (json.loads(generate(capsys, *args, *flag)[0]) for flag in ((), ("--no-prefix-cache",)))
    assert cached["outputs"] == plain["outputs"]
    assert plain["stats"]["cached_tokens"] == 0 and plain["stats"]["prefill_tokens"] == 3 * 31
    assert cached["stats"]["cached_tokens"] > 0
    assert cached["stats"]["prefill_tokens"] == 3 * 31 - cached["stats"]["cached_tokens"]
