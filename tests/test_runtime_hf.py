"""Artifacts built from the HF golden checkpoints serve HF's greedy tokens through the CLI."""

import json

import pytest

from conftest import build_artifact
from test_export import run_cli


@pytest.mark.parametrize("name", ["hf-tiny-a", "hf-tiny-b"])
def test_generate_json_returns_hf_greedy_tokens(name, golden_dir, tmp_path):
    golden = json.loads((golden_dir / name / "golden.json").read_text())
    # Largest bucket 32 tokens per group: the 40-token prompt is prefilled in two chunks.
    out = build_artifact(tmp_path / name, model=golden_dir / name, ladder=(8, 32))
    args = ["runtime", "generate", str(out), "--max-new-tokens", "16", "--json"]
    # Each prompt twice, all at once: a repeat takes the full pages of its twin (routed to the
    # group computing it, and waiting for them to be written), so it runs through a cached prefix.
    for prompt in golden["prompts"] * 2:
        args += ["--prompt-ids", ",".join(map(str, prompt))]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)  # stdout is exactly one JSON object
    assert result["outputs"] == golden["greedy"] * 2
    assert result["stats"]["compiles_after_load"] == 0
    assert result["stats"]["prefill_chunks"] >= 5
    assert result["stats"]["cached_tokens"] >= 32  # at least the 40-token prompt's first four pages
