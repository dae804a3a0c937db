"""The diff engine's rules, on in-memory trees: tolerances, NaN, exactness, every leaf."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from pytest_ckptparity import CkptParityError, CkptParityUsageError, assert_ckpt_parity, compare_checkpoints
from pytest_ckptparity import diff as diff_mod
from pytest_ckptparity import kernel as kernel_mod
from pytest_ckptparity._paths import glob_match


def f32(*v):
    return np.array(v, np.float32)


def test_identical_trees_pass_and_report_counts():
    tree = {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, "step": np.int32(3)}
    report = assert_ckpt_parity(tree, tree)
    assert report.passed and bool(report)
    assert [r.path for r in report.results] == ["params/w", "step"]
    assert report.results[0].stats.n_total == 12 and report.results[0].stats.n_mismatch == 0


def test_b_is_the_reference_for_rtol():
    # |a-b| = 1 <= 0 + 0.1*|b| holds for b=10 but not for b=9 with a=10 reversed roles.
    assert compare_checkpoints({"x": f32(11.0)}, {"x": f32(10.0)}, atol=0, rtol=0.1).passed
    assert not compare_checkpoints({"x": f32(10.0)}, {"x": f32(9.0)}, atol=0, rtol=0.1).passed


@pytest.mark.parametrize("dtype,rtol,atol", [("float32", 1.3e-6, 1e-5), ("bfloat16", 1.6e-2, 1e-5), ("float16", 1e-3, 1e-5), ("float64", 1e-7, 1e-7)])
def test_default_tolerances_follow_the_dtype(dtype, rtol, atol):
    tol = diff_mod.resolve_tolerance("params/w", dtype, diff_mod.CompareOptions())
    assert (tol.rtol, tol.atol) == (rtol, atol)


def test_integers_and_bools_are_exact_even_with_tolerances():
    a = {"i": np.array([1, 2, 3], np.int32), "b": np.array([True, False])}
    b = {"i": np.array([1, 2, 4], np.int32), "b": np.array([True, True])}
    report = compare_checkpoints(a, b, atol=10, rtol=10)
    kinds = {r.path: r.kind for r in report.results}
    assert kinds == {"params/b": "values", "params/i": "values"}  # a group-less tree is a model's parameters
    i = next(r for r in report.results if r.path == "params/i")
    assert i.stats.worst_index == (2,) and (i.stats.worst_a, i.stats.worst_b) == (3, 4)


def test_explicit_and_per_path_tolerances():
    a = {"params": {"w": f32(1.001)}, "opt_state": {"mu": f32(1.001)}}
    b = {"params": {"w": f32(1.0)}, "opt_state": {"mu": f32(1.0)}}
    report = compare_checkpoints(a, b, tolerances={"opt_state/**": dict(atol=1e-2, rtol=0)})
    assert [r.path for r in report.mismatches] == ["params/w"]
    assert compare_checkpoints(a, b, atol=1e-2).passed


def test_nan_rules():
    a = {"x": f32(np.nan, 1.0, np.inf)}
    assert compare_checkpoints(a, a).passed  # NaN equals NaN at the same position by default
    report = compare_checkpoints(a, a, equal_nan=False)
    assert report.mismatches[0].stats.n_mismatch == 1
    report = compare_checkpoints({"x": f32(np.nan, 1.0)}, {"x": f32(0.0, 1.0)})
    s = report.mismatches[0].stats
    assert s.n_mismatch == 1 and s.n_nonfinite == 1 and s.worst_index == (0,)
    with pytest.raises(CkptParityError, match="NaN/inf against a different value"):
        assert_ckpt_parity({"x": f32(np.inf)}, {"x": f32(1.0)})
    assert compare_checkpoints({"x": f32(np.inf)}, {"x": f32(np.inf)}, equal_nan=False).passed
    assert not compare_checkpoints({"x": f32(np.inf)}, {"x": f32(-np.inf)}).passed


def test_every_mismatching_leaf_is_collected_with_index_and_values():
    a = {f"l{i}": np.zeros((4, 5), np.float32) for i in range(30)}
    b = {k: v.copy() for k, v in a.items()}
    for i in range(30):
        b[f"l{i}"][i % 4, i % 5] = 1.0 + i
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(a, b)
    report = info.value.report
    assert len(report.mismatches) == 30
    l7 = next(r for r in report.results if r.path == "params/l7")
    assert l7.stats.worst_index == (3, 2) and l7.stats.worst_b == 8.0 and l7.stats.worst_a == 0.0
    msg = str(info.value)
    assert msg.splitlines()[0].startswith("checkpoint parity failed: 30 of 30 leaves differ")
    assert "params/l0  [values] float32 (4, 5): 1/20 (5%) elements differ" in msg
    assert "worst at index (0, 0): A=0 B=1" in msg
    assert "... and 10 more" in msg  # rows are capped


def test_shape_dtype_and_one_sided_leaves():
    a = {"s": np.zeros((2, 3), np.float32), "d": np.zeros(3, np.float32), "only_a": f32(1)}
    b = {"s": np.zeros((3, 2), np.float32), "d": np.zeros(3, np.float16), "only_b": f32(1)}
    report = compare_checkpoints(a, b, names=("old", "new"))
    kinds = {r.path: r.kind for r in report.results}
    assert kinds == {"params/s": "shape", "params/d": "dtype", "params/only_a": "only in A", "params/only_b": "only in B"}
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(a, b, names=("old", "new"))
    text = str(info.value)
    assert "present in new only" in text and "shape (2, 3) vs (3, 2)" in text and "dtype float32 vs float16" in text


def test_cast_policy_compares_in_the_lower_precision():
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    a = {"w": x}
    b = {"w": x.astype(ml_dtypes.bfloat16)}
    assert not compare_checkpoints(a, b).passed
    report = compare_checkpoints(a, b, dtype_policy="cast", atol=0, rtol=0)
    assert report.passed
    assert report.results[0].notes == ("float32 vs bfloat16, compared as bfloat16",)
    b["w"] = b["w"].copy()
    b["w"][5] = ml_dtypes.bfloat16(9.0)
    report = compare_checkpoints(a, b, dtype_policy="cast", atol=0, rtol=0)
    assert report.mismatches[0].stats.worst_index == (5,)


def test_counters_compare_by_value_across_integer_dtypes():
    assert compare_checkpoints({"step": np.int32(7)}, {"step": np.uint32(7)}).passed
    assert not compare_checkpoints({"step": np.int32(7)}, {"step": np.uint32(8)}).passed
    assert not compare_checkpoints({"w": np.int32(7)}, {"w": np.uint32(7)}).passed


def test_include_exclude_and_structure_only():
    a = {"params": {"w": f32(1)}, "opt_state": {"mu": f32(1)}}
    b = {"params": {"w": f32(2)}, "opt_state": {"mu": f32(1)}}
    assert compare_checkpoints(a, b, include="opt_state").passed
    assert compare_checkpoints(a, b, exclude=["params/*"]).passed
    assert not compare_checkpoints(a, b, include="params/**").passed
    report = compare_checkpoints(a, b, compare_values=False)
    assert report.passed and report.bytes_read == 0 and all(r.stats is None for r in report.results)


def test_blockwise_kernel_merges_pieces(monkeypatch):
    monkeypatch.setattr(kernel_mod, "PIECE_ELEMENTS", 7)
    a = np.zeros((6, 5, 4), np.float32)
    b = a.copy()
    b[4, 3, 2] = 5.0
    b[0, 0, 1] = 1.0
    report = compare_checkpoints({"x": a}, {"x": b})
    s = report.results[0].stats
    assert s.n_total == 120 and s.n_mismatch == 2 and s.worst_index == (4, 3, 2) and s.first_indices == ((0, 0, 1), (4, 3, 2))


def test_blocks_respect_the_read_budget():
    a = np.zeros((64, 8), np.float32)
    b = a.copy()
    b[50, 3] = 1
    report = compare_checkpoints({"x": a}, {"x": b}, read_budget=4 * 256)
    assert report.results[0].stats.worst_index == (50, 3)


def test_strings_and_scalars():
    assert compare_checkpoints({"s": "abc", "f": 1.5}, {"s": "abc", "f": 1.5}).passed
    report = compare_checkpoints({"s": "abc"}, {"s": "abd"})
    assert report.mismatches[0].stats.worst_a == "abc"


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(atol=-1), "atol must be a non-negative number"),
    (dict(rtol="x"), "rtol must be a non-negative number"),
    (dict(dtype_policy="loose"), "dtype_policy must be one of strict, cast"),
    (dict(tolerances={"a/**": {"tol": 1}}), "must be a dict with atol and/or rtol"),
    (dict(include=[3]), "include must hold non-empty glob strings"),
    (dict(names=("A",)), "names must be two non-empty strings"),
    (dict(rename=[("(", "x")]), "not a valid regular expression"),
])
def test_bad_option_values_are_usage_errors(kwargs, fragment):
    with pytest.raises(CkptParityUsageError, match=fragment.replace("(", r"\(")):
        assert_ckpt_parity({"x": f32(1)}, {"x": f32(1)}, **kwargs)


@pytest.mark.parametrize("path,pattern,hit", [
    ("opt_state/0/mu/w", "opt_state/**", True), ("opt_state/0/mu/w", "opt_state", True),
    ("params/a/b", "params/*", True), ("params/a/b", "params/*/c", False),
    ("params/decoder/layers/mlp/wi_0/kernel", "**/wi_?/kernel", True), ("step", "params/**", False),
])
def test_globs(path, pattern, hit):
    assert glob_match(path, pattern) is hit


def test_layer_drift_locates_the_drifting_layer_and_leaves_the_others_at_zero():
    """Per-layer figures (issue 14): a layered leaf keeps max |a-b|, max rel and headroom per
    layer, so a report can show where a model drifts; identical layers stay 0."""
    from pytest_ckptparity import compare_checkpoints

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 8, 16)).astype(np.float32)
    w2 = w.copy()
    w2[2] += 1e-3           # beyond tolerance: a mismatch in layer 2
    w2[3, 0, 0] += 1e-6     # within tolerance: headroom below 1 in layer 3
    tree = lambda k: {"params": {"decoder": {"layers": {"mlp": {"kernel": k}}}}}
    report = compare_checkpoints(tree(w), tree(w2), scan_axis=0)
    (leaf,) = report.results
    drift = leaf.stats.layer_drift
    assert [d.layer for d in drift] == [0, 1, 2, 3]
    assert drift[0].headroom == drift[1].headroom == 0.0 and drift[0].max_abs == 0.0
    assert drift[2].headroom > 1.0 and abs(drift[2].max_abs - 1e-3) < 1e-5
    assert 0.0 < drift[3].headroom < 1.0
    assert leaf.stats.mismatched_layers == (2,)
    assert max(d.headroom for d in drift) == leaf.stats.headroom
    assert leaf.to_dict()["stats"]["layer_drift"][2]["layer"] == 2
