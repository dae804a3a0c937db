"""Property-based: random trees written with orbax equal themselves through every layout;
one element changed beyond tolerance is found at its path, layer and index; changes within
tolerance pass."""

from __future__ import annotations

import itertools
import tempfile

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_ckptparity import CkptParityError, assert_ckpt_parity, compare_checkpoints
from pytest_ckptparity import examples as ex

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16, np.int8, np.uint32, np.bool_]
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def layer_trees(draw):
    """params with a `layers` stack (axis 1) of 1-3 layers plus plain leaves of 0-d to 5-d."""
    n_layers = draw(st.integers(1, 3))
    leaves = {}
    for i in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from(DTYPES))
        per_layer = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
        shape = per_layer[:1] + (n_layers,) + per_layer[1:]
        leaves[f"w{i}"] = _array(draw, shape, dtype)
    plain = {}
    for i in range(draw(st.integers(0, 2))):
        shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=5)))
        plain[f"p{i}"] = _array(draw, shape, draw(st.sampled_from(DTYPES)))
    return {"decoder": {"layers": leaves, **plain}}


def _array(draw, shape, dtype):
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if dtype is np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 100, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def writers():
    return {
        "linen_scan": lambda p: ex.linen_train_state(p),
        "linen_noscan": lambda p: ex.linen_train_state(ex.unstack(p, "layers_N")),
        "nnx_wrapped": lambda p: ex.nnx_state(ex.unstack(p, "int_keys"), rngs=False),
        "nnx_pure": lambda p: ex.nnx_state(p, wrapped=False, rngs=False),
    }


@SETTINGS
@given(tree=layer_trees(), pair=st.sampled_from(list(itertools.combinations(["linen_scan", "linen_noscan", "nnx_wrapped", "nnx_pure"], 2))))
def test_every_tree_equals_itself_through_every_layout(tree, pair):
    with tempfile.TemporaryDirectory() as d:
        w = writers()
        a = ex.save(f"{d}/a", w[pair[0]](tree))
        b = ex.save(f"{d}/b", w[pair[1]](tree))
        assert_ckpt_parity(a, b, include="params")
        assert_ckpt_parity(b, a, include="params")


@SETTINGS
@given(tree=layer_trees(), data=st.data())
def test_one_change_is_found_at_its_path_layer_and_index(tree, data):
    name = data.draw(st.sampled_from(sorted(tree["decoder"]["layers"])))
    x = tree["decoder"]["layers"][name]
    index = tuple(data.draw(st.integers(0, d - 1)) for d in x.shape)
    changed = {"decoder": {**tree["decoder"], "layers": {**tree["decoder"]["layers"], name: x.copy()}}}
    y = changed["decoder"]["layers"][name]
    y[index] = (not y[index]) if y.dtype == bool else y[index] + (7 if y.dtype.kind in "iu" else 8.0)
    layout = data.draw(st.sampled_from(["linen_noscan", "nnx_wrapped"]))
    with tempfile.TemporaryDirectory() as d:
        a = ex.save(f"{d}/a", writers()["linen_scan"](tree))
        b = ex.save(f"{d}/b", writers()[layout](changed))
        with pytest.raises(CkptParityError) as info:
            assert_ckpt_parity(a, b, include="params")
    (bad,) = info.value.report.mismatches
    assert bad.path == f"params/decoder/layers/{name}"
    layer, rest = index[1], index[:1] + index[2:]
    assert bad.stats.worst_index == (layer, *rest) and bad.stats.mismatched_layers == (layer,)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 4), max_size=5).map(tuple), seed=st.integers(0, 1000),
       dtype=st.sampled_from([np.float32, ml_dtypes.bfloat16, np.float16]))
def test_changes_within_tolerance_pass_beyond_fail(shape, seed, dtype):
    """In memory (orbax cannot write empty arrays); B is the reference."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal(shape).astype(dtype)
    tol = {"atol": 1e-2, "rtol": 1e-2}
    within = (b.astype(np.float64) + 0.4 * (1e-2 + 1e-2 * np.abs(b.astype(np.float64)))).astype(dtype)
    within = np.where(np.abs(within.astype(np.float64) - b.astype(np.float64)) <= 1e-2 + 1e-2 * np.abs(b.astype(np.float64)), within, b)
    assert compare_checkpoints({"x": within}, {"x": b}, **tol).passed
    if b.size:
        beyond = b.copy()
        beyond.reshape(-1)[0] = beyond.reshape(-1)[0] + dtype(1.0)
        report = compare_checkpoints({"x": beyond}, {"x": b}, **tol)
        assert report.mismatches[0].stats.worst_index == np.unravel_index(0, shape)


def _reference_mismatches(a: np.ndarray, b: np.ndarray, atol: float, rtol: float, equal_nan: bool) -> list[int]:
    """The value rules written out element by element, in float64: flat indices that differ."""
    bad = []
    for i, (p, q) in enumerate(zip(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())):
        if np.isnan(p) or np.isnan(q):
            ok = equal_nan and np.isnan(p) and np.isnan(q)
        elif np.isinf(p) or np.isinf(q):
            ok = p == q
        else:
            ok = abs(p - q) <= atol + rtol * abs(q)
        if not ok:
            bad.append(i)
    return bad


SPECIALS = [0.0, 0.5, 2.0, np.nan, np.inf, -np.inf]  # 0.5 / 2.0: that many times the tolerance


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple), seed=st.integers(0, 10_000),
       dtype=st.sampled_from([np.float32, ml_dtypes.bfloat16, np.float64]), equal_nan=st.booleans(),
       piece=st.integers(1, 8))
def test_kernel_agrees_with_the_rules_written_out(shape, seed, dtype, equal_nan, piece):
    """Random NaN, inf and offsets well inside or outside the tolerance, cut in tiny pieces."""
    from pytest_ckptparity import kernel as kernel_mod

    rng = np.random.default_rng(seed)
    atol, rtol = 1e-2, 1e-2
    b = rng.standard_normal(shape)
    kinds = rng.choice(len(SPECIALS), size=shape)
    a = b.copy()
    for k, special in enumerate(SPECIALS):
        where = kinds == k
        if k < 3:
            a[where] = b[where] + special * (atol + rtol * np.abs(b[where]))
        else:
            a[where] = special
    b[rng.random(shape) < 0.1] = np.nan  # some NaN and inf in B too
    b[rng.random(shape) < 0.1] = np.inf
    a, b = a.astype(dtype), b.astype(dtype)
    expected = _reference_mismatches(a, b, atol, rtol, equal_nan)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel_mod, "PIECE_ELEMENTS", piece)
        report = compare_checkpoints({"x": a}, {"x": b}, atol=atol, rtol=rtol, equal_nan=equal_nan)
    stats = report.results[0].stats
    assert stats.n_mismatch == len(expected)
    assert list(stats.first_indices) == [np.unravel_index(i, shape) for i in expected[:5]]
    finite = [i for i in expected if np.isfinite(a.astype(np.float64).ravel()[i]) and np.isfinite(b.astype(np.float64).ravel()[i])]
    both_nan = [i for i in expected if np.isnan(a.astype(np.float64).ravel()[i]) and np.isnan(b.astype(np.float64).ravel()[i])]
    assert stats.n_nan_pairs == len(both_nan)  # only with equal_nan=False: NaN against NaN
    assert stats.n_nonfinite == len(expected) - len(finite) - len(both_nan)
    # Headroom: the largest |a - b| / (atol + rtol * |b|) over finite pairs; beyond 1 on a mismatch.
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    pairs = np.isfinite(x) & np.isfinite(y)
    ratio = np.abs(x[pairs] - y[pairs]) / (atol + rtol * np.abs(y[pairs]))
    if expected:
        assert stats.headroom > 1.0
    else:
        assert np.isclose(stats.headroom, ratio.max() if ratio.size else 0.0, rtol=1e-5, atol=0)
        if stats.headroom:
            i = np.ravel_multi_index(stats.headroom_index, shape)
            assert np.isclose(abs(x[i] - y[i]) / (atol + rtol * abs(y[i])), stats.headroom, rtol=1e-5)
    if finite:  # the worst is a finite mismatch with the largest difference (ties: any of them)
        diffs = np.abs(a.astype(np.float64).ravel()[finite] - b.astype(np.float64).ravel()[finite])
        at_worst = abs(a.astype(np.float64)[stats.worst_index] - b.astype(np.float64)[stats.worst_index])
        assert np.isclose(at_worst, diffs.max(), rtol=1e-6, atol=0)
    elif expected:
        assert stats.worst_index == np.unravel_index(expected[0], shape)
