"""The grouped (sparse) expert path equals the all-experts reference; odd expert counts still work."""

import numpy as np

from dp_attention import PRESETS, DpPaddingMode, Layout, MeshShape, load_hf_config
from driver import StepDriver
from runtime.batching import Chunk


def test_grouped_experts_equal_dense_reference():
    rng = np.random.default_rng(0)
    vocab = PRESETS["qwen3-moe-tiny"].vocab_size
    prompts = [tuple(rng.integers(0, vocab, n).tolist()) for n in (23, 7, 30, 1)]
    results = []
    for dense in (False, True):
        d = StepDriver("qwen3-moe-tiny", MeshShape(2, 4), dense_reference=dense)
        groups = [[Chunk(prompts[0], 0, d.alloc(0, 4)), Chunk(prompts[1], 0, d.alloc(0, 4))],
                  [Chunk(prompts[2], 0, d.alloc(1, 4)), Chunk(prompts[3], 0, d.alloc(1, 4))]]
        results.append(np.array(d.step(groups, DpPaddingMode.MAX_LEN)))
    np.testing.assert_allclose(results[0], results[1], atol=1e-5, rtol=0)


def test_experts_not_divisible_by_devices_are_padded(golden_dir):
    cfg = load_hf_config(golden_dir / "hf-tiny-a")  # 12 experts
    assert cfg.num_experts == 12
    assert Layout.for_mesh(cfg, MeshShape(2, 4)).experts == 16  # exactness: test_model_vs_hf
    assert Layout.for_mesh(cfg, MeshShape(1, 1)).experts == 12
