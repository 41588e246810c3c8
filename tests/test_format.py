"""manifest.json as typed records: what the builder writes reads back to the same JSON, and a
broken field is reported with the file, the field's path, and what was expected and found."""

import dataclasses
import json

import pytest

from runtime import format as fmt
from runtime.buckets import SUM_LEN, Bucket


def test_built_manifest_round_trips_exactly(tiny_artifact):
    path = tiny_artifact / fmt.MANIFEST
    text = path.read_text()
    manifest = fmt.Manifest.from_json(json.loads(text), fmt.Where(str(path)))
    assert manifest.to_json() == json.loads(text)
    assert json.dumps(manifest.to_json(), indent=1) + "\n" == text  # the same keys in the same order
    assert fmt.read_manifest(tiny_artifact) == manifest


def test_typed_fields_of_a_built_manifest(tiny_artifact):
    m = fmt.read_manifest(tiny_artifact)
    e = m.executables[3]
    assert e.bucket == Bucket(SUM_LEN, 4, 4, 4) and e.mode == "sum_len" and e.mesh == m.meshes[0].name
    assert m.meshes[0].dp == 2 and m.meshes[0].experts.name == "ep"  # 32 experts, 4 a device, width 32 whole
    assert m.meshes[0].weights["moe.gate"].spec == (None, ("data", "tensor"), None, None)
    assert m.model.vocab_size == 500 and m.cache.page_size == 8 and m.tf_savedmodel is None
    assert e.cost.collective_bytes > 0 and e.probe.startswith("probes/") and e.sha256 == m.files[e.file]


def _set(path, value):
    def change(d):
        *keys, last = path
        for k in keys:
            d = d[k]
        if value is DELETE:
            del d[last]
        else:
            d[last] = value
    return change


DELETE = object()


@pytest.mark.parametrize("change,field,expected,found", [
    (_set(["executables", 3, "bucket", "tokens"], "4"), "executables[3].bucket.tokens", "an integer", 'string "4"'),
    (_set(["meshes", 0, "devices"], DELETE), "meshes[0].devices", "an integer", "nothing (the field is missing)"),
    (_set(["meshes", 0, "weights", "embed", "stacked"], 1), "meshes[0].weights['embed'].stacked", "true or false",
     "int 1"),
    (_set(["meshes", 0, "batch_specs", "tokens", 1], 3), "meshes[0].batch_specs['tokens'][1]",
     "null, an axis name or a list of them", "int 3"),
    (_set(["executables", 1, "cost", "collectives", "all-reduce"], 1.5),
     "executables[1].cost.collectives['all-reduce']", "an integer", "float 1.5"),
    (_set(["executables", 0, "bucket", "mode"], "fast"), "executables[0].bucket.mode", "one of 'max_len', 'sum_len'",
     'string "fast"'),
    (_set(["executables", 0, "mode"], "sum_len"), "executables[0].mode", "the bucket's mode 'max_len'",
     'string "sum_len"'),
    (_set(["executables", 2, "probe_max_error"], None), "executables[2].probe_max_error", "a number", "null null"),
    (_set(["fastload", "cpu", "files"], "x"), "fastload['cpu'].files", "a list (a string each)", 'string "x"'),
    (_set(["tokenizer"], 5), "tokenizer", "a list (a string each) or null", "int 5"),
    (_set(["cache"], []), "cache", "an object", "list []"),
    (_set(["files"], ["x"]), "files", "an object (a string each)", 'list ["x"]'),
    (_set(["executables", 1, "extra"], 0), "executables[1].extra", "only the fields mesh, bucket, file",
     "an unknown field"),
])
def test_a_broken_field_names_file_field_expected_and_found(tiny_artifact, tmp_path, change, field, expected, found):
    data = json.loads((tiny_artifact / fmt.MANIFEST).read_text())
    change(data)
    (tmp_path / fmt.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(fmt.ArtifactError) as e:
        fmt.read_manifest(tmp_path)
    prefix = f"{tmp_path / fmt.MANIFEST}: field {field}: expected {expected}"
    assert str(e.value).startswith(prefix) and str(e.value).endswith(f"found {found}"), str(e.value)


def test_fields_filled_later_are_absent_until_then(tiny_artifact):
    """A build in progress writes no key for what it hasn't measured yet (not null)."""
    e = fmt.read_manifest(tiny_artifact).executables[0]
    bare = dataclasses.replace(e, compile_seconds=None, cost=None, probe=None, probe_max_error=None, sha256=None,
                               step_seconds=None)
    assert list(bare.to_json()) == ["mesh", "mode", "bucket", "file", "compiled_here", "export_seconds",
                                    "batch_shapes", "batch_dtypes"]
    assert fmt.ExecutableEntry.from_json(bare.to_json()) == bare
