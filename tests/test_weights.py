"""Sharded checkpoints (model.safetensors.index.json) load the same numbers as a single file."""

import json
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file

from dp_attention import HFCheckpoint, MeshShape, load_hf_config, make_mesh, place, weight_specs


def test_index_json_shards_load_identically(golden_dir, tmp_path):
    src = golden_dir / "hf-tiny-b"
    dst = tmp_path / "sharded"
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, dst / fname)
        weight_map |= {k: fname for k in keys}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    shape = MeshShape(2, 4)
    mesh = make_mesh(shape)
    specs = weight_specs(load_hf_config(src), shape)
    one = place(specs, HFCheckpoint(src).read, mesh, "float32")
    two = place(specs, HFCheckpoint(dst).read, mesh, "float32")
    for name in specs:
        np.testing.assert_array_equal(np.asarray(one[name]), np.asarray(two[name]), err_msg=name)
    # Tied embeddings: lm_head is the transposed embedding, padded to the tp multiple.
    lm_head = np.asarray(one["lm_head"])
    np.testing.assert_array_equal(lm_head[:, :256], tensors["model.embed_tokens.weight"].T)
