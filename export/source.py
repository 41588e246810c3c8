"""Where a build's model comes from: a built-in preset or a Hugging Face checkpoint directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import dp_attention
from dp_attention import PRESETS, ConfigError, HFCheckpoint, ModelConfig, load_hf_config, random_reader

PRESET_SEED = 0
ASSETS = Path(dp_attention.__file__).resolve().parent / "assets"  # the presets' tokenizers


@dataclasses.dataclass
class ModelSource:
    config: ModelConfig
    read: object  # dp_attention.weights.Reader
    fingerprint: str  # changes whenever the weights could have changed
    checkpoint: HFCheckpoint | None = None
    tokenizer_dir: Path | None = None  # holds tokenizer.json (+ tokenizer_config.json, generation_config.json)


def open_model(model: str, dtype: str | None = None, weights: bool = True) -> ModelSource:
    """`model` is a preset name or an HF checkpoint directory; raises ConfigError with one clear line.

    weights=False needs only the directory's config.json (executables-only builds)."""
    if model in PRESETS:
        cfg = PRESETS[model]
        if dtype:
            cfg = dataclasses.replace(cfg, dtype=dtype)
        assets = sorted((ASSETS / model).glob("*.json"))
        tokenizer = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in assets)).hexdigest()
        return ModelSource(cfg, random_reader(cfg, PRESET_SEED), f"preset:{model}:seed{PRESET_SEED}:{tokenizer}",
                           tokenizer_dir=ASSETS / model)
    path = Path(model)
    if not path.is_dir():
        raise ConfigError(f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}) and not a directory")
    cfg = load_hf_config(path)
    if dtype:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    if not weights:
        return ModelSource(cfg, None, _dir_fingerprint(path), tokenizer_dir=path)
    ckpt = HFCheckpoint(path)
    return ModelSource(cfg, ckpt.read, _dir_fingerprint(path), ckpt, tokenizer_dir=path)


def _dir_fingerprint(path: Path) -> str:
    """config.json's bytes plus each weight file's name, size and mtime (hashing 60 GB is too slow)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.json")):
        st = f.stat()
        h.update(json.dumps([f.name, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()
