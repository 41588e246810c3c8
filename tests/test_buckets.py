"""`choose`: the one function that maps a batch to its executable, at the boundaries of its rule."""

import pytest

from runtime.buckets import MAX_LEN, SUM_LEN, Bucket, choose, plan


def names(b):
    return None if b is None else b.name


@pytest.mark.parametrize("counts,want", [
    ([8, 0], "sum_len-t8-s8-g8"),  # 2 * 8 rows all-reduced == 2 * 8 gathered: a tie goes to SUM_LEN
    ([8, 1], "max_len-t8-s8-g16"),  # SUM_LEN would need g9: 18 rows > 16
    ([4, 4], "max_len-t4-s4-g8"),  # 8 rows gathered against 16 all-reduced
    ([1, 1], "sum_len-t4-s4-g4"),  # smallest rungs: SUM_LEN g4 (8 rows) ties MAX_LEN t4 (8 rows)
    ([9, 0], "sum_len-t16-s8-g16"),  # a group above T=8 needs T=16: SUM_LEN g16 (32) ties MAX_LEN t16 (32)
])
def test_rule_dp2_with_a_sum_rung_just_above_t(counts, want):
    buckets = plan(2, [4, 8, 16], 8, sum_ladder=[4, 8, 9, 16])
    assert names(choose(counts, [1] * 2, buckets, 2)) == want


@pytest.mark.parametrize("counts,want", [
    ([8, 0, 0, 0], "sum_len-t8-s8-g8"),  # 16 rows against 32
    ([8, 8, 0, 0], "sum_len-t8-s8-g16"),  # 32 against 32: tie to SUM_LEN
    ([8, 8, 8, 1], "max_len-t8-s8-g32"),  # SUM_LEN g32 would move 64 rows
    ([8, 4, 4, 1], "max_len-t8-s8-g32"),  # sum 17: g16 is too small, g32 would move 64 rows
    ([8, 4, 4, 0], "sum_len-t8-s8-g16"),  # sum 16 exactly fills g16: 32 rows, a tie
])
def test_rule_dp4(counts, want):
    buckets = plan(4, [8], 8, sum_ladder=[8, 16, 32])
    assert names(choose(counts, [1] * 4, buckets, 4)) == want


def test_forced_mode_and_nothing_fits():
    buckets = plan(2, [8], 8)
    assert names(choose([8, 8], [1, 1], buckets, 2, SUM_LEN)) is None  # SUM_LEN tops out below 16 rows
    assert names(choose([8, 8], [1, 1], buckets, 2, MAX_LEN)) == "max_len-t8-s8-g16"
    assert choose([9, 0], [1, 1], buckets, 2) is None
    assert choose([1, 0], [9, 0], buckets, 2) is None  # more sequences than any bucket holds


def test_measured_cost_decides_when_every_candidate_has_one():
    buckets = plan(2, [4, 8], 8)
    by_name = {b.name: b for b in buckets}
    cost = {b: 100.0 for b in buckets}
    cost[by_name["max_len-t8-s8-g16"]] = 10.0  # measured cheaper than the rule would think
    assert names(choose([4, 4], [1, 1], buckets, 2, cost=cost)) == "max_len-t8-s8-g16"
    cost = {b: 50.0 for b in buckets}  # a tie: fewer tokens per group, then fewer rows
    assert names(choose([3, 1], [1, 1], buckets, 2, cost=cost)) == "sum_len-t4-s4-g4"
    cost[by_name["max_len-t4-s4-g8"]] = 10.0
    assert names(choose([3, 1], [1, 1], buckets, 2, cost=cost)) == "max_len-t4-s4-g8"
    partial = dict(cost)
    del partial[by_name["sum_len-t4-s4-g4"]]  # one candidate unmeasured: back to the rule
    assert names(choose([3, 1], [1, 1], buckets, 2, cost=partial)) == "sum_len-t4-s4-g4"
    assert names(choose([4, 4], [1, 1], buckets, 2, cost=partial)) == "max_len-t4-s4-g8"  # every fit measured


def test_built_artifact_records_collective_bytes(tiny_engine):
    cost = tiny_engine.bucket_cost
    assert cost and set(cost) == set(tiny_engine.buckets) and all(v > 0 for v in cost.values())
    by = {(b.mode, b.tokens, b.global_len): v for b, v in cost.items()}
    # The same per-group size: the exchange of MAX_LEN (gather 2T + reduce-scatter 2T rows) moves
    # more than SUM_LEN with a buffer of T rows (two all-reduces of T rows): T rows fewer per layer.
    assert by[(MAX_LEN, 16, 32)] > by[(SUM_LEN, 16, 16)]
    assert by[(SUM_LEN, 32, 32)] > by[(SUM_LEN, 16, 16)]


def test_one_bucket_type_for_runtime_and_model():
    """The model's step and the runtime key executables by the same Bucket: a mode spelled as in
    JSON or flags ("max_len") and the model's enum give one bucket, one hash, one name."""
    import dp_attention
    from dp_attention import DpPaddingMode

    assert dp_attention.Bucket is Bucket
    from_flag, from_model = Bucket("max_len", 4, 2, 8), Bucket(DpPaddingMode.MAX_LEN, 4, 2, 8)
    assert from_flag == from_model and hash(from_flag) == hash(from_model)
    assert from_flag.mode is DpPaddingMode.MAX_LEN and from_flag.name == "max_len-t4-s2-g8"
    assert {"max_len": 1}[from_model.mode] == 1 and {from_model.mode: 1}["max_len"] == 1
    with pytest.raises(ValueError, match="fast"):
        Bucket("fast", 4, 2, 8)


def test_a_step_budget_gives_each_mesh_its_own_top_rung():
    """One ladder, two meshes: a one-group mesh keeps the 1,024-token rung, a two-group mesh, whose
    step would hold 2,048 rows there, stops at 512; a budget below every rung is refused."""
    ladder = [8, 512, 1024]
    assert [b.tokens for b in plan(1, ladder, 64, max_step_tokens=1024)] == [8, 512, 1024]
    assert {b.tokens for b in plan(2, ladder, 64, max_step_tokens=1024)} == {8, 512}
    assert all(b.global_len <= 1024 for b in plan(2, ladder, 64, max_step_tokens=1024))
    assert {b.tokens for b in plan(2, ladder, 64)} == {8, 512, 1024}
    with pytest.raises(ValueError, match="holds no rung"):
        plan(4, [512], 64, max_step_tokens=1024)


def test_a_build_refuses_a_budget_below_every_rung(tmp_path):
    from dp_attention import MeshShape
    from export.build import BuildConfig, build
    from export.errors import BuildError

    with pytest.raises(BuildError, match="step budget of 8 tokens holds no rung of \\[8\\] on 2 DP groups"):
        build(BuildConfig(out=tmp_path / "a", meshes=(MeshShape(2, 4),), token_ladder=(8,), max_step_tokens=8))
    assert not (tmp_path / "a").exists()
