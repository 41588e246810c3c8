"""Build tiny random Qwen3-MoE checkpoints and Hugging Face reference outputs.

For each checkpoint this writes ``<out>/<name>/config.json``,
``<out>/<name>/model.safetensors`` (float32, per-expert tensor names as on
the Hub) and ``<out>/<name>/golden.json`` (last-position logits and 16 greedy
tokens for four prompts, and the top token at every teacher-forced position), computed with the transformers reference model
(eager attention, float32, one CPU thread).

Why the weights are perturbed: a freshly initialised model has every RMSNorm
weight equal to 1 and near-uniform router probabilities, so a JAX port that
swaps q_norm/k_norm, forgets a norm, loads the wrong expert, or mis-orders the
top-k would still match the goldens.  Here every norm weight is
``1 + 0.3 * randn`` and every router weight is scaled by 8 so routing is sharp,
which makes such ordering/loading bugs change the logits visibly.

The two checkpoints cover both config spellings: ``hf-tiny-a`` keeps what
transformers 5 writes (``num_local_experts``, ``rope_parameters``) and
``hf-tiny-b`` is rewritten to the Hub spelling (``num_experts``,
top-level ``rope_theta``).

Needs the project's ``oracle`` extra (torch==2.13.0 + transformers 5).
Run from the repository root:  python tests/golden/make_goldens.py
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

import transformers
from safetensors import safe_open
from transformers import AutoConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

SEED = 1234
PROMPT_SEED = 20240607
PROMPT_LENGTHS = (1, 5, 17, 40)
PROMPT_VOCAB = 250  # ids valid for both checkpoints
NEW_TOKENS = 16
NORM_STD = 0.3
ROUTER_SCALE = 8.0

CHECKPOINTS = {
    "hf-tiny-a": dict(
        vocab_size=250,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=12,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        intermediate_size=96,
        mlp_only_layers=[1],
        decoder_sparse_step=1,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
    ),
    "hf-tiny-b": dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=32,
        intermediate_size=128,
        mlp_only_layers=[],
        decoder_sparse_step=2,
        norm_topk_prob=False,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
    ),
}
HUB_SPELLING = {"hf-tiny-b"}


def make_config(spec: dict) -> Qwen3MoeConfig:
    spec = dict(spec)
    theta = spec.pop("rope_theta")
    return Qwen3MoeConfig(
        **spec,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        hidden_act="silu",
        attention_bias=False,
        use_sliding_window=False,
        initializer_range=0.05,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="eager",
    )


def build_model(spec: dict, seed: int) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(make_config(spec)).to(torch.float32)
    model.config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):  # input/post_attention/q/k norms + model.norm
                p.copy_(1.0 + NORM_STD * torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.gate.weight"):  # router
                p.mul_(ROUTER_SCALE)
    model.eval()
    return model


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(PROMPT_SEED)
    return [rng.integers(0, PROMPT_VOCAB, size=n).tolist() for n in PROMPT_LENGTHS]


@torch.no_grad()
def last_logits(model, ids: list[int]) -> torch.Tensor:
    out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0, -1].float()


@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """Manual argmax loop, full re-forward each step (no cache, no EOS)."""
    seq = list(ids)
    new, margin = [], float("inf")
    for _ in range(n):
        logits = last_logits(model, seq)
        top2 = torch.topk(logits, 2).values
        margin = min(margin, float(top2[0] - top2[1]))
        tok = int(torch.argmax(logits))
        new.append(tok)
        seq.append(tok)
    return new, margin


def rewrite_hub_spelling(cfg_path: Path) -> None:
    cfg = json.loads(cfg_path.read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts")
    rope = cfg.pop("rope_parameters")
    assert rope.get("rope_type", "default") == "default", rope
    cfg["rope_theta"] = rope["rope_theta"]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def check_keys(path: Path, cfg: Qwen3MoeConfig) -> None:
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"F32"}, dtypes
    fused = [k for k in keys if k.endswith("gate_up_proj") or k.endswith("experts.down_proj")]
    assert not fused, f"fused expert tensors saved: {fused}"
    H, I, Im = cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size
    D, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    want = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        want["lm_head.weight"] = (cfg.vocab_size, H)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        want.update({
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (nq * D, H),
            p + "self_attn.k_proj.weight": (nkv * D, H),
            p + "self_attn.v_proj.weight": (nkv * D, H),
            p + "self_attn.o_proj.weight": (H, nq * D),
            p + "self_attn.q_norm.weight": (D,),
            p + "self_attn.k_norm.weight": (D,),
        })
        sparse = i not in cfg.mlp_only_layers and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0
        if sparse:
            want[p + "mlp.gate.weight"] = (cfg.num_experts, H)
            for e in range(cfg.num_experts):
                q = f"{p}mlp.experts.{e}."
                want.update({q + "gate_proj.weight": (Im, H), q + "up_proj.weight": (Im, H),
                             q + "down_proj.weight": (H, Im)})
        else:
            want.update({p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                         p + "mlp.down_proj.weight": (H, I)})
    assert keys == set(want), (sorted(keys - set(want)), sorted(set(want) - keys))
    bad = {k: (shapes[k], v) for k, v in want.items() if shapes[k] != v}
    assert not bad, bad


def make_one(name: str, spec: dict, out: Path, seed: int) -> None:
    d = out / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model = build_model(spec, seed)
    cfg = model.config

    ps = prompts()
    logits = [last_logits(model, p) for p in ps]
    greedies = [greedy(model, p, NEW_TOKENS) for p in ps]
    for (g, m), p in zip(greedies, ps):
        assert len(g) == NEW_TOKENS
        print(f"  {name} len={len(p):2d} greedy={g} min top1-top2 margin={m:.4g}")

    model.save_pretrained(d, safe_serialization=True)
    for extra in d.iterdir():  # keep only config.json + model.safetensors
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()
    check_keys(d / "model.safetensors", cfg)
    if name in HUB_SPELLING:
        rewrite_hub_spelling(d / "config.json")

    # Reload from disk (whatever spelling) and make sure HF reproduces the goldens.
    raw = json.loads((d / "config.json").read_text())
    loaded_cfg = AutoConfig.from_pretrained(d)
    assert loaded_cfg.num_experts == spec["num_experts"]
    assert loaded_cfg.rope_parameters["rope_theta"] == spec["rope_theta"]
    assert loaded_cfg.head_dim == spec["head_dim"]
    reloaded = Qwen3MoeForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    for p, ref in zip(ps, logits):
        torch.testing.assert_close(last_logits(reloaded, p), ref, rtol=1e-6, atol=1e-6)
    g0 = greedy(reloaded, ps[-1], NEW_TOKENS)[0]
    assert g0 == greedies[-1][0], (g0, greedies[-1][0])
    print(f"  {name}: config keys experts={'num_experts' if 'num_experts' in raw else 'num_local_experts'}"
          f" rope={'rope_theta' if 'rope_theta' in raw else 'rope_parameters'}; reload OK")

    golden = {
        "model": name,
        "dtype": "float32",
        "torch_num_threads": 1,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "prompts": ps,
        "last_logits": [[float(x) for x in l.tolist()] for l in logits],
        "greedy": [g for g, _ in greedies],
    }
    (d / "golden.json").write_text(json.dumps(golden) + "\n")
    add_bfloat16(d)
    add_positions(d)
    sizes = {f.name: f.stat().st_size for f in sorted(d.iterdir())}
    print(f"  {name}: {sizes}")


def add_bfloat16(d: Path) -> None:
    """HF's own bfloat16 run of a written checkpoint (weights and activations in bfloat16): its
    last-position logits go into golden.json as `last_logits_bfloat16`, the yardstick for how far a
    bfloat16 port may sit from the float32 logits."""
    golden = json.loads((d / "golden.json").read_text())
    model = Qwen3MoeForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.bfloat16).eval()
    logits = [last_logits(model, p) for p in golden["prompts"]]
    golden["last_logits_bfloat16"] = [[float(x) for x in l.tolist()] for l in logits]
    error = max(float((l - torch.tensor(ref)).abs().max()) for l, ref in zip(logits, golden["last_logits"]))
    print(f"  {d.name}: HF bfloat16 logits within {error:.4g} of float32")
    (d / "golden.json").write_text(json.dumps(golden) + "\n")


@torch.no_grad()
def add_positions(d: Path) -> None:
    """HF float32 at every position of each prompt followed by its greedy tokens (teacher forced):
    the top token, its margin over the second and its log-probability, as `positions` in
    golden.json. The yardstick for lossy schemes (quantization): agreement where HF is sure, and
    the log-probability error of the tokens HF would choose."""
    golden = json.loads((d / "golden.json").read_text())
    model = Qwen3MoeForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    rows = []
    for prompt, new in zip(golden["prompts"], golden["greedy"]):
        seq = prompt + new[:-1]
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float()  # [len, vocab]
        top2 = torch.topk(logits, 2)
        logprobs = torch.log_softmax(logits, dim=-1)
        top1 = top2.indices[:, 0]
        assert top1[len(prompt) - 1:].tolist() == new, "teacher forcing disagrees with the greedy loop"
        rows.append({"tokens": seq, "top1": top1.tolist(),
                     "margin": [float(x) for x in (top2.values[:, 0] - top2.values[:, 1]).tolist()],
                     "logprob": [float(x) for x in logprobs.gather(1, top1[:, None])[:, 0].tolist()]})
    golden["positions"] = rows
    print(f"  {d.name}: {sum(len(r['tokens']) for r in rows)} positions")
    (d / "golden.json").write_text(json.dumps(golden) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="default: tests/golden")
    ap.add_argument("--bfloat16-only", action="store_true",
                    help="add HF's bfloat16 logits to the existing goldens, leaving everything else as it is")
    ap.add_argument("--positions-only", action="store_true",
                    help="add HF's every-position top tokens to the existing goldens, leaving the rest as it is")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    for i, (name, spec) in enumerate(CHECKPOINTS.items()):
        if args.bfloat16_only:
            add_bfloat16(out / name)
        elif args.positions_only:
            add_positions(out / name)
        else:
            make_one(name, spec, out, SEED + 100 * i)


if __name__ == "__main__":
    main()
