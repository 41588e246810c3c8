"""Qwen3-MoE with data-parallel attention: config, weights, mesh layout, and the forward step."""

from .config import PRESETS, ConfigError, ModelConfig, from_hf_dict, load_hf_config
from .dp_attention import DpAttentionBackend, DpAttentionMetadata, DpPaddingMode
from .mesh import MeshError, MeshShape, abstract_mesh, make_mesh, parse_mesh
from .model import (DEFAULT_LOGPROBS, Bucket, CacheShape, Weights, batch_shapes, cache_shape, init_cache, jit_step,
                    make_step)
from .weights import HFCheckpoint, Layout, WeightError, place, placed_numpy, random_reader, read_placed, weight_specs
