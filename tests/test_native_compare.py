"""The native tolerance loop (native/compare.c) against the numpy path of `_fast_piece`:
bit-identical figures (maxima, headroom and its canonical index, per-layer maxima) and the
same eligibility, over every dtype and cast it takes, layer axes, ties, values exactly at
the allowance, NaN and inf; and real orbax pairs whose reports agree with the library on
and off."""

from __future__ import annotations

import math
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pytest_ckptparity import _native
from pytest_ckptparity import kernel as k
from pytest_ckptparity._model import Tolerance

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), BF16, np.dtype(np.float16), np.dtype(np.float64)]
NICE = Tolerance(atol=0.25, rtol=0.5)  # binary fractions: "exactly at the allowance" is easy to build


def _lib():
    lib = _native.library()
    assert lib is not None and hasattr(lib, "ckpt_compare_piece"), _native.status()
    return lib


def test_the_native_compare_loop_is_built_here():
    """Without it every test below would compare numpy with itself."""
    _lib()


def _work(a: np.ndarray, cast) -> type:
    return np.float64 if np.dtype(cast if cast is not None else a.dtype).itemsize >= 8 else np.float32


def _run(path: str, a: np.ndarray, b: np.ndarray, tol: Tolerance, layer_axis, origin, cast, limit: int):
    """`compare_stored_block`'s `run` over every piece of the block, with one path: the
    answers piece by piece (stopping at the first False, as `run` does) and the figures."""
    n_layers = a.shape[layer_axis] if layer_axis is not None else 0
    figures = k._Figures(n_layers)
    answers = []
    work = _work(a, cast)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for piece in k._pieces(a.shape, limit):
            pa, pb = a[piece], b[piece]
            if path == "native":
                answer = k._native_fast_piece(_lib(), pa, pb, piece, tol, layer_axis, origin, cast, work, figures)
                assert answer is not None, "the C loop refused arrays it should take"
            else:
                answer = k._numpy_fast_piece(pa, pb, piece, tol, layer_axis, origin, cast, work, figures)
            answers.append(answer)
            if not answer:
                break
    return answers, figures


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _assert_same(native: k._Figures, numpy: k._Figures) -> None:
    """Bit for bit: -0.0 is not 0.0 here, and a NaN would not pass."""
    assert _bits(native.max_abs) == _bits(numpy.max_abs), (native.max_abs, numpy.max_abs)
    assert _bits(native.max_rel) == _bits(numpy.max_rel), (native.max_rel, numpy.max_rel)
    assert _bits(native.headroom) == _bits(numpy.headroom), (native.headroom, numpy.headroom)
    assert native.headroom_index == numpy.headroom_index
    for name in ("layer_abs", "layer_rel", "layer_head"):
        assert getattr(native, name).tobytes() == getattr(numpy, name).tobytes(), (name, getattr(native, name), getattr(numpy, name))


def _check(a, b, tol, layer_axis, origin, cast, limit) -> list[bool]:
    native_answers, native = _run("native", a, b, tol, layer_axis, origin, cast, limit)
    numpy_answers, numpy = _run("numpy", a, b, tol, layer_axis, origin, cast, limit)
    assert native_answers == numpy_answers  # the same eligibility, piece by piece
    if all(numpy_answers):
        _assert_same(native, numpy)
    return numpy_answers


@st.composite
def _blocks(draw, dtypes=DTYPES):
    dtype = draw(st.sampled_from(dtypes))
    ndim = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim))
    if draw(st.booleans()):  # a long last axis: the C loop's 512-element runs and 8-lane tails
        shape[-1] = draw(st.integers(500, 1100))
        shape = [min(s, 3) for s in shape[:-1]] + shape[-1:]
    layer_axis = draw(st.sampled_from([None, *range(min(ndim, 3))]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    if draw(st.booleans()):  # ties: every element one of a few (a, b) pairs
        pairs = rng.standard_normal((draw(st.integers(1, 3)), 2)) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
        pick = rng.integers(0, len(pairs), n)
        x, y = pairs[pick, 0], pairs[pick, 1]
        if draw(st.booleans()):
            y = x * (1 + 1e-6 * (pairs[pick, 1] > 0))
    else:
        scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3]))
        y = rng.standard_normal(n) * scale
        noise = draw(st.sampled_from([0.0, 1e-8, 1e-7, 1e-6, 1e-4, 1e-2, 0.3]))
        x = y * (1 + noise * rng.standard_normal(n)) + noise * scale * 1e-3 * rng.standard_normal(n)
    zeros = rng.random(n) < draw(st.sampled_from([0.0, 0.1, 0.9]))  # 0 against 0: rel is 0/0 there
    x[zeros] = 0.0
    y[zeros] = 0.0
    tol = draw(st.sampled_from([k.DEFAULT_TOLERANCES[dtype.name], NICE, Tolerance(atol=1e-3, rtol=0.1),
                                Tolerance(atol=draw(st.floats(1e-9, 1.0)), rtol=draw(st.floats(1e-9, 1.0)))]))
    if tol is NICE and draw(st.booleans()):  # exactly at the allowance: d / allowance == 1, not eligible
        i = rng.integers(0, n)
        y[i] = rng.choice([0.0, 1.0, 2.0, -4.0])
        x[i] = y[i] + (abs(y[i]) * 0.5 + 0.25)
    for _ in range(draw(st.integers(0, 2))):  # NaN and inf on either side
        i = rng.integers(0, n)
        (x if rng.random() < 0.5 else y)[i] = rng.choice([np.nan, np.inf, -np.inf])
    a = x.reshape(shape).astype(dtype)
    b = y.reshape(shape).astype(dtype)
    origin = tuple(int(v) for v in rng.integers(0, 5, ndim))
    limit = draw(st.sampled_from([1, 7, 64, k.PIECE_ELEMENTS]))
    return a, b, tol, layer_axis, origin, limit


@settings(max_examples=300, deadline=None)
@given(block=_blocks())
def test_native_figures_are_the_numpy_figures(block):
    a, b, tol, layer_axis, origin, limit = block
    _check(a, b, tol, layer_axis, origin, None, limit)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("layer_axis", [None, 0, 1, 2])
def test_ties_take_the_earliest_canonical_index(dtype, layer_axis):
    """Every element has the same headroom: the index is the first in layer-first order, the
    same on both paths, across pieces of one row each."""
    a = np.full((3, 4, 5), 1.5, dtype)
    b = np.full((3, 4, 5), 1.0, dtype)
    for limit in (1, 5, 20, k.PIECE_ELEMENTS):
        answers = _check(a, b, NICE, layer_axis, (2, 0, 1), None, limit)
        assert all(answers)
        _, figures = _run("native", a, b, NICE, layer_axis, (2, 0, 1), None, limit)
        work = _work(a, None)
        assert figures.headroom == float(work(0.5) / work(0.75)) and figures.headroom_index == (2, 0, 1)
    # a larger value late in stored order, in layer 0: found wherever it is
    b2 = b.copy()
    b2[2, 0, 3] = 1.25  # d = 0.25, allowance = 0.875
    a2 = a.copy()
    a2[2, 0, 3] = 1.25 + 0.8
    _, figures = _run("native", a2, b2, NICE, layer_axis, (0, 0, 0), None, 7)
    _, expect = _run("numpy", a2, b2, NICE, layer_axis, (0, 0, 0), None, 7)
    _assert_same(figures, expect)
    canonical = (2, 0, 3) if layer_axis is None else ((2, 0, 3)[layer_axis],) + tuple(v for i, v in enumerate((2, 0, 3)) if i != layer_axis)
    assert figures.headroom_index == canonical


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_exactly_at_the_allowance_and_not_finite_are_not_eligible(dtype):
    b = np.ones((2, 600), dtype)
    a = b.copy()
    a[1, 599] = 1.75  # |a - b| == 0.25 + 0.5 * 1: not strictly within
    assert _check(a, b, NICE, 0, (0, 0), None, k.PIECE_ELEMENTS) == [False]
    a[1, 599] = np.nextafter(np.array(1.75, dtype), np.array(0, dtype)) if dtype != BF16 else ml_dtypes.bfloat16(1.7421875)
    assert _check(a, b, NICE, 0, (0, 0), None, k.PIECE_ELEMENTS) == [True]
    for special in (np.nan, np.inf, -np.inf):
        for side in (a, b):
            c = side.copy()
            c[0, 3] = special
            pair = (c, b) if side is a else (a, c)
            assert _check(*pair, NICE, 0, (0, 0), None, k.PIECE_ELEMENTS) == [False]


def test_zero_against_zero_layers_keep_rel_zero_and_inf_rel_counts():
    """0/0 is ignored (np.fmax); x/0 with x within atol is an infinite rel, on both paths."""
    a = np.zeros((3, 4), np.float32)
    b = np.zeros((3, 4), np.float32)
    a[:, 2] = 1e-6  # layer 2 (axis 1): rel = inf, the others all 0/0
    _check(a, b, k.DEFAULT_TOLERANCES["float32"], 1, (0, 0), None, k.PIECE_ELEMENTS)
    _, figures = _run("native", a, b, k.DEFAULT_TOLERANCES["float32"], 1, (0, 0), None, k.PIECE_ELEMENTS)
    assert figures.layer_rel.tolist() == [0.0, 0.0, math.inf, 0.0] and figures.max_rel == math.inf


CASTS = [  # (A dtype, B dtype, cast to): what `dtype_policy="cast"` passes
    (np.float32, ml_dtypes.bfloat16, ml_dtypes.bfloat16),
    (ml_dtypes.bfloat16, np.float32, ml_dtypes.bfloat16),
    (np.float32, np.float32, ml_dtypes.bfloat16),
    (np.float64, np.float32, np.float32),
    (np.float32, np.float64, np.float32),
    (ml_dtypes.bfloat16, np.float16, np.float32),
    (np.float32, np.float64, np.float64),
    (np.float16, np.float16, np.float16),
]


@settings(max_examples=150, deadline=None)
@given(block=_blocks(dtypes=[np.dtype(np.float64)]), cast=st.sampled_from(CASTS))
def test_native_casts_are_the_numpy_casts(block, cast):
    x, y, tol, layer_axis, origin, limit = block
    da, db, to = cast
    _check(x.astype(da), y.astype(db), tol, layer_axis, origin, np.dtype(to), limit)


def test_float32_to_bfloat16_rounds_as_ml_dtypes_at_every_kind_of_bit_pattern():
    """B is ml_dtypes' own rounding of A: with the C rounding equal, every |a - b| is 0. Ties
    to even (low half exactly 0x8000), carries into the exponent, subnormals, the largest
    values that stay finite, and random patterns."""
    rng = np.random.default_rng(7)
    low = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    high = rng.integers(0, 0x7F7F, 400, dtype=np.uint32)
    patterns = (high[:, None] << 16 | low[None, :]).reshape(-1)
    patterns = np.concatenate([patterns, rng.integers(0, 0x7F7F7FFF, 4000, dtype=np.uint32),
                               np.array([0x7F7F7FFF, 0x7F7F0000, 0x00000001, 0x00008000, 0x00018000, 0x007FFFFF], np.uint32)])
    patterns = np.concatenate([patterns, patterns | 0x80000000])  # and negative
    a = patterns.view(np.float32).reshape(2, -1)
    b = a.astype(ml_dtypes.bfloat16)
    assert np.isfinite(b.astype(np.float32)).all()
    answers, figures = _run("native", a, b, NICE, None, (0, 0), BF16, k.PIECE_ELEMENTS)
    assert answers == [True] and figures.max_abs == 0.0 and figures.headroom == 0.0
    # one element rounded the other way is seen
    b2 = b.copy()
    b2.view(np.uint16)[0, 5] += 1  # the next bfloat16 up
    _check(a, b2, NICE, None, (0, 0), BF16, k.PIECE_ELEMENTS)
    assert _run("native", a, b2, NICE, None, (0, 0), BF16, k.PIECE_ELEMENTS)[1].max_abs > 0
    # values that round to inf, and NaN: not eligible on either path
    for bits in (0x7F7F8000, 0x7F7FFFFF, 0x7FC00001, 0xFF800000):
        c = a.copy()
        c[1, 0] = np.array([bits], np.uint32).view(np.float32)[0]
        assert _check(c, b, NICE, None, (0, 0), BF16, k.PIECE_ELEMENTS) == [False]


def test_casts_and_arrays_the_loop_does_not_take_go_to_numpy():
    lib = _lib()
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)
    figures = k._Figures(6)
    piece = (slice(0, 4),)
    tol = k.DEFAULT_TOLERANCES["float16"]
    refused = [
        (x, x.astype(np.float16), np.dtype(np.float16), tol),  # float32 -> float16: numpy's rounding
        (x.astype(np.float64), x.astype(np.float64), np.dtype(BF16), tol),  # float64 -> bfloat16
        (np.asfortranarray(x), x, None, tol),  # not C-contiguous
        (x, x, None, Tolerance(atol=np.float64(1e-5), rtol=1e-3)),  # numpy would compute in float64
        (x.astype(">f4"), x.astype(">f4"), None, tol),  # big-endian
    ]
    for a, b, cast, t in refused:
        assert k._native_fast_piece(lib, a, b, piece, t, 1, (0, 0), cast, _work(a, cast), figures) is None
    # and the dispatcher still answers, through numpy
    with np.errstate(invalid="ignore", divide="ignore"):
        assert k._fast_piece(x, x.astype(np.float16), piece, tol, 1, (0, 0), np.dtype(np.float16), np.float32, figures) is True


@settings(max_examples=60, deadline=None)
@given(block=_blocks(), limit=st.sampled_from([7, 300, 5000]))
def test_compare_stored_block_is_the_same_with_the_library_on_and_off(block, limit, monkeypatch_module):
    """The whole stored-order path, thread pool and fallback to `compare_block` included."""
    a, b, tol, layer_axis, origin, _ = block
    monkeypatch_module.setattr(k, "PIECE_ELEMENTS", limit)
    stats = {}
    for mode in ("1", "0"):
        monkeypatch_module.setenv("CKPTPARITY_NATIVE", mode)
        acc = k._Accumulator()
        k.compare_stored_block(a, b, tol, True, acc, origin, layer_axis)
        stats[mode] = acc.stats()
    monkeypatch_module.delenv("CKPTPARITY_NATIVE")
    assert repr(stats["1"]) == repr(stats["0"])


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


# --------------------------------------------------------------------------------------
# Real checkpoints, written by orbax
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_pairs(tmp_path_factory) -> dict[str, tuple[str, str, dict]]:
    """A scanned Linen TrainState, the same within 1e-6 relative noise, and a bf16 decode
    checkpoint of it with 2e-3 relative noise; shapes wide enough for the C loop's runs and
    lanes."""
    from pytest_ckptparity import examples as ex

    root = tmp_path_factory.mktemp("native-compare")
    params = ex.tiny_params(0, layers=3, emb=24, mlp=700)
    rng = np.random.default_rng(1)
    noisy = ex._map(params, lambda x: (x * (1 + 1e-6 * rng.standard_normal(x.shape))).astype(x.dtype))
    a = ex.save(root / "a", ex.linen_train_state(params), step=7)
    b = ex.save(root / "b", ex.linen_train_state(noisy), step=7)
    drifted = ex._map(params, lambda x: (x * (1 + 2e-3 * rng.standard_normal(x.shape))).astype(x.dtype))
    decode = ex.save(root / "decode", ex.decode_params(drifted))  # some roundings to bf16 differ by a step
    return {"tolerance": (a, b, {}), "bf16-cast": (decode, a, {"dtype_policy": "cast", "include": "params"})}


@pytest.mark.parametrize("pair", ["tolerance", "bf16-cast"])
def test_a_real_pair_reports_the_same_with_the_library_on_and_off(real_pairs, pair, monkeypatch):
    from pytest_ckptparity.api import compare_checkpoints

    a, b, options = real_pairs[pair]
    calls = []
    real = k._native_fast_piece

    def counting(*args):
        answer = real(*args)
        calls.append(answer)
        return answer

    monkeypatch.setattr(k, "_native_fast_piece", counting)
    documents = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("CKPTPARITY_NATIVE", mode)
        report = compare_checkpoints(a, b, **options)
        assert report.passed, report
        document = report.to_dict()
        document["totals"].pop("wall_time_s")
        documents[mode] = document
    assert calls and all(answer is True for answer in calls), calls  # the C loop did the work, with the library
    assert documents["1"] == documents["0"]
    leaves = documents["1"]["leaves"]
    drifted = [leaf for leaf in leaves if leaf["stats"] and leaf["stats"]["max_abs"] > 0]
    assert len(drifted) >= 5, "the pair must really differ within tolerance"
    assert any(leaf["stats"]["layer_drift"] for leaf in drifted), "per-layer figures must be compared too"
