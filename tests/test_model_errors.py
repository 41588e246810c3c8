"""Clear errors: device count, head divisibility, a missing tensor, a tensor of the wrong shape."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dp_attention import (HFCheckpoint, Layout, MeshError, MeshShape, WeightError, load_hf_config, make_mesh,
                          parse_mesh, weight_specs)


def test_mesh_larger_than_devices():
    with pytest.raises(MeshError, match=r"mesh 4x4 needs 16 devices, found 8"):
        make_mesh(MeshShape(4, 4))


@pytest.mark.parametrize("text", ["2x", "0x4", "2by4", "x4", "2x0"])
def test_bad_mesh_text(text):
    with pytest.raises(MeshError, match="mesh"):
        parse_mesh(text)


def test_q_heads_not_divisible_by_tp(golden_dir):
    cfg = load_hf_config(golden_dir / "hf-tiny-a")  # 8 q heads
    with pytest.raises(WeightError, match=r"num_attention_heads=8 does not divide by tp=3"):
        Layout.for_mesh(cfg, MeshShape(1, 3))


def _broken_copy(golden_dir, tmp_path, edit):
    src = golden_dir / "hf-tiny-a"
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_tensor_is_named(golden_dir, tmp_path):
    key = "model.layers.2.mlp.experts.7.up_proj.weight"
    ckpt = _broken_copy(golden_dir, tmp_path, lambda t: t.pop(key))
    specs = weight_specs(load_hf_config(ckpt), MeshShape(2, 4))
    with pytest.raises(WeightError, match=f"missing tensor '{key}'"):
        HFCheckpoint(ckpt).check(specs)


def test_wrong_shape_is_named(golden_dir, tmp_path):
    key = "model.layers.0.self_attn.k_proj.weight"
    ckpt = _broken_copy(golden_dir, tmp_path, lambda t: t.__setitem__(key, np.zeros((16, 64), np.float32)))
    specs = weight_specs(load_hf_config(ckpt), MeshShape(2, 4))
    with pytest.raises(WeightError, match=rf"'{key}' has shape \[16, 64\], expected \[32, 64\]"):
        HFCheckpoint(ckpt).check(specs)
