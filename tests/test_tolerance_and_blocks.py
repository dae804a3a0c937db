"""Which tolerance a leaf gets (first matching glob, complex dtypes) and that block reads
cover every element: each test fails on a one-line slip in those rules."""

from __future__ import annotations

import numpy as np
import pytest

from pytest_ckptparity import CkptParityError, assert_ckpt_parity, compare_checkpoints
from pytest_ckptparity import diff as diff_mod
from pytest_ckptparity import read_plan as plan_mod
from pytest_ckptparity import examples as ex


def _rows(err: CkptParityError) -> list[str]:
    return [line.strip() for line in str(err).splitlines() if line.startswith("  ")]


# --------------------------------------------------------------------------------------
# Per-path tolerances: the first matching glob wins
# --------------------------------------------------------------------------------------

A = {"params": {"w": np.array([1.001, 2.0], np.float32)}, "opt_state": {"mu": np.array([1.001], np.float32)}}
B = {"params": {"w": np.array([1.0, 2.0], np.float32)}, "opt_state": {"mu": np.array([1.0], np.float32)}}


def test_the_first_matching_glob_wins_strict_first():
    strict_first = {"params/w": {"atol": 0.0, "rtol": 0.0}, "params/**": {"atol": 1e-2, "rtol": 0.0}, "**": {"atol": 1e-2}}
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(A, B, tolerances=strict_first)
    (bad,) = info.value.report.mismatches
    assert bad.path == "params/w" and bad.tolerance.atol == 0.0 and bad.tolerance.rtol == 0.0
    (row,) = _rows(info.value)
    assert row.startswith("params/w  [values] float32 (2,): 1/2 (50%) elements differ")
    assert row.endswith("atol=0, rtol=0")


def test_the_first_matching_glob_wins_loose_first():
    loose_first = {"params/**": {"atol": 1e-2, "rtol": 0.0}, "params/w": {"atol": 0.0, "rtol": 0.0}, "**": {"atol": 1e-2}}
    report = assert_ckpt_parity(A, B, tolerances=loose_first)
    tol = {r.path: (r.tolerance.atol, r.tolerance.rtol) for r in report.results}
    assert tol == {"params/w": (1e-2, 0.0), "opt_state/mu": (1e-2, 1.3e-6)}


def test_an_override_sets_only_what_it_names():
    # rtol is given by the override, atol falls back to the explicit value, then the default.
    tol = diff_mod.resolve_tolerance("params/w", "float32", diff_mod.CompareOptions(atol=0.5, tolerances={"params/*": {"rtol": 0.25}}))
    assert (tol.atol, tol.rtol) == (0.5, 0.25)
    tol = diff_mod.resolve_tolerance("params/w", "bfloat16", diff_mod.CompareOptions(tolerances={"params/*": {"atol": 0.5}}))
    assert (tol.atol, tol.rtol) == (0.5, 1.6e-2)
    tol = diff_mod.resolve_tolerance("step", "float32", diff_mod.CompareOptions(tolerances={"params/*": {"atol": 0.5}}))
    assert (tol.atol, tol.rtol) == (1e-5, 1.3e-6)


# --------------------------------------------------------------------------------------
# Complex dtypes take the tolerance of their component float
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,atol,rtol", [("complex64", 1e-5, 1.3e-6), ("complex128", 1e-7, 1e-7), ("float64", 1e-7, 1e-7), ("float32", 1e-5, 1.3e-6)])
def test_complex_defaults_follow_their_component_float(dtype, atol, rtol):
    tol = diff_mod.resolve_tolerance("x", dtype, diff_mod.CompareOptions())
    assert (tol.atol, tol.rtol, tol.exact) == (atol, rtol, False)


def test_complex64_compares_with_float32_tolerance(tmp_path):
    base = np.array([1 + 1j, 2 - 3j, 0.5j], np.complex64)
    near = base + np.complex64(5e-6)  # within float32's atol 1e-5, far outside float64's 1e-7
    far = base.copy()
    far[1] += np.complex64(1e-3j)
    saved = ex.save(tmp_path / "c64", {"params": {"z": base}})  # stored by orbax as complex64
    assert_ckpt_parity({"params": {"z": near}}, saved)
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity({"params": {"z": far}}, saved)
    (row,) = _rows(info.value)
    assert row.startswith("params/z  [values] complex64 (3,): 1/3 (33.3%) elements differ")
    assert row.endswith("atol=1e-05, rtol=1.3e-06")
    assert info.value.report.mismatches[0].stats.worst_index == (1,)
    # complex128 keeps float64's tolerance: the same small shift is a difference there.
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity({"params": {"z": near.astype(np.complex128)}}, {"params": {"z": base.astype(np.complex128)}})
    (row,) = _rows(info.value)
    assert row.startswith("params/z  [values] complex128 (3,): 3/3 (100%) elements differ") and row.endswith("atol=1e-07, rtol=1e-07")


# --------------------------------------------------------------------------------------
# Block reads cover the first and the last block of a split axis
# --------------------------------------------------------------------------------------


def _plant_corners(a: np.ndarray) -> np.ndarray:
    b = a.copy()
    b[(0,) * a.ndim] += 1.0
    b[tuple(d - 1 for d in a.shape)] += 2.0
    return b


@pytest.mark.parametrize("shape", [(64, 8), (4, 1024), (3, 5, 77)], ids=["rows", "columns", "odd"])
def test_tiny_budget_blocks_find_the_first_and_the_last_element(shape):
    a = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 7
    b = _plant_corners(a)
    budget = 8 * 128  # blocks of 128 bytes per side: 32 float32 elements
    blocks = plan_mod._blocks([slice(0, d) for d in shape], (1,) * len(shape), 4, budget // plan_mod.BLOCK_SHARE)
    assert len(blocks) > 2  # the leaf really is split
    report = compare_checkpoints({"x": a}, {"x": b}, read_budget=budget)
    (bad,) = report.mismatches
    last = tuple(d - 1 for d in shape)
    assert bad.stats.n_total == a.size
    assert bad.bytes_read == report.bytes_read == a.nbytes + b.nbytes  # each element read once per side
    assert bad.stats.n_mismatch == 2 and bad.stats.first_indices == ((0,) * len(shape), last)
    assert bad.stats.worst_index == last and (bad.stats.worst_a, bad.stats.worst_b) == (float(a[last]), float(b[last]))


def test_tiny_budget_over_stored_chunks_of_a_layer_stack(tmp_path):
    p = ex.tiny_params(0, layers=6, emb=4, heads=1, head_dim=4, mlp=8, vocab=8)
    drifted = ex.tiny_params(0, layers=6, emb=4, heads=1, head_dim=4, mlp=8, vocab=8)
    kernel = drifted["decoder"]["layers"]["mlp"]["wi_0"]["kernel"]  # (emb, layer, mlp)
    kernel[0, 0, 0] += 1.0  # first layer, first element: the first block
    kernel[3, 5, 7] += 2.0  # last layer, last element: the last block
    # Stacked with chunks of a few layers on one side, one array per layer on the other.
    a = ex.save(tmp_path / "stacked", {"params": {"params": p}}, step=0, chunk_byte_size=64)
    b = ex.save(tmp_path / "per_layer", {"params": {"params": ex.unstack(drifted, "layers_N")}}, step=0)
    for x, y in ((a, b), (b, a)):
        with pytest.raises(CkptParityError) as info:
            assert_ckpt_parity(x, y, read_budget=64, include="params/decoder/layers/mlp/wi_0/**")
        (bad,) = info.value.report.mismatches
        assert bad.stats.n_total == 6 * 4 * 8
        assert bad.stats.n_mismatch == 2 and bad.stats.first_indices == ((0, 0, 0), (5, 3, 7))
        assert bad.stats.mismatched_layers == (0, 5)
        assert "params/decoder/layers/mlp/wi_0/kernel [layers 0, 5]" in str(info.value)
        assert "2/192 (1.04%) elements differ" in str(info.value)


@pytest.mark.parametrize("order,passes", [("strict-first", False), ("loose-first", True)])
def test_ini_tolerance_lines_keep_their_order(pytester, order, passes):
    strict, loose = "params/w 0 0", "params/** 1e-2 0"
    lines = (strict, loose) if order == "strict-first" else (loose, strict)
    pytester.makeini("[pytest]\nckpt_tolerances =\n    " + "\n    ".join(lines) + "\n")
    pytester.makepyfile(test_tol="""
        import numpy as np

        def test_w(ckpt_parity):
            ckpt_parity({"params": {"w": np.float32([1.001])}}, {"params": {"w": np.float32([1.0])}})
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    if passes:
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["*params/w  [[]values[]] float32 (1,): 1/1 (100%) elements differ*; atol=0, rtol=0"])


# --------------------------------------------------------------------------------------
# Kernel arithmetic: float64 stays float64, NaN/inf raise no numpy warnings
# --------------------------------------------------------------------------------------


def test_float64_beyond_float32_range_is_compared_in_float64():
    # In float32 both sides would be inf, and inf equals inf: a difference would vanish.
    a = {"x": np.array([1e39, 1.0], np.float64)}
    b = {"x": np.array([2e39, 1.0], np.float64)}
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(a, b)
    (bad,) = info.value.report.mismatches
    assert bad.stats.n_mismatch == 1 and bad.stats.n_nonfinite == 0 and bad.stats.worst_index == (0,)
    assert "worst at index (0,): A=1e+39 B=2e+39" in str(info.value)
    assert "max abs diff 1e+39" in str(info.value)
    # Within float64's tolerance, far from float32's precision: still a pass.
    assert_ckpt_parity({"x": np.array([1.0 + 1e-8], np.float64)}, {"x": np.array([1.0], np.float64)})


def test_nan_and_inf_pairs_raise_no_numpy_warnings(recwarn):
    a = {"x": np.array([np.inf, np.nan, 1.0, -np.inf, 0.0], np.float32)}
    b = {"x": np.array([np.inf, 0.0, -np.inf, -np.inf, 0.0], np.float32)}
    report = compare_checkpoints(a, b)
    (bad,) = report.mismatches
    assert bad.stats.n_mismatch == 2 and bad.stats.n_nonfinite == 2 and bad.stats.first_indices == ((1,), (2,))
    assert compare_checkpoints(a, a).passed
    assert [str(w.message) for w in recwarn.list if issubclass(w.category, RuntimeWarning)] == []


def test_difference_stats_cover_finite_pairs_only():
    a = {"x": np.array([np.inf, 1.5, 2.0, np.nan], np.float32)}
    b = {"x": np.array([1.0, 1.0, 2.0, 3.0], np.float32)}
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(a, b)
    (bad,) = info.value.report.mismatches
    assert (bad.stats.n_mismatch, bad.stats.n_nonfinite, bad.stats.max_abs, bad.stats.max_rel) == (3, 2, 0.5, 0.5)
    assert bad.stats.worst_index == (1,)  # the finite mismatch stands for the leaf
    assert "3/4 (75%) elements differ; 2 of them NaN/inf against a different value; max abs diff 0.5, max rel diff 0.5; worst at index (1,): A=1.5 B=1" in str(info.value)
