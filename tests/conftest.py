import os

# Eight virtual CPU devices, before anything imports jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib  # noqa: E402

import pytest  # noqa: E402

GOLDEN = pathlib.Path(__file__).parent / "golden"

# The slowest modules, slowest first (by `--durations` on 2 cores), run before the rest. pyproject's
# addopts runs the suite on two pytest-xdist workers a module at a time, in this order (--dist
# loadfile --no-loadscope-reorder): long modules started last would leave one worker alone at the end. test_server goes first as it builds the shared tiny_artifact while the other
# worker runs test_quantized, which needs none.
SLOW_FIRST = ["test_server", "test_quantized", "test_multiprocess", "test_export", "test_model_vs_hf",
              "test_tf_savedmodel", "test_experts", "test_dp_modes", "test_runtime_serving", "test_kv_cache",
              "test_attention", "test_build_progress", "test_fa", "test_kv_cache_artifact", "test_collectives"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest keep their order


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
    """The embedded preset on 2x4, both modes, a short ladder (chunked prefill above 32 tokens).

    Built once per run: under pytest-xdist the first worker to ask builds it into the run's shared
    temp root, under a file lock, and the others wait for it there (a build that finds it up to date
    returns at once). Tests only read it; those that change an artifact change a copy."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build_artifact(tmp_path_factory.mktemp("art") / "qwen3-moe-tiny")
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the run's root, above each worker's basetemp
    with FileLock(str(shared / "tiny-artifact.lock")):
        return build_artifact(shared / "tiny-artifact" / "qwen3-moe-tiny")


@pytest.fixture(scope="session")
def tiny_engine(tiny_artifact):
    from runtime.engine import load

    return load(tiny_artifact)
