"""Reading as stored: a layer stack is read and compared in its stored axis order (no layer-first
copy or strided view), and every figure equals the layer-first kernel's; slabs of two chunk
grids hold at most the read budget."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_ckptparity import Comparison
from pytest_ckptparity import diff as diff_mod
from pytest_ckptparity import kernel as kernel_mod
from pytest_ckptparity import read_plan as plan_mod
from pytest_ckptparity import examples as ex
from pytest_ckptparity._model import Tolerance
from pytest_ckptparity.diff import CompareOptions

SPECIAL = [np.nan, np.inf, -np.inf]


@st.composite
def stored_pairs(draw):
    """(a, b, layer axis or None) as stored: mostly within tolerance, sometimes with a value
    beyond it, a NaN or an inf, sometimes with ties (repeated values) for the headroom."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.one_of(st.none(), st.integers(0, ndim - 1)))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16, ml_dtypes.bfloat16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    b = rng.standard_normal(shape)
    if draw(st.booleans()):  # ties: a handful of distinct values repeated
        b = np.round(b * 2) / 2
    noise = draw(st.sampled_from([0.0, 1e-7, 1e-3, 0.3]))  # 0.3 is beyond bfloat16's rtol
    a = b * (1 + noise * rng.choice([-1.0, 1.0], size=shape)) if noise else b.copy()
    if draw(st.integers(0, 3)) == 0:  # one odd element on a side
        side = draw(st.sampled_from(["a", "b", "both"]))
        flat = draw(st.integers(0, a.size - 1))
        value = draw(st.sampled_from(SPECIAL + [100.0]))
        for arr, name in ((a, "a"), (b, "b")):
            if side in (name, "both"):
                arr.reshape(-1)[flat] = value
    return a.astype(dtype), b.astype(dtype), axis


@settings(max_examples=150, deadline=None)
@given(pair=stored_pairs(), piece=st.integers(1, 40), equal_nan=st.booleans(), origin_shift=st.integers(0, 7),
       cast=st.sampled_from([None, None, np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)]),
       tol=st.sampled_from([Tolerance(atol=1e-5, rtol=1.3e-6), Tolerance(atol=1e-2, rtol=1e-2), Tolerance(atol=1e-3, rtol=0.0)]))
def test_stored_order_figures_equal_the_layer_first_kernel(pair, piece, equal_nan, origin_shift, tol, cast):
    """Every figure (counts, maxima, headroom and its index, per-layer drift, first and worst
    indices) from the stored-order path equals `compare_block` on the layer-first view, with
    and without a cast (dtype policy `cast`)."""
    a, b, axis = pair
    move = (lambda x: np.moveaxis(x, axis, 0)) if axis is not None else (lambda x: x)
    origin = tuple(origin_shift * (i + 1) for i in range(a.ndim))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel_mod, "PIECE_ELEMENTS", piece)
        expected, got = kernel_mod._Accumulator(), kernel_mod._Accumulator()
        kernel_mod.compare_block(move(a), move(b), tol, equal_nan, expected, origin, axis is not None, cast)
        kernel_mod.compare_stored_block(a, b, tol, equal_nan, got, origin, axis, cast)
    assert _without_zero_layers(got.stats()) == _without_zero_layers(expected.stats())


def _without_zero_layers(stats):
    """A layer the kernel found bitwise equal is absent from its figures; one inside a stored
    piece that differed elsewhere is there with 0s. Both read 0 in the leaf's result (every
    layer compared gets 0s when absent), so only the layers that drifted are compared."""
    from dataclasses import replace

    return repr(replace(stats, layer_drift=tuple(d for d in stats.layer_drift if (d.max_abs, d.max_rel, d.headroom) != (0, 0, 0))))


def test_a_block_with_a_mismatch_is_compared_again_layer_first():
    """The stored-order path only proves blocks within tolerance: a mismatch anywhere sends the
    block to the kernel, which reports it at its canonical (layer-first) index."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 3, 10)).astype(np.float32)  # stored (emb, layers, mlp)
    b = a.copy()
    b[4, 2, 7] += 1.0
    acc = kernel_mod._Accumulator()
    kernel_mod.compare_stored_block(a, b, Tolerance(atol=1e-5, rtol=1e-5), True, acc, (0, 0, 0), 1)
    stats = acc.stats()
    assert stats.n_mismatch == 1 and stats.n_total == a.size
    assert stats.worst_index == (2, 4, 7) and stats.first_indices == ((2, 4, 7),)
    assert stats.mismatched_layers == (2,)
    assert [(d.layer, d.headroom > 1) for d in stats.layer_drift] == [(2, True)]  # the equal layers get 0s when the leaf is done


def _write_pair(tmp_path, noise: float):
    params = ex.tiny_params(0, layers=3, emb=16, heads=2, head_dim=8, mlp=64, vocab=64)
    rng = np.random.default_rng(1)
    other = ex._map(params, lambda x: (x * (1 + rng.uniform(-noise, noise, x.shape))).astype(x.dtype))
    a = ex.save(tmp_path / "a", ex.linen_train_state(params), step=1)
    b = ex.save(tmp_path / "b", ex.linen_train_state(other), step=1)
    return a, b


@pytest.mark.parametrize("noise", [1e-7, 1e-3])
def test_reading_as_stored_gives_the_report_of_the_layer_first_reading(tmp_path, monkeypatch, noise):
    """Real orbax checkpoints (layers stacked on axis 1): the report read as stored equals the
    report read layer first, within tolerance (1e-7) and with mismatches (1e-3), field by field."""
    a, b = _write_pair(tmp_path, noise)
    options = CompareOptions(stored_bytes=False)  # every chunk decoded
    calls = []
    real = plan_mod.compare_stored_block
    monkeypatch.setattr(plan_mod, "compare_stored_block", lambda *x, **y: calls.append(x[6]) or real(*x, **y))
    as_stored = Comparison(a, b, options=options).run()
    assert 1 in calls  # the stacks went through the stored-order path, layer axis 1
    monkeypatch.setattr(diff_mod, "_read_as_stored", lambda la, lb: False)
    layer_first = Comparison(a, b, options=options).run()
    assert as_stored.passed == layer_first.passed == (noise < 1e-6)
    assert [r.to_dict() for r in as_stored.results] == [r.to_dict() for r in layer_first.results]
    layered = [r for r in as_stored.results if r.layers]
    assert layered and all(len(r.stats.layer_drift) == 3 for r in layered)
    assert any(d.headroom > 0 for r in layered for d in r.stats.layer_drift)


@pytest.fixture(scope="module")
def meshes(two_meshes):
    """Rows vs columns; `cols_planted` differs in the second slab (conftest.py's MESH_WRITER)."""
    return {"rows": two_meshes["rows"], "cols": two_meshes["cols"], "cols_planted": two_meshes["planted_mid"]}


class _InFlight:
    """Records every array read (side, decoded bytes) and how many reads of the comparison
    were unfinished when it started."""

    def __init__(self, monkeypatch):
        from pytest_ckptparity.sources import OrbaxCheckpoint, Pending

        self.reads, self.alive, self.most = [], 0, 0
        original = OrbaxCheckpoint.read

        def read(ckpt, path, index=None):
            pending = original(ckpt, path, index)
            self.alive += 1
            self.most = max(self.most, self.alive)
            self.reads.append((ckpt.name, pending.nbytes))
            done = []

            def get():
                value = pending.result()
                if not done:
                    done.append(1)
                    self.alive -= 1
                return value

            return Pending(get, pending.nbytes)

        monkeypatch.setattr(OrbaxCheckpoint, "read", read)


@pytest.mark.parametrize("b", ["cols", "cols_planted"])
@pytest.mark.parametrize("budget, depth", [(8 << 10, 2), (4 << 10, 1)])
def test_slabs_are_read_part_by_part_a_few_chunks_at_a_time(meshes, monkeypatch, b, budget, depth):
    """A's row chunks (8 x 48) against B's column chunks (64 x 6): slabs of 16 x 24 (the
    shape that decodes fewest) each cut two A chunks and four B chunks. Each side is read
    one part (the slab inside one stored chunk) at a time, two reads unfinished at once when
    the budget holds that, else one; B's parts are compared against A's slab as they come.
    Every element is still compared once, and a difference in a part is found at its index."""
    # the common block (the whole 12 KiB array, both sides) does not fit either budget
    log = _InFlight(monkeypatch)
    report = Comparison(meshes["rows"], meshes[b], options=CompareOptions(read_budget=budget)).run()
    (w,) = report.results
    assert w.stats.n_total == 64 * 48 and w.bytes_read == 2 * 64 * 48 * 4
    a_reads = [n for side, n in log.reads if side == "A"]
    b_reads = [n for side, n in log.reads if side == "B"]
    assert a_reads == [8 * 24 * 4] * 16  # two half A chunks per slab, eight slabs
    assert b_reads == [16 * 6 * 4] * 32  # four parts of B's chunks per slab
    assert log.most == depth  # never more chunks decoding at once
    if b == "cols":
        assert report.passed
    else:
        assert not report.passed and w.stats.n_mismatch == 1 and w.stats.first_indices == ((9, 40),)


def test_slab_reads_count_a_slab_and_the_parts_in_flight_in_the_budget():
    """The budget counts a slab read in parts as A's slab plus the decoded chunks of one side
    in flight (B's with the part each yields), not every chunk the slab cuts."""
    from pytest_ckptparity.normalize import LogicalLeaf, Storage

    la = LogicalLeaf("w", "params", (64, 48), "float32", Storage(raw=("w",)), chunk_shape=(8, 48))
    lb = LogicalLeaf("w", "params", (64, 48), "float32", Storage(raw=("w",)), chunk_shape=(64, 6))
    job = plan_mod._Job("w", la, lb, Tolerance(1e-5, 1e-5), None, None, (), [], as_stored=True)
    slab = (slice(8, 16), slice(0, 48))
    assert plan_mod._cuts_chunks(job, slab)
    for depth in (1, 2):
        job.slab_depth = depth
        in_flight = depth * max(8 * 48 + 8 * 48, 64 * 6 + 8 * 6)  # a chunk decoding and its part, a side
        assert plan_mod._block_bytes(job, slab) == (8 * 48 + in_flight + 2 * 8 * 6) * 4
    job.as_stored = False  # read through the views: every chunk the slab touches, at once, with its stored bytes
    assert plan_mod._block_bytes(job, slab) == (2 * 8 * 48 + 2 * (8 * 48 + 64 * 48)) * 4


@pytest.mark.parametrize("grids", [((8, 48), (64, 6)), ((16, 48), (64, 12)), ((64, 6), (8, 48)), ((32, 16), (16, 32)), ((8, 48), (8, 6))])
def test_the_slab_shape_decodes_no_more_than_any_shape_that_fits(grids):
    """Against every block shape of at most `limit` elements (brute force over all of them),
    the chosen slab decodes no more chunks, and it fits."""
    extent = [slice(0, 64), slice(0, 48)]
    unit = tuple(max(a, b) for a, b in zip(*grids))
    for limit in (384, 768, 200):
        shape = plan_mod._slab_shape(extent, unit, grids, limit)
        assert shape[0] * shape[1] <= limit
        chosen = plan_mod._decodes(extent, shape, grids)
        best = min(plan_mod._decodes(extent, (x, y), grids) for x in range(1, 65) for y in range(1, 49) if x * y <= limit)
        assert chosen == best, (grids, limit, shape, chosen, best)


def test_a_layer_range_read_as_stored_reports_those_layers(tmp_path, monkeypatch):
    """A pytest item compares some layers of a stack (a selection with a layer range): read
    as stored, its figures, indices and per-layer drift are those of the layer-first reading,
    numbered in the whole stack, and a difference in a selected layer is found there."""
    from pytest_ckptparity.diff import Selection

    params = ex.tiny_params(0, layers=5, emb=16, heads=2, head_dim=8, mlp=64, vocab=64)
    rng = np.random.default_rng(3)
    other = ex._map(params, lambda x: (x * (1 + rng.uniform(-1e-7, 1e-7, x.shape))).astype(x.dtype))
    kernel = other["decoder"]["layers"]["mlp"]["wi_0"]["kernel"]  # stored (emb, layers, mlp)
    kernel[3, 3, 5] += 0.5  # layer 3
    a = ex.save(tmp_path / "a", ex.linen_train_state(params), step=1)
    b = ex.save(tmp_path / "b", ex.linen_train_state(other), step=1)
    options = CompareOptions(stored_bytes=False)
    comparison = Comparison(a, b, options=options)
    stacked = [p for p, leaf in comparison.views[0].leaves.items() if leaf.layers and p.startswith("params/")]
    selection = [Selection(tuple(stacked), layer_range=(2, 5))]
    as_stored = comparison.run(selection)
    monkeypatch.setattr(diff_mod, "_read_as_stored", lambda la, lb: False)
    layer_first = Comparison(a, b, options=options).run(selection)
    assert [r.to_dict() for r in as_stored.results] == [r.to_dict() for r in layer_first.results]
    (bad,) = as_stored.mismatches
    assert bad.path == "params/decoder/layers/mlp/wi_0/kernel" and bad.stats.worst_index == (3, 3, 5)
    assert [d.layer for d in bad.stats.layer_drift] == [2, 3, 4] and bad.stats.mismatched_layers == (3,)
    assert all(r.stats.n_total == 3 * math.prod(r.shape_a[1:]) for r in as_stored.results)


def test_a_layer_range_of_a_recomputed_stack_decodes_its_chunks_one_at_a_time(tmp_path, monkeypatch):
    """A layer range cuts every chunk of a stack that holds all its layers; when the stored
    bytes of such a block differ, its parts are decoded one after the other (each decodes a
    whole chunk, which the block's cost does not count), not all at once; and the figures
    are those of reading values alone."""
    from pytest_ckptparity.diff import Selection

    w = np.random.default_rng(0).standard_normal((48, 8, 64)).astype(np.float32)  # (emb, layers, mlp)

    def tree(x):
        return {"params": {"params": {"decoder": {"layers": {"mlp": {"wi_0": {"kernel": x}}}}}}}

    a = ex.save(tmp_path / "a", tree(w), step=0, chunk_byte_size=8192)
    b = ex.save(tmp_path / "b", tree((w * (1 + 1e-7 * np.sign(w))).astype(np.float32)), step=0, chunk_byte_size=8192)
    path = "params/decoder/layers/mlp/wi_0/kernel"
    leaf = Comparison(a, b).views[0].leaves[path]
    assert leaf.chunk_shape == (8, 16, 16)  # every chunk holds all eight layers
    selection = [Selection((path,), layer_range=(3, 4))]
    log = _InFlight(monkeypatch)
    report = Comparison(a, b, options=CompareOptions(read_budget=64 << 10, rtol=1e-5)).run(selection)
    assert report.passed and report.results[0].stats.n_total == 48 * 64
    assert len(log.reads) > 2 and log.most <= 2, log.most
    values = Comparison(a, b, options=CompareOptions(read_budget=64 << 10, rtol=1e-5, stored_bytes=False)).run(selection)
    assert [r.to_dict() for r in report.results] == [r.to_dict() for r in values.results]


def test_the_next_block_is_read_while_one_is_compared_once_its_chunks_are_freed(tmp_path, monkeypatch):
    """A block in flight counts with the stored chunks tensorstore decodes it from; once it is
    read only the block is held, so the next block's read starts before it is compared, even
    when two blocks with their chunks would not fit in the budget."""
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    a = ex.save(tmp_path / "a", {"w": w}, step=0, chunk_byte_size=4096)
    b = ex.save(tmp_path / "b", {"w": (w * (1 + 1e-7 * np.sign(w))).astype(np.float32)}, step=0, chunk_byte_size=4096)
    chunk = 4096
    assert math.prod(Comparison(a, b).views[0].leaves["params/w"].chunk_shape) * 4 == chunk
    budget = 9 * chunk  # a block (one chunk a side) costs 6 chunks in flight (block, decoded chunk, stored bytes), 2 once read
    log = _InFlight(monkeypatch)
    issued_at_compare = []
    real = plan_mod._compare_values
    monkeypatch.setattr(plan_mod, "_compare_values", lambda *x: issued_at_compare.append(len(log.reads)) or real(*x))
    report = Comparison(a, b, options=CompareOptions(read_budget=budget, stored_bytes=False, rtol=1e-5)).run()
    assert report.passed and report.results[0].stats.n_total == 64 * 64
    assert len(issued_at_compare) == 4  # four blocks of one chunk
    assert issued_at_compare == [4, 6, 8, 8]  # the next block's two reads are out before each compare


def test_merged_figures_do_not_depend_on_the_order_blocks_come_in():
    """Two blocks with an equal headroom, an equal worst difference and mismatches of their
    own: merged either way, the ties go to the earliest index and the first indices are the
    earliest ones (a read plan, in step, in slabs or in blocks, picks the order)."""
    def part(index, first):
        acc = kernel_mod._Accumulator()
        acc.n_total, acc.n_mismatch = 10, len(first)
        acc.headroom, acc.headroom_index = 2.0, index
        acc.max_abs, acc.worst = 1.0, (1.0, index, 1.0, 0.0)
        acc.first = list(first)
        return acc

    orders = []
    for x, y in ((part((3, 1), [(3, 1), (3, 2)]), part((0, 7), [(0, 7)])), (part((0, 7), [(0, 7)]), part((3, 1), [(3, 1), (3, 2)]))):
        acc = kernel_mod._Accumulator()
        acc.merge(x)
        acc.merge(y)
        orders.append(acc.stats())
    assert orders[0] == orders[1]
    assert orders[0].headroom_index == (0, 7) and orders[0].worst_index == (0, 7)
    assert orders[0].first_indices == ((0, 7), (3, 1), (3, 2))
