"""Model configuration, read from a Hugging Face `config.json` or taken from a built-in preset.

Real checkpoints and freshly saved transformers 5.x checkpoints spell some fields differently
(`num_experts` vs `num_local_experts`, `rope_theta` vs `rope_parameters.rope_theta`); both are
accepted so a user never has to edit a config by hand.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


class ConfigError(ValueError):
    """A config.json (or preset) that cannot describe a Qwen3-MoE we can serve."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    moe_intermediate_size: int
    intermediate_size: int  # dense-MLP layers
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    dtype: str = "float32"

    def is_moe_layer(self, layer: int) -> bool:
        """HF's rule: sparse unless listed in mlp_only_layers or off the sparse step."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["mlp_only_layers"] = tuple(d.get("mlp_only_layers", ()))
        return cls(**d)


_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "moe_intermediate_size", "num_experts_per_tok")


def _pick(d: dict, *names, default=None):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def from_hf_dict(d: dict, name: str, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from the parsed contents of an HF Qwen3-MoE config.json."""
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {', '.join(missing)} for a Qwen3-MoE config")
    if d.get("quantization_config"):
        raise ConfigError(f"{source}: {_quantized_what(d['quantization_config'])} checkpoints are not supported yet; "
                          "build from the unquantized (bfloat16 or float32) checkpoint with --quantize int8")
    model_type = d.get("model_type", "qwen3_moe")
    if model_type != "qwen3_moe":
        raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'qwen3_moe'")
    num_experts = _pick(d, "num_experts", "num_local_experts")
    if num_experts is None:
        raise ConfigError(f"{source}: missing num_experts (or num_local_experts)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported, expected 'default'")
    rope_theta = _pick(d, "rope_theta", default=rope.get("rope_theta", 1_000_000.0))
    heads = d["num_attention_heads"]
    dtype = d.get("dtype", d.get("torch_dtype", "float32")) or "float32"
    if dtype not in ("float32", "bfloat16"):
        dtype = "float32"
    return ModelConfig(
        name=name,
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=int(heads),
        num_kv_heads=int(_pick(d, "num_key_value_heads", default=heads)),
        head_dim=int(_pick(d, "head_dim", default=d["hidden_size"] // heads)),
        num_experts=int(num_experts),
        experts_per_token=int(d["num_experts_per_tok"]),
        moe_intermediate_size=int(d["moe_intermediate_size"]),
        intermediate_size=int(_pick(d, "intermediate_size", default=d["moe_intermediate_size"])),
        mlp_only_layers=tuple(int(x) for x in d.get("mlp_only_layers") or ()),
        decoder_sparse_step=int(_pick(d, "decoder_sparse_step", default=1)),
        norm_topk_prob=bool(_pick(d, "norm_topk_prob", default=False)),
        tie_word_embeddings=bool(_pick(d, "tie_word_embeddings", default=False)),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(_pick(d, "rms_norm_eps", default=1e-6)),
        max_position_embeddings=int(_pick(d, "max_position_embeddings", default=32768)),
        dtype=dtype,
    )


def _quantized_what(q) -> str:
    """How an HF quantization_config describes itself, e.g. "fp8 (blocks 128x128) quantized"."""
    if not isinstance(q, dict):
        return "quantized"
    method = q.get("quant_method") or "quantized"
    block = q.get("weight_block_size")
    blocks = f" (blocks {'x'.join(map(str, block))})" if isinstance(block, (list, tuple)) else ""
    return f"{method}{blocks} quantized"


def load_hf_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_hf_dict(d, name=model_dir.resolve().name, source=str(path))


# Sized for a 2x4 mesh: 8 q heads (2 per tensor shard), 2 kv heads (replicated over tp=4),
# 32 experts (4 per device), a dense layer, and a vocab that is not a multiple of 8.
PRESETS: dict[str, ModelConfig] = {
    "qwen3-moe-tiny": ModelConfig(
        name="qwen3-moe-tiny",
        vocab_size=500,
        hidden_size=64,
        num_layers=3,
        num_heads=8,
        num_kv_heads=2,
        head_dim=16,
        num_experts=32,
        experts_per_token=2,
        moe_intermediate_size=32,
        intermediate_size=128,
        mlp_only_layers=(1,),
        norm_topk_prob=True,
        rope_theta=10_000.0,
        max_position_embeddings=1024,
    ),
}
