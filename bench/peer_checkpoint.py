"""The peer benchmark's model and workload: a random float32 Qwen3-MoE checkpoint in Hugging Face
layout (config.json, model.safetensors, tokenizer files) and seeded token-id prompts.

Both systems load the very same directory. Weights are drawn from a seeded numpy generator, so the
checkpoint is the same on every machine. Norm weights are ``1 + 0.3 * randn`` and the router is
scaled by 8 so routing is sharp and the norms are not all ones: a model that swapped or skipped
one would disagree with the other system's tokens.

The tokenizer is the embedded preset's (500 ids); prompt ids stay below that so a server that
validates prompts against its tokenizer accepts them. The checkpoint names no EOS token
(generation_config.json and tokenizer_config.json), so every request runs to max_tokens on both
sides.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

SPEC = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128, intermediate_size=512,
            rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=512)
WEIGHT_STD = 0.05
NORM_STD = 0.3
ROUTER_SCALE = 8.0
TOKENIZER_IDS = 500  # the embedded tokenizer's vocabulary
PROMPT_IDS = 497  # prompts use ids below the tokenizer's special tokens (497..499)


def hf_config(spec: dict = SPEC) -> dict:
    """config.json as Hugging Face writes a Qwen3-MoE (every layer sparse, untied embeddings)."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "dtype": "float32",
        "vocab_size": spec["vocab_size"], "hidden_size": spec["hidden_size"],
        "num_hidden_layers": spec["num_hidden_layers"], "num_attention_heads": spec["num_attention_heads"],
        "num_key_value_heads": spec["num_key_value_heads"], "head_dim": spec["head_dim"],
        "num_experts": spec["num_experts"], "num_experts_per_tok": spec["num_experts_per_tok"],
        "moe_intermediate_size": spec["moe_intermediate_size"], "intermediate_size": spec["intermediate_size"],
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "tie_word_embeddings": False,
        "rope_theta": spec["rope_theta"], "rope_scaling": None, "rms_norm_eps": spec["rms_norm_eps"],
        "max_position_embeddings": spec["max_position_embeddings"], "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 0,
        "output_router_logits": False, "router_aux_loss_coef": 0.001, "initializer_range": WEIGHT_STD,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True,
    }


def weights(spec: dict = SPEC, seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor under its HF name, [out, in] for projections, float32, drawn in name order."""
    H, V, hd = spec["hidden_size"], spec["vocab_size"], spec["head_dim"]
    nq, nkv, E, I = spec["num_attention_heads"], spec["num_key_value_heads"], spec["num_experts"], \
        spec["moe_intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,),
                                          "lm_head.weight": (V, H)}
    for i in range(spec["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.q_proj.weight": (nq * hd, H), p + "self_attn.k_proj.weight": (nkv * hd, H),
                       p + "self_attn.v_proj.weight": (nkv * hd, H), p + "self_attn.o_proj.weight": (H, nq * hd),
                       p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                       p + "mlp.gate.weight": (E, H)})
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            shapes.update({q + "gate_proj.weight": (I, H), q + "up_proj.weight": (I, H), q + "down_proj.weight": (H, I)})
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        x = rng.standard_normal(shapes[name], dtype=np.float32)
        if name.endswith("norm.weight"):
            x = 1.0 + NORM_STD * x
        else:
            x = WEIGHT_STD * x
            if name.endswith("mlp.gate.weight"):
                x = ROUTER_SCALE * x
        out[name] = x.astype(np.float32)
    return out


def tokenizer_files(assets: Path) -> dict[str, str]:
    """The embedded tokenizer, its EOS removed (EOS is ignored by both sides of the benchmark)."""
    config = json.loads((assets / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    return {"tokenizer.json": (assets / "tokenizer.json").read_text(),
            "tokenizer_config.json": json.dumps(config, indent=1) + "\n",
            "generation_config.json": json.dumps({"bos_token_id": None, "eos_token_id": None}, indent=1) + "\n"}


def fingerprint(seed: int, assets: Path) -> str:
    h = hashlib.sha256(json.dumps([SPEC, WEIGHT_STD, NORM_STD, ROUTER_SCALE, seed]).encode())
    for name, text in sorted(tokenizer_files(assets).items()):
        h.update(name.encode() + text.encode())
    return h.hexdigest()[:16]


def make_checkpoint(out: Path, seed: int, assets: Path) -> bool:
    """Write the checkpoint to `out` unless the same one is there; True when it was (re)written."""
    from safetensors.numpy import save_file

    out = Path(out)
    stamp = out / "peer_checkpoint.txt"
    want = fingerprint(seed, assets)
    if stamp.is_file() and stamp.read_text().strip() == want and (out / "model.safetensors").is_file():
        return False
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(hf_config(), indent=1) + "\n")
    save_file(weights(SPEC, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for name, text in tokenizer_files(assets).items():
        (tmp / name).write_text(text)
    (tmp / "peer_checkpoint.txt").write_text(want + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return True


def make_prompts(n: int = 64, lo: int = 16, hi: int = 256, seed: int = 0, vocab: int = PROMPT_IDS) -> list[list[int]]:
    """n token-id prompts, lengths uniform in [lo, hi], ids uniform below `vocab`."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, n)
    return [rng.integers(0, vocab, int(k)).tolist() for k in lengths]
