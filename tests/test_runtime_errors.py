"""Bad input to the runtime CLI: one clear line on stderr, a nonzero exit, no traceback."""

import json
import shutil
import subprocess
import sys

import pytest

from runtime import cli
from runtime import format as fmt

from test_export import ROOT


def run_main(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(code, err, message):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--prompt-ids", "1,2,500"], "token id 500"),
    (["--prompt-ids", "1,-1"], "token id -1"),
    (["--prompt-ids", ""], "empty prompt"),
    (["--prompt-ids", "1,x"], "expected comma-separated integers"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--prompt-ids", ",".join(["1"] * 250), "--max-new-tokens", "16"], "context"),
    (["--prompt-ids", "1,2", "--temperature", "-0.5"], "temperature must be"),
    (["--prompt-ids", "1,2", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prompt-ids", "1,2", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt-ids", "1,2", "--logprobs", "9"], "at most 8 per token"),
    (["--prompt-ids", "1,2", "--logprobs", "-1"], "top logprobs"),
])
def test_bad_requests(tiny_artifact, capsys, args, message):
    code, out, err = run_main(capsys, "generate", str(tiny_artifact), *args)
    assert_one_line(code, err, message)
    assert out == ""


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact, copy)
    return copy


def edit_manifest(root, change):
    m = json.loads((root / "manifest.json").read_text())
    change(m)
    (root / "manifest.json").write_text(json.dumps(m))
    return m


def first_weight(m):
    return m["meshes"][0]["weights"]["embed"]["files"][0]


def _four_by_four(m):
    m["meshes"][0].update(name="4x4", shape=[4, 4], devices=16)
    for e in m["executables"]:
        e["mesh"] = "4x4"


def _outside(m):
    rel = first_weight(m)
    m["meshes"][0]["weights"]["embed"]["files"] = ["../outside.safetensors"]
    m["files"]["../outside.safetensors"] = m["files"].pop(rel)


@pytest.mark.parametrize("case,message", [
    ("device_count", "built for meshes 4x4 (16 devices); this machine has 8 cpu devices"),
    ("platform", "built for platforms ['tpu'], this machine is cpu"),
    ("format_version", f"format_version is 99, this runtime reads {fmt.FORMAT_VERSION}"),
    ("outside", "points outside the artifact directory"),
    ("corrupted", "does not match the manifest"),
    ("truncated", "does not match the manifest"),
    ("missing", "missing (listed in the manifest)"),
    ("no_manifest", "manifest.json: missing"),
    ("bad_json", "manifest.json: not valid JSON"),
    ("wrong_type", "manifest.json: field executables[3].bucket.tokens: expected an integer, found string \"4\""),
])
def test_bad_artifacts(artifact_copy, capsys, case, message):
    root = artifact_copy
    m = json.loads((root / "manifest.json").read_text())
    weight = root / first_weight(m)
    if case == "device_count":
        edit_manifest(root, _four_by_four)
    elif case == "platform":
        edit_manifest(root, lambda m: m.update(platforms=["tpu"]))
    elif case == "format_version":
        edit_manifest(root, lambda m: m.update(format_version=99))
    elif case == "outside":
        (root.parent / "outside.safetensors").write_bytes(weight.read_bytes())
        edit_manifest(root, _outside)
    elif case == "corrupted":
        data = bytearray(weight.read_bytes())
        data[-3] ^= 0x10
        weight.write_bytes(bytes(data))
    elif case == "truncated":
        weight.write_bytes(weight.read_bytes()[:-100])
    elif case == "missing":
        weight.unlink()
    elif case == "no_manifest":
        (root / "manifest.json").unlink()
    elif case == "bad_json":
        (root / "manifest.json").write_text("{not json")
    elif case == "wrong_type":
        edit_manifest(root, lambda m: m["executables"][3]["bucket"].update(tokens="4"))
    code, out, err = run_main(capsys, "generate", str(root), "--prompt-ids", "1,2,3")
    assert_one_line(code, err, message)
    assert out == ""


def test_verify_passes_and_catches_a_wrong_expectation(tiny_artifact, artifact_copy, capsys):
    code, out, _ = run_main(capsys, "verify", str(tiny_artifact))
    assert code == 0 and "probes match" in out
    # A probe whose expected outputs are wrong (checksums updated so load succeeds) fails verify:
    # a logprob off by more than the tolerance, or a different sampled token.
    from safetensors.numpy import load_file, save_file
    m = json.loads((artifact_copy / "manifest.json").read_text())
    rel = m["executables"][0]["probe"]
    original = load_file(artifact_copy / rel)
    for change, message in ((lambda p: p.update(expected_logprobs=p["expected_logprobs"] + 0.01), "logprob"),
                            (lambda p: p.update(expected_tokens=(p["expected_tokens"] + 1) % 500), "token")):
        probe = dict(original)
        change(probe)
        save_file(probe, artifact_copy / rel)
        edit_manifest(artifact_copy, lambda m: m["files"].update({rel: fmt.sha256_file(artifact_copy / rel)}))
        code, out, _ = run_main(capsys, "verify", str(artifact_copy))
        assert code == 1 and "FAIL" in out and message in out, out


def test_import_runtime_stays_slim():
    code = ("import sys, runtime, runtime.engine, runtime.cli, runtime.scheduler, runtime.verify, runtime.format; "
            "heavy = {'flax', 'tensorflow', 'orbax', 'torch', 'dp_attention', 'export'}; "
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("args,message", [
    (["artifacts/no-such-dir", "--prompt", "hi"], "no such artifact directory"),
    (["ART", "--prompt", "hi", "--prompt-ids", "1,2"], "do not mix"),
    (["ART"], "no prompt: give --prompt TEXT, --chat TEXT or --prompt-ids"),
    (["ART", "--prompt", "hi", "--mesh", "4x4"], "--mesh 4x4: the artifact has meshes 2x4"),
    (["ART", "--prompt", "hi", "--top-p", "2"], "top_p must be in (0, 1]"),
    (["ART", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["ART", "--chat", "hi", "--logprobs", "9"], "at most 8 per token"),
    (["ART", "--prompt", ""], "empty prompt"),
])
def test_bad_paths_and_arguments_fail_before_jax_is_imported(tiny_artifact, args, message):
    """Importing jax takes seconds; a wrong path or flag is told at once, in one line."""
    argv = [str(tiny_artifact) if a == "ART" else a for a in args]
    code = ("import sys; from runtime import cli\n"
            "try:\n    code = cli.main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
            "print('jax imported' if 'jax' in sys.modules else 'no jax', code)")
    r = subprocess.run([sys.executable, "-c", code, "generate", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.split() == ["no", "jax", "2"], r.stdout + r.stderr
    assert_one_line(2, r.stderr, message)


def test_a_text_prompt_needs_the_artifact_s_tokenizer(artifact_copy, capsys):
    edit_manifest(artifact_copy, lambda m: m.update(tokenizer=None))
    code, out, err = run_main(capsys, "generate", str(artifact_copy), "--prompt", "hello")
    assert_one_line(code, err, "the artifact has no tokenizer")
    assert "--prompt-ids" in err and out == ""


def test_fast_load_from_a_process_with_another_device_count_says_why_it_compiles(tiny_artifact):
    """XLA keys its cache by the host's whole device topology: a section compiled with 8 devices
    can't serve a process with 3, and the loader says so in one line instead of missing silently."""
    import dataclasses

    import jax

    from runtime.engine import _fast_load_dir

    manifest = fmt.read_manifest(tiny_artifact)
    section = manifest.fastload["cpu"]
    assert section.process_devices == len(jax.devices())  # recorded at build
    directory, note = _fast_load_dir(tiny_artifact, manifest, "cpu")
    assert directory is not None
    shutil.rmtree(directory)
    other = dataclasses.replace(manifest, fastload={"cpu": dataclasses.replace(section, process_devices=3)})
    directory, note = _fast_load_dir(tiny_artifact, other, "cpu")
    assert directory is None
    assert "3 cpu devices" in note and f"has {len(jax.devices())}" in note
    assert "--xla_force_host_platform_device_count=3" in note
