"""The peer benchmark's pure parts: its checkpoint, workload and figures (no vLLM needed)."""

from pathlib import Path

import numpy as np
import pytest

import dp_attention
from bench import peer
from bench.peer_checkpoint import SPEC, hf_config, make_checkpoint, make_prompts, weights

ASSETS = Path(dp_attention.__file__).resolve().parent / "assets" / "qwen3-moe-tiny"


def test_checkpoint_is_what_the_loader_reads_and_is_deterministic(tmp_path):
    from dp_attention import HFCheckpoint, MeshShape, load_hf_config, weight_specs
    from runtime.tokenizer import TextTokenizer

    out = tmp_path / "ckpt"
    assert make_checkpoint(out, 0, ASSETS)
    assert not make_checkpoint(out, 0, ASSETS)  # the same one is already there
    cfg = load_hf_config(out)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate_size) == (4096, 256, 4, 4, 2, 64, 16, 4, 128)
    assert all(cfg.is_moe_layer(i) for i in range(cfg.num_layers)) and cfg.norm_topk_prob
    HFCheckpoint(out).check(weight_specs(cfg, MeshShape(2, 4)))  # every tensor under its HF name and shape
    assert TextTokenizer.from_dir(out).eos_ids == ()  # no EOS: every request runs to max_tokens
    w1, w2 = weights(SPEC, 0), weights(SPEC, 0)
    assert all(np.array_equal(w1[k], w2[k]) for k in w1) and not np.array_equal(w1["lm_head.weight"],
                                                                                weights(SPEC, 1)["lm_head.weight"])
    norm, router = w1["model.layers.0.input_layernorm.weight"], w1["model.layers.0.mlp.gate.weight"]
    assert norm.std() > 0.2 and abs(norm.mean() - 1) < 0.1 and router.std() > 0.3  # not degenerate
    assert hf_config()["eos_token_id"] is None


def test_prompts_seeded_and_in_range():
    p = make_prompts(64, 16, 256, seed=0)
    assert p == make_prompts(64, 16, 256, seed=0) != make_prompts(64, 16, 256, seed=1)
    assert len(p) == 64 and all(16 <= len(x) <= 256 for x in p)
    assert all(0 <= t < 497 for x in p for t in x)  # below the tokenizer's special ids
    assert peer.pages_needed([[1] * 10, [1] * 7], 6, page_size=8) == 2 + 2


def test_agreement_counts_every_token():
    a = peer.agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    assert (a["tokens"], a["agree"], a["requests_identical"]) == (6, 5, 1)
    assert a["first_mismatch"]["request"] == 1 and a["first_mismatch"]["position"] == 1
    short = peer.agreement([[1, 2]], [[1, 2, 3]])  # a missing token counts as a disagreement
    assert (short["tokens"], short["agree"]) == (3, 2)
    assert peer.agreement([[7]], [[7]])["fraction"] == 1.0 and peer.agreement([[7]], [[7]])["first_mismatch"] is None
    with pytest.raises(ValueError):
        peer.agreement([[1]], [[1], [2]])


def test_serving_summary():
    recs = [{"sent": 0.0, "times": [0.5, 0.6, 0.8], "counts": [1, 1, 1], "tokens": [1, 2, 3], "error": None,
             "end": 0.9},
            {"sent": 0.0, "times": [1.5, 1.7], "counts": [1, 2], "tokens": [1, 2, 3], "error": None, "end": 1.8},
            {"sent": 0.0, "times": [2.0], "counts": [1], "tokens": [1], "error": None, "end": 2.0}]
    s = peer.serving_summary(recs, 0.0, max_tokens=3)
    assert (s["completed"], s["output_tokens"]) == (2, 7) and s["problems"] == ["1 of 3 tokens"]
    # the second request's 2-token event shares its 0.2 s gap: intervals 0.1, 0.2, 0.1, 0.1
    assert s["ttft_ms_p50"] == pytest.approx(1000.0) and s["itl_ms_p50"] == pytest.approx(100.0)
    assert s["itl_ms_p99"] == pytest.approx(197.0) and s["tpot_ms_p50"] == pytest.approx(125.0)
    assert s["tokens_per_event"] == pytest.approx(6 / 5) and s["output_tok_s"] == pytest.approx(7 / 2.0)


def test_scrub_paths():
    data = {"log": "/srv/repo/bench/x.log", "preload": ["/opt/env/lib/libiomp5.so"], "n": 1.5}
    assert peer.scrub(data, {"/srv/repo": ".", "/opt/env": "<vllm-env>"}) == {
        "log": "./bench/x.log", "preload": ["<vllm-env>/lib/libiomp5.so"], "n": 1.5}


def test_without_vllm_it_says_so_and_exits_0(capsys, tmp_path):
    assert peer.main(["--vllm-python", str(tmp_path / "no-such-python")]) == 0
    assert "vLLM is not installed" in capsys.readouterr().out
    assert peer.find_vllm(None)[0] is None


def _offline_row(tok_s, outputs, compiles=0):
    return {"outputs": outputs, "output_tok_s": tok_s, "tok_per_cpu_s": tok_s / 2, "startup_seconds": 1.0,
            "generate_seconds": 1.0, "stats": {"compiles_after_load": compiles}}


def test_summary_ratios_goals_and_missing_runs(capsys):
    import argparse

    args = argparse.Namespace(prompts=2, max_tokens=2, seed=0, rounds=2)
    same, other = [[1, 2], [3, 4]], [[1, 2], [3, 5]]
    runs = {"ours_offline_1x1": [_offline_row(50.0, same), _offline_row(70.0, same)],
            "ours_offline_2x4": [_offline_row(30.0, other)],
            "vllm_offline": [_offline_row(100.0, same), _offline_row(120.0, same)],
            "ours_serve_1x1": [{"outputs": same, "output_tok_s": 40.0, "startup_seconds": 2.0, "ttft_ms_p50": 300.0,
                                "itl_ms_p50": 10.0, "tpot_ms_p50": 10.0, "completed": 2, "compiles_after_load": 0}]}
    out = peer.summarize(runs, ["1x1", "2x4"], args)  # no vLLM serving run: its ratios and goal are left out
    assert out["sides"]["ours_offline_1x1"]["output_tok_s"] == 60.0
    assert out["ratios"]["offline_tok_s_1x1"] == pytest.approx(60 / 110)
    assert "serve_ttft_ms_p50_1x1" not in out["ratios"]
    assert out["goals"] == {"offline tok/s 1x1 >= 1.0x vLLM's": False, "offline tok/s 2x4 >= 0.5x vLLM's": False,
                            "tokens identical to vLLM's": False, "zero compiles after load": True}
    assert out["agreement"]["ours_offline_2x4"]["agree"] == 3 and out["agreement"]["ours_serve_1x1"]["agree"] == 4
    assert all(out["same_tokens_every_round"].values())
    peer.report({**out, "failures": [{"run": "vllm_serve", "round": 1, "error": "RuntimeError: boom"}]})
    printed = capsys.readouterr().out
    assert "FAILED run vllm_serve" in printed and "ours 2x4" in printed


def test_run_interleaves_rounds_records_failures_and_saves(monkeypatch):
    import argparse

    order = []

    def offline(side, python, job, env, tag, timeout):
        order.append(tag)
        return {**_offline_row(10.0, [[1]] * 2), "own_cpu_seconds": 1.0, "machine_cpu_seconds": 1.0}

    def serve(side, cmd, port, env, prompts, warmup, max_tokens, tag, timeout):
        order.append(tag)
        if side == "vllm":
            raise RuntimeError("server exited")
        assert warmup not in prompts
        return {"outputs": [[1]] * 2, "output_tok_s": 5.0, "startup_seconds": 1.0, "ttft_ms_p50": 1.0,
                "itl_ms_p50": 1.0, "tpot_ms_p50": 1.0, "tokens_per_event": 1.0, "completed": 2, "requests": 2,
                "server_cpu_seconds": 1.0, "machine_cpu_seconds": 1.0, "compiles_after_load": 0}

    def stand_in_serve(mesh, port, env, prompts, warmup, args, tag):
        row = serve("ours", None, port, env, prompts, warmup, 1, tag, 1)
        return {**row, "outputs": [[9]] * 2, "ttft_ms_p50": 0.5}  # the sleeping device's tokens

    monkeypatch.setattr(peer, "build", lambda *a: None)
    monkeypatch.setattr(peer, "offline", offline)
    monkeypatch.setattr(peer, "serve", serve)
    monkeypatch.setattr(peer, "stand_in_serve", stand_in_serve)
    monkeypatch.setattr(peer.os, "cpu_count", lambda: 2)  # 2x4's 8 devices share 2 cores: its stand-in runs
    saved = []
    args = argparse.Namespace(prompts=2, max_tokens=1, seed=0, rounds=2, meshes="1x1,2x4", no_serving=False,
                              vllm_python="python", vllm_preload=False, vllm_memory_utilization=0.2, timeout=10)
    out = peer.run(args, save=saved.append)
    assert order[:7] == ["r0-ours-offline-1x1", "r0-ours-offline-2x4", "r0-vllm-offline", "r0-ours-serve-1x1",
                         "r0-ours-serve-2x4", "r0-stand-in-serve-2x4", "r0-vllm-serve"]
    assert order[7] == "r1-ours-offline-1x1"
    assert [s["rounds_done"] for s in saved] == [1] and out["rounds_done"] == 2
    assert [f["round"] for f in out["failures"]] == [1, 2] and "vllm_serve" not in out["sides"]
    assert out["goals"]["tokens identical to vLLM's"] and out["goals"]["zero compiles after load"]
    # the stand-in's tokens are the sleeping device's: no agreement is asked of them, no goal is theirs
    assert "stand_in_serve_2x4" not in out["agreement"] and "stand_in_serve_2x4" in out["sides"]


def test_stand_in_times_every_bucket_and_the_sleeping_device_sleeps_them(tiny_engine, tiny_artifact, tmp_path):
    import json
    import time

    from bench.fake_device import sleeping_device
    from bench.stand_in import measure

    table = measure(tiny_engine, make_prompts(6, 4, 40, seed=0), 3, rounds=1)
    assert "run" not in vars(tiny_engine)  # the engine's own run again
    assert (table["mesh"], table["devices"]) == ("2x4", 8)
    assert set(table["buckets"]) == {b.name for b in tiny_engine.buckets}  # the rest timed on their probes
    for row in table["buckets"].values():
        assert row["steps"] >= 1 and row["cpu_ms"] > 0 and row["device_ms"] == pytest.approx(row["cpu_ms"] / 8)
    big, small = max(tiny_engine.buckets), min(tiny_engine.buckets)
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({**table, "buckets": {n: {**r, "device_ms": 1e4 if n == big.name else 3e3}
                                                      for n, r in table["buckets"].items()}}))
    device = sleeping_device(tiny_artifact, str(path))
    t0 = time.perf_counter()
    _, first = device.dispatch(big, None)
    _, second = device.dispatch(small, None)  # runs once the first is done
    assert first - t0 == pytest.approx(10.0, abs=0.5) and second - first == pytest.approx(3.0)
    path.write_text(json.dumps({**table, "buckets": {big.name: table["buckets"][big.name]}}))
    with pytest.raises(ValueError, match=f"no time for buckets .*{small.name}"):
        sleeping_device(tiny_artifact, str(path))
    path.write_text(json.dumps({**table, "mesh": "4x4"}))
    with pytest.raises(ValueError, match="mesh 4x4, which .* does not have"):
        sleeping_device(tiny_artifact, str(path))
