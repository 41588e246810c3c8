import os

# Eight virtual CPU devices, before anything imports jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib  # noqa: E402

import pytest  # noqa: E402

GOLDEN = pathlib.Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def golden_dir():
    return GOLDEN


def build_artifact(out, model="qwen3-moe-tiny", ladder=(4, 16, 32), **kw):
    """A real build (export, serialize, compile, probe) into `out`, quietly."""
    from dp_attention import MeshShape
    from export.build import BuildConfig, build

    cfg = BuildConfig(model=str(model), out=out, token_ladder=ladder, **({"meshes": (MeshShape(2, 4),)} | kw))
    return build(cfg)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """The embedded preset on 2x4, both modes, a short ladder (chunked prefill above 32 tokens)."""
    return build_artifact(tmp_path_factory.mktemp("art") / "qwen3-moe-tiny")


@pytest.fixture(scope="session")
def tiny_engine(tiny_artifact):
    from runtime.engine import load

    return load(tiny_artifact)
