"""Reading HF config.json in both spellings found in the wild, and refusing what we can't serve."""

import json

import pytest

from dp_attention import ConfigError, from_hf_dict, load_hf_config


def test_transformers5_spelling(golden_dir):
    cfg = load_hf_config(golden_dir / "hf-tiny-a")  # num_local_experts, rope_parameters
    assert (cfg.num_experts, cfg.rope_theta, cfg.num_kv_heads, cfg.vocab_size) == (12, 10000.0, 2, 250)
    assert cfg.mlp_only_layers == (1,) and not cfg.is_moe_layer(1) and cfg.is_moe_layer(0)
    assert not cfg.tie_word_embeddings and cfg.norm_topk_prob


def test_hub_spelling(golden_dir):
    cfg = load_hf_config(golden_dir / "hf-tiny-b")  # num_experts, rope_theta
    assert (cfg.num_experts, cfg.rope_theta, cfg.head_dim) == (16, 1e6, 32)
    assert cfg.tie_word_embeddings and not cfg.norm_topk_prob
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, False]  # decoder_sparse_step 2


def test_round_trip_through_json(golden_dir):
    from dp_attention import ModelConfig
    cfg = load_hf_config(golden_dir / "hf-tiny-a")
    assert ModelConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "model_type is 'llama', expected 'qwen3_moe'"),
    ({"num_local_experts": None}, "missing num_experts"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope type 'yarn'"),
    ({"hidden_size": "drop"}, "missing field(s) hidden_size"),
])
def test_bad_configs(golden_dir, change, message):
    d = json.loads((golden_dir / "hf-tiny-a" / "config.json").read_text())
    for k, v in change.items():
        if v == "drop":
            del d[k]
        else:
            d[k] = v
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_hf_dict(d, "x")


def test_directory_without_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_hf_config(tmp_path)
