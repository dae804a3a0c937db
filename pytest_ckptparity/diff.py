"""Compare two normalized views: structure, shapes, dtypes, then values. Builds no strings
beyond short notes; `report.py` turns the result into text.

Values: `|a - b| <= atol + rtol * |b|` (B is the reference), exact for integers, booleans and
strings. NaN equals NaN at the same position unless `equal_nan=False`; NaN or inf against
anything else is a mismatch. Identical arrays take a bitwise fast path first.

Memory: every leaf is read in blocks aligned to the stored chunks of both sides (so each
chunk is decoded once), of at most `read_budget / BLOCK_SHARE` bytes per side unless the
common aligned block is larger: that is read alone while it fits in the budget, else in
slabs of the block share or one chunk (some chunks are then decoded more than once).
Pieces of `PIECE_ELEMENTS` elements are compared at once. Reads of the next blocks are
issued while the current one is compared (readahead) as long as all decoded blocks held,
the compared one included, fit in `read_budget`. So memory follows the budget or the
largest chunk, never the checkpoint or the two sides' topologies.

Stored bytes: a leaf both sides store alike (dtype, chunk grid, codecs) is read as stored
chunk bytes first; equal bytes are equal values, and only chunks whose bytes differ are
decoded and compared as values.

Stored order: when both sides hold a leaf as one array (a stack with its layers on the same
axis), blocks are read and compared in that stored axis order (contiguous, no layer-first
view); per-layer figures and indices are computed in canonical (layer first) terms. A slab
that cuts stored chunks is read one chunk's part at a time, one side after the other.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from pytest_ckptparity._model import (
    DTYPE, LAYOUT, ONLY_IN_A, ONLY_IN_B, SHAPE, VALUES, LayerDrift, LeafResult, ParityReport, Tolerance, ValueStats,
)
from pytest_ckptparity._paths import glob_match, in_scope
from pytest_ckptparity.normalize import LogicalLeaf, NormalizedView

DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(atol=1e-7, rtol=1e-7),
    "float32": Tolerance(atol=1e-5, rtol=1.3e-6),
    "bfloat16": Tolerance(atol=1e-5, rtol=1.6e-2),
    "float16": Tolerance(atol=1e-5, rtol=1e-3),
}
EXACT = Tolerance(atol=0.0, rtol=0.0, exact=True)
DEFAULT_READ_BUDGET = 256 << 20  # decoded bytes held at once, both sides, compared block included
BLOCK_SHARE = 8  # a block (one side) takes at most budget / BLOCK_SHARE: several in flight
PIECE_ELEMENTS = 1 << 17  # elements compared at once: bounds every temporary
FIRST_INDICES = 5
COUNTER_NAMES = frozenset({"step", "count"})  # compared by value across integer dtypes
DTYPE_POLICIES = ("strict", "cast")


@dataclass(frozen=True)
class CompareOptions:
    atol: Optional[float] = None
    rtol: Optional[float] = None
    tolerances: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    compare_values: bool = True
    equal_nan: bool = True
    dtype_policy: str = "strict"
    read_budget: int = DEFAULT_READ_BUDGET
    stored_bytes: bool = True  # settle chunks stored alike on both sides by their stored bytes


@dataclass(frozen=True)
class Selection:
    """Part of a comparison (a generated pytest item): some paths, optionally some layers."""

    paths: tuple[str, ...]
    layer_range: Optional[tuple[int, int]] = None


# --------------------------------------------------------------------------------------
# Tolerances and dtypes
# --------------------------------------------------------------------------------------


def _kind(dtype: str) -> str:
    if dtype == "str":
        return "str"
    if dtype in DEFAULT_TOLERANCES:
        return "float"
    try:
        k = np.dtype(dtype).kind
    except TypeError:
        return "other"
    return {"f": "float", "c": "float", "i": "int", "u": "int", "b": "bool"}.get(k, "other")


def resolve_tolerance(path: str, dtype: str, opts: CompareOptions) -> Tolerance:
    """Per-path override, else explicit atol/rtol, else the dtype's default."""
    if _kind(dtype) != "float":
        return EXACT
    base = DEFAULT_TOLERANCES.get(dtype)
    if base is None:
        # By the precision of one component: complex64 holds two float32s and gets float32's
        # tolerance, complex128 float64's. Wider floats (float128) get float64's.
        np_dtype = _np_dtype(dtype)
        component = np_dtype.itemsize // 2 if np_dtype.kind == "c" else np_dtype.itemsize
        base = DEFAULT_TOLERANCES["float64" if component >= 8 else "float32"]
    atol = base.atol if opts.atol is None else float(opts.atol)
    rtol = base.rtol if opts.rtol is None else float(opts.rtol)
    for pattern, override in opts.tolerances.items():
        if glob_match(path, pattern):
            atol = float(override.get("atol", atol))
            rtol = float(override.get("rtol", rtol))
            break
    return Tolerance(atol=atol, rtol=rtol)


def _precision(dtype: str) -> int:
    import ml_dtypes  # numpy's finfo does not know bfloat16 and friends; ml_dtypes' does

    return int(ml_dtypes.finfo(_np_dtype(dtype)).nmant)


def lower_precision(d1: str, d2: str) -> str:
    return d1 if _precision(d1) <= _precision(d2) else d2


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy

    return np.dtype(name)


# --------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------


def _pieces(shape: tuple[int, ...], limit: int, per_row: bool = False) -> Iterator[tuple[slice, ...]]:
    """Slices over leading axes, each covering at most `limit` elements, in C order; with
    `per_row` none spans two indices of the first axis (a layered leaf: one layer each)."""
    if not shape:
        yield ()
        return
    inner = math.prod(shape[1:])
    if inner <= limit and not per_row:
        step = max(1, limit // max(inner, 1))
        for s in range(0, shape[0], step):
            yield (slice(s, min(s + step, shape[0])),)
    else:
        for i in range(shape[0]):
            for rest in _pieces(shape[1:], limit):
                yield (slice(i, i + 1),) + rest


def _scalar(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


class _Accumulator:
    """Merges the stats of the pieces and blocks of one leaf."""

    def __init__(self) -> None:
        self.n_total = self.n_mismatch = self.n_nonfinite = self.n_nan_pairs = 0
        self.max_abs = self.max_rel = 0.0
        self.headroom = 0.0  # max |a - b| / (atol + rtol * |b|)
        self.headroom_flat: Optional[int] = None  # a piece's own: flat index of that element in it
        self.headroom_index: Optional[tuple[int, ...]] = None
        self.worst: Optional[tuple[float, tuple[int, ...], Any, Any]] = None
        self.first: list[tuple[int, ...]] = []
        self.layers: set[int] = set()
        self.layer_drift: dict[int, list[float]] = {}  # layer -> [max_abs, max_rel, headroom]
        self.bytes_read = 0

    def merge(self, other: "_Accumulator") -> None:
        """Fold in the stats of a later piece (order matters for `first` and ties)."""
        self.n_total += other.n_total
        self.n_mismatch += other.n_mismatch
        self.n_nonfinite += other.n_nonfinite
        self.n_nan_pairs += other.n_nan_pairs
        if other.headroom > self.headroom:
            self.headroom, self.headroom_index = other.headroom, other.headroom_index
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_rel = max(self.max_rel, other.max_rel)
        if other.worst is not None and (self.worst is None or other.worst[0] > self.worst[0]):
            self.worst = other.worst
        self.first.extend(other.first[: max(0, FIRST_INDICES - len(self.first))])
        self.layers |= other.layers
        for layer, figures in other.layer_drift.items():
            mine = self.layer_drift.setdefault(layer, [0.0, 0.0, 0.0])
            mine[:] = [max(x, y) for x, y in zip(mine, figures)]

    def fold_layer(self, layer: int) -> None:
        """This accumulator covers one piece within `layer`: its figures are that layer's."""
        self.layer_drift[layer] = [self.max_abs, self.max_rel, self.headroom]

    def stats(self) -> ValueStats:
        w = self.worst
        return ValueStats(
            n_total=self.n_total, n_mismatch=self.n_mismatch, n_nonfinite=self.n_nonfinite,
            n_nan_pairs=self.n_nan_pairs, headroom=self.headroom, headroom_index=self.headroom_index,
            max_abs=self.max_abs, max_rel=self.max_rel,
            worst_index=w[1] if w else None, worst_a=w[2] if w else None, worst_b=w[3] if w else None,
            first_indices=tuple(self.first), mismatched_layers=tuple(sorted(self.layers)),
            layer_drift=tuple(LayerDrift(k, *v) for k, v in sorted(self.layer_drift.items())),
        )


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype:
        return False
    if a.dtype.itemsize in (1, 2, 4, 8) and a.dtype.kind not in "OSU":
        u = np.dtype(f"u{a.dtype.itemsize}")
        return bool(np.array_equal(a.view(u), b.view(u)))
    return bool(np.array_equal(a, b))


def compare_block(
    a: np.ndarray, b: np.ndarray, tol: Tolerance, equal_nan: bool, acc: _Accumulator,
    origin: tuple[int, ...] = (), layered: bool = False, cast: Optional[np.dtype] = None,
) -> None:
    """Compare one block (same shape) and fold the outcome into `acc`.

    With `cast`, both sides are converted to that dtype piece by piece (dtype policy `cast`,
    counters of different integer types), never as a whole block.

    `origin` is the block's offset in canonical coordinates, so indices are reported in the
    whole leaf's coordinates (layer first when `layered`). Work goes piece by piece, so no
    temporary is larger than `PIECE_ELEMENTS` elements: first a bitwise pass (identical
    pieces cost nothing more), then the arithmetic on the pieces that differ, spread over the
    CPU cores (numpy releases the GIL), merged in order so the result does not depend on it.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    origin = origin or (0,) * a.ndim
    floating = a.dtype.kind in "fc" or _kind(a.dtype.name) == "float"
    differing = []
    for piece in _pieces(a.shape, PIECE_ELEMENTS, per_row=layered and a.ndim > 0):
        pa, pb = a[piece], b[piece]
        acc.n_total += pa.size
        if not pa.size:
            continue
        # Once two pieces have differed, the block likely differs throughout (a recomputed or
        # cast model): stop paying for a bitwise pass that the arithmetic would redo anyway.
        if len(differing) >= 2 or not (_bitwise_equal(pa, pb) and (equal_nan or not floating or not _has_nan(pa))):
            differing.append(piece)
    if not differing:
        return

    if cast is not None:
        floating = cast.kind in "fc" or _kind(cast.name) == "float"

    def work(piece: tuple[slice, ...]) -> _Accumulator:
        part = _Accumulator()
        pa, pb = a[piece], b[piece]
        if cast is not None:
            pa, pb = pa.astype(cast), pb.astype(cast)
        starts = tuple(origin[i] + (piece[i].start if i < len(piece) else 0) for i in range(a.ndim))
        if tol.exact or not floating:
            bad, d, finite = _exact_piece(pa, pb, part)
        else:
            bad, d, finite = _tolerant_piece(pa, pb, tol, equal_nan, part)
        if bad.size:
            _record_mismatches(pa, pb, bad, d, finite, starts, layered, part)
            if not part.headroom > 1.0:  # NaN/inf or exact mismatches: beyond any allowance
                part.headroom, part.headroom_flat = math.inf, int(bad[0])
        if part.headroom_flat is not None:
            local = np.unravel_index(part.headroom_flat, pa.shape) if pa.ndim else ()
            part.headroom_index = tuple(int(s + l) for s, l in zip(starts, local))
        if layered and starts:
            part.fold_layer(starts[0])
        return part

    parts = map(work, differing) if len(differing) == 1 else _pool().map(work, differing)
    for part in parts:
        acc.merge(part)


class _Figures:
    """A differing run of pieces of one block, compared in stored order: the maxima, the
    headroom and where (canonical index, earliest in canonical order among ties), and per
    block layer the maxima (arrays indexed by layer - the block's first layer)."""

    __slots__ = ("max_abs", "max_rel", "headroom", "headroom_index", "layer_abs", "layer_rel", "layer_head")

    def __init__(self, n_layers: int) -> None:
        self.max_abs = self.max_rel = self.headroom = 0.0
        self.headroom_index: Optional[tuple[int, ...]] = None
        self.layer_abs = np.zeros(n_layers)
        self.layer_rel = np.zeros(n_layers)
        self.layer_head = np.zeros(n_layers)

    def take_headroom(self, value: float, index: tuple[int, ...]) -> None:
        if value > self.headroom or (value == self.headroom and value > 0 and (self.headroom_index is None or index < self.headroom_index)):
            self.headroom, self.headroom_index = value, index

    def merge(self, other: "_Figures") -> None:
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_rel = max(self.max_rel, other.max_rel)
        if other.headroom_index is not None:
            self.take_headroom(other.headroom, other.headroom_index)
        np.maximum(self.layer_abs, other.layer_abs, out=self.layer_abs)
        np.maximum(self.layer_rel, other.layer_rel, out=self.layer_rel)
        np.maximum(self.layer_head, other.layer_head, out=self.layer_head)


def _fast_eligible(dtype: np.dtype, tol: Tolerance) -> bool:
    """The stored-order path handles real floats up to float64 under a tolerance with both
    atol and rtol above 0 (so no allowance is 0 and no 0/0 ratio arises); anything else, and
    any block where an element fails or is not finite, goes through `compare_block`."""
    real_float = dtype.kind == "f" or (_kind(dtype.name) == "float" and dtype.kind != "c")
    return real_float and dtype.itemsize <= 8 and not tol.exact and tol.atol > 0 and tol.rtol > 0


def compare_stored_block(
    a: np.ndarray, b: np.ndarray, tol: Tolerance, equal_nan: bool, acc: _Accumulator,
    origin: tuple[int, ...], layer_axis: Optional[int], cast: Optional[np.dtype] = None,
) -> None:
    """Compare one block as stored (a stack keeps its layer axis where it is stored) and fold
    it into `acc` exactly as `compare_block` on the layer-first view would.

    A stacked array read as stored is C-contiguous; seen layer first it is strided, and
    numpy's loops over strided pieces cost about 60% more. So pieces here run in stored
    order, per-layer figures come from reductions over the other axes, and indices are
    mapped to canonical (layer first) coordinates. This path only proves a block within
    tolerance: when an element fails, is not finite or is not covered (integers, complex,
    a zero atol or rtol), the block is compared again by `compare_block`, so mismatch
    counts, first and worst indices and every rule for NaN and inf stay the kernel's own.
    """
    def canonical() -> None:
        move = (lambda x: np.moveaxis(x, layer_axis, 0)) if layer_axis is not None else (lambda x: x)
        compare_block(move(a), move(b), tol, equal_nan, acc, origin, layer_axis is not None, cast)

    a = np.asarray(a)
    b = np.asarray(b)
    compare_dtype = cast if cast is not None else a.dtype
    if a.ndim == 0 or not _fast_eligible(np.dtype(compare_dtype), tol) or (cast is None and a.dtype != b.dtype):
        return canonical()
    pieces = list(_pieces(a.shape, PIECE_ELEMENTS))
    differing = []
    for piece in pieces:
        pa, pb = a[piece], b[piece]
        if not pa.size:
            continue
        if len(differing) >= 2 or not _bitwise_equal(pa, pb):
            differing.append(piece)
        elif not equal_nan and _has_nan(pa):
            return canonical()  # a NaN that must not equal itself: a mismatch to report
    total = a.size
    if not differing:
        acc.n_total += total
        return
    n_layers = a.shape[layer_axis] if layer_axis is not None else 0
    work_dtype = np.float64 if np.dtype(compare_dtype).itemsize >= 8 else np.float32

    def run(group: list[tuple[slice, ...]]) -> Optional[_Figures]:
        figures = _Figures(n_layers)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            for piece in group:
                if not _fast_piece(a[piece], b[piece], piece, tol, layer_axis, origin, cast, work_dtype, figures):
                    return None
        return figures

    groups = _split(differing, _threads())
    results = map(run, groups) if len(groups) == 1 else _pool().map(run, groups)
    block = _Figures(n_layers)
    for figures in results:
        if figures is None:
            return canonical()
        block.merge(figures)
    acc.n_total += total
    acc.max_abs = max(acc.max_abs, block.max_abs)
    acc.max_rel = max(acc.max_rel, block.max_rel)
    if block.headroom_index is not None and block.headroom > acc.headroom:
        acc.headroom, acc.headroom_index = block.headroom, block.headroom_index
    if layer_axis is not None:
        first = origin[0]
        for k in range(n_layers):
            mine = acc.layer_drift.setdefault(first + k, [0.0, 0.0, 0.0])
            mine[:] = [max(mine[0], float(block.layer_abs[k])), max(mine[1], float(block.layer_rel[k])), max(mine[2], float(block.layer_head[k]))]


def _split(items: list, parts: int) -> list[list]:
    """`items` in at most `parts` runs of consecutive items, in order."""
    parts = max(1, min(parts, len(items)))
    size = -(-len(items) // parts)
    return [items[i:i + size] for i in range(0, len(items), size)]


def _fast_piece(
    pa: np.ndarray, pb: np.ndarray, piece: tuple[slice, ...], tol: Tolerance, layer_axis: Optional[int],
    origin: tuple[int, ...], cast: Optional[np.dtype], work_dtype: Any, figures: _Figures,
) -> bool:
    """One stored-order piece: fold its figures, or False when some element is not strictly
    within its allowance (or not finite): the block then goes through `compare_block`.

    The arithmetic is the kernel's, in the same dtype and order, so every figure is equal:
    d = |a - b|, allowance = rtol * |b| + atol, headroom = d / allowance, rel = d / |b|.
    """
    shape, n = pa.shape, pa.size
    if cast is not None:
        pa, pb = pa.astype(cast), pb.astype(cast)
    x = pa if pa.dtype == work_dtype else _into(0, pa, work_dtype)
    y = pb if pb.dtype == work_dtype else _into(1, pb, work_dtype)
    d = np.subtract(x, y, out=_scratch_at(2, n, work_dtype).reshape(shape))
    np.abs(d, out=d)
    ay = np.abs(y, out=_scratch_at(3, n, work_dtype).reshape(shape))
    ratio = np.multiply(ay, tol.rtol, out=_scratch_at(4, n, work_dtype).reshape(shape))
    ratio += tol.atol
    np.divide(d, ratio, out=ratio)
    if layer_axis is None:
        head = ratio.max()
        if not head < 1.0:  # NaN, inf, a failure or exactly at the allowance: the kernel decides
            return False
        figures.max_abs = max(figures.max_abs, float(d.max()))
        rel = np.fmax.reduce(np.divide(d, ay, out=ay), axis=None)
    else:
        others = tuple(i for i in range(len(shape)) if i != layer_axis)
        per_head = np.maximum.reduce(ratio, axis=others)  # NaN propagates: the check below fails
        head = per_head.max()
        if not head < 1.0:
            return False
        per_abs = np.maximum.reduce(d, axis=others)
        per_rel = np.fmax.reduce(np.divide(d, ay, out=ay), axis=others)
        lo = piece[layer_axis].start if layer_axis < len(piece) else 0
        hi = lo + shape[layer_axis]
        np.maximum(figures.layer_abs[lo:hi], per_abs, out=figures.layer_abs[lo:hi])
        np.fmax(figures.layer_rel[lo:hi], per_rel, out=figures.layer_rel[lo:hi])  # 0/0 (NaN) ignored
        np.maximum(figures.layer_head[lo:hi], per_head, out=figures.layer_head[lo:hi])
        figures.max_abs = max(figures.max_abs, float(per_abs.max()))
        rel = np.fmax.reduce(per_rel, axis=None)
    if not math.isnan(rel):
        figures.max_rel = max(figures.max_rel, float(rel))
    head = float(head)
    if head > 0 and head >= figures.headroom:
        figures.take_headroom(head, _earliest(np.flatnonzero(ratio.reshape(-1) == head), shape, piece, origin, layer_axis))
    return True


def _earliest(flat: np.ndarray, shape: tuple[int, ...], piece: tuple[slice, ...], origin: tuple[int, ...], layer_axis: Optional[int]) -> tuple[int, ...]:
    """Of stored-order flat indices in a piece, the one first in canonical (layer first) C
    order, as a canonical index in the whole leaf."""
    coords = list(np.unravel_index(flat, shape))
    for i, s in enumerate(piece):
        coords[i] = coords[i] + s.start
    if layer_axis is not None:
        coords.insert(0, coords.pop(layer_axis))
    j = int(np.lexsort(coords[::-1])[0]) if len(flat) > 1 else 0
    return tuple(int(o + c[j]) for o, c in zip(origin, coords))


def _into(slot: int, x: np.ndarray, dtype: Any) -> np.ndarray:
    """`x.astype(dtype)` into a per-thread buffer instead of a fresh array."""
    out = _scratch_at(slot, x.size, dtype).reshape(x.shape)
    np.copyto(out, x, casting="unsafe")
    return out


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_executor: Any = None


def _pool() -> Any:
    global _executor
    if _executor is None:
        from concurrent.futures import ThreadPoolExecutor

        _executor = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="ckptparity-compare")
    return _executor


def _has_nan(x: np.ndarray) -> bool:
    return bool(np.isnan(x if x.dtype.kind == "c" else x.astype(np.float32)).any())


def _exact_piece(pa: np.ndarray, pb: np.ndarray, acc: _Accumulator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integers, booleans: flat indices of the differing elements and their |a - b|."""
    bad = np.flatnonzero(pa != pb)
    xs, ys = pa.reshape(-1)[bad].astype(np.float64), pb.reshape(-1)[bad].astype(np.float64)
    d = np.abs(xs - ys)
    if bad.size:
        with np.errstate(divide="ignore"):
            acc.max_abs = max(acc.max_abs, float(d.max()))
            acc.max_rel = max(acc.max_rel, float((d / np.abs(ys)).max()))
    return bad, d, np.ones(bad.size, bool)


def _tolerant_piece(pa: np.ndarray, pb: np.ndarray, tol: Tolerance, equal_nan: bool, acc: _Accumulator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Floats: `|a - b| <= atol + rtol * |b|` for finite pairs; NaN and inf compared as values.

    Arithmetic is in float32 for float32 and narrower inputs (exact for bfloat16/float16, and
    float32's own rounding is far below any tolerance), float64 or complex128 otherwise.
    Strided pieces (a stacked array seen layer first) are used in place, never copied. When
    every difference is within `atol` (the usual near-parity case), the tolerance test is
    done: no NaN or inf can hide there. Otherwise the full test runs, and the NaN/inf rules
    only on the elements that failed it. Returns flat indices (C order of the piece) of the
    mismatches, their |a - b| and whether each pair is finite.
    """
    work = np.complex128 if pa.dtype.kind == "c" else np.float64 if pa.dtype.itemsize >= 8 else np.float32
    x = pa if pa.dtype == work else pa.astype(work)
    y = pb if pb.dtype == work else pb.astype(work)
    if x.ndim == 0:  # ufuncs give scalars for 0-d inputs; the in-place steps need arrays
        x, y = x.reshape(1), y.reshape(1)
    nothing = (np.empty(0, np.intp), np.empty(0), np.empty(0, bool))  # no mismatch in the piece
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d = np.subtract(x, y)
        d = np.abs(d, out=d) if d.dtype.kind == "f" else np.abs(d)  # real for complex; NaN for NaN or inf - inf pairs
        ay = np.abs(y)
        max_abs = d.max()  # NaN if any pair holds a NaN
        if max_abs <= tol.atol:  # all finite and within: only the stats remain
            acc.max_abs = max(acc.max_abs, float(max_abs))
            if max_abs > 0:
                _fold_headroom_within_atol(acc, d, ay, tol)
            _fold_max_rel(acc, np.fmax.reduce(np.divide(d, ay, out=ay), axis=None))
            return nothing
        limit = np.multiply(ay, tol.rtol, out=np.empty_like(ay, dtype=d.dtype))
        limit += tol.atol
        fails = np.less_equal(d, limit)
        np.logical_not(fails, out=fails)  # NaN compares False: NaN pairs and inf - inf land here
        if np.fmax.reduce(ay, axis=None) == np.inf:  # anything but the same inf against an inf B
            fails |= ay == np.inf                     # is within rtol * inf, yet different
        max_abs = np.fmax.reduce(d, axis=None)  # ignores NaN
        if not math.isfinite(max_abs):  # an inf pair: stats cover finite pairs only
            d = np.where(np.isfinite(x) & np.isfinite(y), d, 0)
            max_abs = d.max()
        acc.max_abs = max(acc.max_abs, float(max_abs))
        _fold_headroom(acc, np.divide(d, limit, out=limit))
        _fold_max_rel(acc, np.fmax.reduce(np.divide(d, ay, out=limit), axis=None))
    bad = np.flatnonzero(fails)
    if not bad.size:
        return nothing
    xf, yf, df = x.reshape(-1), y.reshape(-1), d.reshape(-1)  # copies only if strided, and only here
    xs, ys = xf[bad], yf[bad]
    ok = xs == ys  # inf == inf
    if equal_nan:
        ok |= np.isnan(xs) & np.isnan(ys)
    bad = bad[~ok]
    xs, ys = xf[bad], yf[bad]
    finite = np.isfinite(xs) & np.isfinite(ys)
    odd = ~finite
    if not equal_nan:  # NaN against NaN is a mismatch of its own kind, not "a different value"
        nan_pairs = np.isnan(xs) & np.isnan(ys)
        acc.n_nan_pairs += int(np.count_nonzero(nan_pairs))
        odd &= ~nan_pairs
    acc.n_nonfinite += int(np.count_nonzero(odd))
    return bad, df[bad], finite


def _fold_headroom(acc: _Accumulator, ratio: np.ndarray) -> None:
    """Keep the largest of `ratio` (|a - b| / allowance per element; NaN ignored) and where."""
    flat = ratio.reshape(-1)
    j = int(np.argmax(flat))  # the first NaN if there is one
    if math.isnan(flat[j]):
        j = int(np.argmax(np.where(np.isnan(flat), -1.0, flat)))
    value = float(flat[j])
    if value > acc.headroom:
        acc.headroom, acc.headroom_flat = value, j


def _fold_headroom_within_atol(acc: _Accumulator, d: np.ndarray, ay: np.ndarray, tol: Tolerance) -> None:
    """Headroom when every |a - b| is within atol (> 0): no NaN or inf can be there, and the
    piece is cache-resident, so three in-place passes over it. Without rtol the largest
    |a - b| is the answer."""
    df = d.reshape(-1)
    if not tol.rtol:
        j = int(np.argmax(df))
        best = float(df[j]) / tol.atol
    else:
        ratio = np.multiply(ay.reshape(-1), tol.rtol, out=_scratch(df.size, df.dtype))
        ratio += tol.atol
        np.divide(df, ratio, out=ratio)
        j = int(np.argmax(ratio))
        best = float(ratio[j])
    if best > acc.headroom:
        acc.headroom, acc.headroom_flat = best, j


_local = threading.local()


def _scratch(n: int, dtype: np.dtype) -> np.ndarray:
    """A per-thread buffer of `n` elements, reused across pieces: a fresh 512 KiB array per
    piece would be a fresh mapping (and its page faults) every time."""
    return _scratch_at(-1, n, dtype)


def _scratch_at(slot: int, n: int, dtype: Any) -> np.ndarray:
    """Per-thread buffer number `slot` (several are used at once) of `n` elements."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (slot, np.dtype(dtype))
    buf = buffers.get(key)
    if buf is None or buf.size < n:
        buf = buffers[key] = np.empty(max(n, PIECE_ELEMENTS), dtype)
    return buf[:n]


def _fold_max_rel(acc: _Accumulator, max_rel: Any) -> None:
    """0/0 gives NaN and is ignored; d/0 is inf."""
    if not math.isnan(max_rel):
        acc.max_rel = max(acc.max_rel, float(max_rel))


def _record_mismatches(
    pa: np.ndarray, pb: np.ndarray, bad: np.ndarray, d: np.ndarray, finite: np.ndarray,
    starts: tuple[int, ...], layered: bool, acc: _Accumulator,
) -> None:
    """Count the piece's mismatches (flat indices `bad`) and keep the worst and the first."""
    acc.n_mismatch += int(bad.size)
    # The worst is the finite mismatch with the largest |a - b|, wherever it is; only when
    # there is none does the first NaN/inf mismatch stand for the leaf (score -inf never wins).
    if finite.any():
        j = int(np.argmax(np.where(finite, d, -1.0)))
        score = float(d[j])
    else:
        j, score = 0, -math.inf
    if acc.worst is None or score > acc.worst[0]:
        local = np.unravel_index(int(bad[j]), pa.shape)
        acc.worst = (score, tuple(int(s + l) for s, l in zip(starts, local)), _scalar(pa[local]), _scalar(pb[local]))
    for f in bad[: max(0, FIRST_INDICES - len(acc.first))]:
        local = np.unravel_index(int(f), pa.shape)
        acc.first.append(tuple(int(s + l) for s, l in zip(starts, local)))
    if layered:
        rows = np.unravel_index(bad, pa.shape)[0]
        acc.layers.update(int(starts[0] + r) for r in np.unique(rows))


# --------------------------------------------------------------------------------------
# Planning: which leaves, which blocks
# --------------------------------------------------------------------------------------


@dataclass
class _Job:
    path: str
    la: LogicalLeaf
    lb: LogicalLeaf
    tol: Tolerance
    cast_to: Optional[str]
    layer_range: Optional[tuple[int, int]]
    notes: tuple[str, ...]
    blocks: list[tuple[slice, ...]]
    acc: _Accumulator = field(default_factory=_Accumulator)
    stored: Optional["_StoredPair"] = None  # both sides store the leaf alike: bytes first
    as_stored: bool = False  # both sides one array, layers (if any) on the same stored axis: read as stored


def _read_as_stored(la: LogicalLeaf, lb: LogicalLeaf) -> bool:
    """Whether both sides can be read in their stored axis order and compared so: each is one
    array (plain, or a stack) and stacks keep their layers on the same axis."""
    sa, sb = la.storage, lb.storage
    return bool(sa.raw and sb.raw and not sa.per_layer and not sb.per_layer and sa.axis == sb.axis
                and (la.layers is None) == (lb.layers is None) and (la.layers is None or sa.axis is not None))


def _stored_block(leaf: LogicalLeaf, block: tuple[slice, ...]) -> tuple[slice, ...]:
    """A canonical block (layer first) as an index into the stored array."""
    axis = leaf.storage.axis
    if leaf.layers is None or axis is None or not block:
        return block
    rest = block[1:]
    return rest[:axis] + (block[0],) + rest[axis:]


def _start_reads(va: NormalizedView, vb: NormalizedView, job: _Job, block: tuple[slice, ...]) -> tuple[Any, Any]:
    """Start reading a block on both sides: as stored when `job.as_stored` (no layer-first
    view), else through the views (canonical order, a list for per-layer arrays). A slab
    that cuts stored chunks is read one chunk's part at a time (see `_read_in_parts`)."""
    if job.as_stored:
        if _cuts_chunks(job, block):
            a = _read_in_parts(va, job.la, block)
            return a, _read_in_parts(vb, job.lb, block, after=a)
        return (va.checkpoint.read(job.la.storage.raw, _stored_block(job.la, block)),
                vb.checkpoint.read(job.lb.storage.raw, _stored_block(job.lb, block)))
    return va.read(job.la, block), vb.read(job.lb, block)


def _chunk_extents(leaf: LogicalLeaf, ndim: int) -> Optional[tuple[int, ...]]:
    c = leaf.chunk_shape
    if c is None or len(c) != ndim:
        return None
    return tuple(max(1, min(ci, d)) for ci, d in zip(c, leaf.shape))


def _cuts_chunks(job: _Job, block: tuple[slice, ...]) -> bool:
    """Whether the block cuts a stored chunk of either side (a slab: see `_plan_blocks`)."""
    for leaf in (job.la, job.lb):
        grid = _chunk_extents(leaf, len(block))
        if grid is None:
            continue
        for s, c, d in zip(block, grid, leaf.shape):
            if s.start % c or (s.stop % c and s.stop != d):
                return True
    return False


def _chunk_parts(block: tuple[slice, ...], grid: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """The block cut along the stored chunk edges: each part lies in one chunk, in C order."""
    ranges = []
    for s, c in zip(block, grid):
        edges = [s.start] + list(range((s.start // c + 1) * c, s.stop, c)) + [s.stop]
        ranges.append([slice(lo, hi) for lo, hi in zip(edges, edges[1:])])
    return [tuple(p) for p in itertools.product(*ranges)]


def _read_in_parts(view: NormalizedView, leaf: LogicalLeaf, block: tuple[slice, ...], after: Any = None) -> Any:
    """Read a slab of one stored array one chunk's part at a time, into one array as stored.

    tensorstore decodes every chunk a read touches whole, all at once: a slab that cuts four
    chunks of a side would hold those four decoded (and their stored bytes) together. Here
    the next part's read starts only once the previous one is done, so a side holds one
    decoded chunk at a time besides the slab; the chunks decoded are the same. With `after`
    (the other side's slab), this side starts only once that one is read, so the two sides'
    chunks are not decoded at the same time either.
    """
    grid = _chunk_extents(leaf, len(block))
    parts = _chunk_parts(block, grid) if grid is not None else [block]
    raw = leaf.storage.raw
    shape = tuple(s.stop - s.start for s in _stored_block(leaf, block))
    first = view.checkpoint.read(raw, _stored_block(leaf, parts[0])) if after is None else None

    def get() -> Any:
        if after is not None:
            after.result()
        pending = first or view.checkpoint.read(raw, _stored_block(leaf, parts[0]))
        out = None
        for k, part in enumerate(parts):
            data = pending.result()
            if len(parts) == 1:
                return data
            if k + 1 < len(parts):
                pending = view.checkpoint.read(raw, _stored_block(leaf, parts[k + 1]))
            if out is None:
                out = np.empty(shape, data.dtype)
            relative = tuple(slice(p.start - b.start, p.stop - b.start) for p, b in zip(part, block))
            out[_stored_block(leaf, relative)] = data
            del data
        return out

    return _Once(get, math.prod(shape) * _itemsize(leaf.dtype))


class _Once:
    """A pending read computed once and kept: the other side's chained read and the
    comparison both ask for it."""

    __slots__ = ("_get", "_value", "nbytes")

    def __init__(self, get: Any, nbytes: int) -> None:
        self._get, self._value, self.nbytes = get, None, nbytes

    def result(self) -> Any:
        if self._value is None:
            self._value = self._get()
        return self._value


def chunk_alignment(la: LogicalLeaf, lb: LogicalLeaf) -> tuple[int, ...]:
    """Per canonical axis, the smallest extent made of whole stored chunks on both sides.

    A block on this grid decodes each stored chunk once; a block that cut a chunk would make
    the next block decode it again. A leaf without chunks (in memory) aligns to anything.
    """
    unit = []
    for i, d in enumerate(la.shape):
        u = 1
        for leaf in (la, lb):
            c = leaf.chunk_shape
            if c is not None and i < len(c) and c[i] > 0:
                u = math.lcm(u, min(c[i], d))
        unit.append(max(1, min(u, d)))
    return tuple(unit)


def _blocks(extent: Sequence[slice], unit: Sequence[int], itemsize: int, budget: int) -> list[tuple[slice, ...]]:
    """Chunk-aligned blocks covering `extent` in C order, each at most `budget` bytes unless
    one aligned unit (a stored chunk) is larger: memory is bounded by the budget or one chunk."""
    sizes = [s.stop - s.start for s in extent]
    if not sizes or 0 in sizes:
        return [tuple(extent)]
    limit = max(1, budget // max(itemsize, 1))  # elements per block
    block = [min(u, n) for u, n in zip(unit, sizes)]
    for i in reversed(range(len(sizes))):  # grow trailing axes first: blocks stay contiguous
        others = math.prod(block) // block[i]
        if others * sizes[i] <= limit:
            block[i] = sizes[i]
            continue
        block[i] = max(block[i], (limit // others) // unit[i] * unit[i])
        break
    return _grid(extent, block)


def _grid(extent: Sequence[slice], block: Sequence[int]) -> list[tuple[slice, ...]]:
    """Blocks of shape `block` covering `extent` in C order, their edges on the absolute grid
    (multiples of `block`), so blocks made of whole chunks start on chunk edges."""
    ranges = []
    for s, b in zip(extent, block):
        if b >= s.stop - s.start:
            ranges.append([s])
            continue
        first = s.start - s.start % b
        ranges.append([slice(max(x, s.start), min(x + b, s.stop)) for x in range(first, s.stop, b)])
    return [tuple(c) for c in itertools.product(*ranges)]


def _chunk_grids(la: LogicalLeaf, lb: LogicalLeaf) -> list[tuple[int, ...]]:
    """Each stored side's chunk extents in canonical coordinates (sides in memory have none)."""
    grids = []
    for leaf in (la, lb):
        c = leaf.chunk_shape
        if c is not None and len(c) == len(la.shape):
            grids.append(tuple(max(1, min(ci, d)) for ci, d in zip(c, la.shape)))
    return grids


def _overlaps(extent: slice, block: int, chunk: int) -> int:
    """How many (block, stored chunk) pairs overlap along one axis: each is one decode."""
    starts = np.arange(extent.start - extent.start % block, extent.stop, block)
    lo, hi = np.maximum(starts, extent.start), np.minimum(starts + block, extent.stop)
    return int(((hi - 1) // chunk - lo // chunk + 1).sum())


def _decodes(extent: Sequence[slice], block: Sequence[int], grids: Sequence[tuple[int, ...]]) -> int:
    """Chunk decodes needed to read `extent` in blocks of shape `block`, both sides."""
    return sum(math.prod(_overlaps(s, b, c) for s, b, c in zip(extent, block, grid)) for grid in grids)


def _slab_shape(extent: Sequence[slice], unit: Sequence[int], grids: Sequence[tuple[int, ...]], limit: int) -> tuple[int, ...]:
    """The block shape of at most `limit` elements that decodes the fewest stored chunks.

    Used when the two sides' common aligned block (`unit`) is too large to hold: greedily
    shrinks one axis at a time to a chunk extent of either side or a fraction of the unit,
    taking the step that adds the fewest decodes (a chunk cut by a block is decoded once per
    block that needs it).
    """
    sizes = [s.stop - s.start for s in extent]
    block = [min(u, n) for u, n in zip(unit, sizes)]
    while math.prod(block) > limit:
        moves = []  # ((still too large, decodes, -size), axis, extent): the first one wins
        for i, b in enumerate(block):
            options = {g[i] for g in grids} | {-(-b // k) for k in range(2, min(b, 16) + 1)} | {1}
            for e in options:
                if 0 < e < b:
                    trial = block[:i] + [e] + block[i + 1:]
                    size = math.prod(trial)
                    moves.append(((size > limit, _decodes(extent, trial, grids), -size), i, e))
        if not moves:
            break
        _, axis, e = min(moves)
        block[axis] = e
    return tuple(block)


def _plan_blocks(extent: Sequence[slice], la: LogicalLeaf, lb: LogicalLeaf, itemsize: int, read_budget: int) -> tuple[list[tuple[slice, ...]], int, int]:
    """Blocks to read a leaf in, the chunk decodes they cost (both sides) and the chunks stored.

    Blocks are made of whole chunks of both sides (each chunk decoded once) and take at most
    `read_budget / BLOCK_SHARE` bytes per side, so several are in flight. A common aligned
    block that is larger is still read whole, alone, while both sides' share fits in the
    budget. Beyond that (two chunk grids whose common block is most of an array: another
    mesh, shards on other axes) memory wins: the leaf is read in slabs of at most the block
    share (or one stored chunk, whichever is larger), decoding some chunks more than once.
    """
    unit = tuple(min(u, s.stop - s.start) or 1 for u, s in zip(chunk_alignment(la, lb), extent))
    block_budget = max(1, read_budget // BLOCK_SHARE)
    size = max(itemsize, 1)
    grids = _chunk_grids(la, lb)
    stored = sum(math.prod(_overlaps(s, c, c) for s, c in zip(extent, g)) for g in grids)
    if math.prod(unit) * size * 2 <= read_budget or math.prod(unit) * size <= block_budget:
        return _blocks(extent, unit, itemsize, block_budget), stored, stored
    largest_chunk = max((math.prod(g) for g in grids), default=1)
    slab = _slab_shape(extent, unit, grids, max(block_budget // size, largest_chunk, 1))
    return _grid(extent, slab), _decodes(extent, slab, grids), stored


def _counter(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in COUNTER_NAMES


def _layout_differs(la: LogicalLeaf, lb: LogicalLeaf) -> bool:
    """A layer stack never matches a plain array, and stacks read on different axes never
    match each other: equal canonical shapes there would be luck, not parity."""
    if (la.layers is None) != (lb.layers is None):
        return True
    if la.layers is None or la.layers == lb.layers:
        return False
    # Same elements, another layer count: one side's stored shape is the other's with the
    # layer axis moved, i.e. the two sides stack on different axes.
    return sorted(la.shape) == sorted(lb.shape)


def _stored_shape(leaf: LogicalLeaf) -> Optional[tuple[int, ...]]:
    """The shape as stored, for a plain or stacked leaf (None for one array per layer)."""
    if leaf.layers is None:
        return leaf.shape
    if leaf.storage.axis is None:
        return None
    rest = list(leaf.shape[1:])
    rest.insert(leaf.storage.axis, leaf.layers)
    return tuple(rest)


def _axis_hint(la: LogicalLeaf, lb: LogicalLeaf) -> str:
    """Which per-side scan axes would make the two stored arrays the same layer stack.

    Both readings are often possible ((16, 2, 32) on axis 1 is (2, 16, 32) on axis 0); a
    side whose stack disagrees with itself on the layer count is the one read wrongly.
    """
    options = []
    for this, other, pos in ((la, lb, 0), (lb, la, 1)):
        shape = _stored_shape(this)
        if shape is None or other.layers is None:
            continue
        for k, n in enumerate(shape):
            if k != this.storage.axis and n == other.layers and (n,) + shape[:k] + shape[k + 1:] == other.shape:
                axes = [None, None]
                axes[pos], axes[1 - pos] = k, other.storage.axis
                if None not in axes:
                    options.append((not this.stack_agrees, f"scan_axis=({axes[0]}, {axes[1]}) if {'AB'[pos]} stacks its layers on axis {k}"))
    if any(odd for odd, _ in options):
        options = [o for o in options if o[0]]
    return "pass " + ", or ".join(text for _, text in options) if options else ""


def _structural(
    path: str, la: Optional[LogicalLeaf], lb: Optional[LogicalLeaf], opts: CompareOptions, names: tuple[str, str] = ("A", "B"),
) -> tuple[Optional[LeafResult], Optional[str], tuple[str, ...]]:
    """A finished result when structure alone decides, else (None, cast dtype, notes)."""
    if la is None or lb is None:
        leaf = la or lb
        return LeafResult(path, ONLY_IN_A if lb is None else ONLY_IN_B,
                          shape_a=la.shape if la else None, shape_b=lb.shape if lb else None,
                          dtype_a=la.dtype if la else None, dtype_b=lb.dtype if lb else None,
                          layers=leaf.layers), None, ()
    base = dict(shape_a=la.shape, shape_b=lb.shape, dtype_a=la.dtype, dtype_b=lb.dtype, layers=la.layers if la.layers == lb.layers else None)
    notes: list[str] = []
    if la.note or lb.note:
        notes.append(la.note or lb.note)
    for leaf, name in ((la, names[0]), (lb, names[1])):
        if not leaf.stack_agrees:
            notes.append(f"the leaves of {name}'s stack {leaf.stack} disagree on their layer count: its layers may be read on the wrong axis (see scan_axis)")
    if _layout_differs(la, lb):
        na, nb = names
        notes += [f"{na} stores {la.stored}", f"{nb} stores {lb.stored}"]
        notes.append(_axis_hint(la, lb) or "pass scan_axis=(axis of A, axis of B) or rename= if both hold the same layers")
        return LeafResult(path, LAYOUT, notes=tuple(notes), **base), None, ()
    if la.shape != lb.shape:
        if la.layers is not None and lb.layers is not None and la.layers != lb.layers:
            notes.append(f"layer count {la.layers} vs {lb.layers}")
        return LeafResult(path, SHAPE, notes=tuple(notes), **base), None, ()
    cast_to = None
    if la.dtype != lb.dtype:
        ka, kb = _kind(la.dtype), _kind(lb.dtype)
        if _counter(path) and ka in ("int", "bool") and kb in ("int", "bool"):
            notes.append(f"{la.dtype} vs {lb.dtype} compared by value")
            cast_to = "int64"
        elif opts.dtype_policy == "cast" and ka == kb == "float":
            cast_to = lower_precision(la.dtype, lb.dtype)
            notes.append(f"{la.dtype} vs {lb.dtype}, compared as {cast_to}")
        else:
            return LeafResult(path, DTYPE, notes=tuple(notes), **base), None, ()
    return None, cast_to, tuple(notes)


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------


PARAMS_GROUP = "params"


def groups_left_out(va: NormalizedView, vb: NormalizedView, opts: CompareOptions) -> tuple[tuple[str, ...], str]:
    """Groups compared on neither side, and a header sentence saying so.

    When one side holds parameters only (a decode or exported checkpoint) and the other a
    training state, the comparison is of the parameters: the optimizer state and step of the
    other side are left out rather than reported as dozens of "only in" rows. An explicit
    `include` is the user's own scope and wins.
    """
    if opts.include:
        return (), ""
    ga = {l.group for l in va.leaves.values()}
    gb = {l.group for l in vb.leaves.values()}
    for full, only, name, other in ((ga, gb, vb.name, va.name), (gb, ga, va.name, vb.name)):
        if only == {PARAMS_GROUP} and PARAMS_GROUP in full and len(full) > 1:
            extra = tuple(sorted(full - only))
            listed = " and ".join(", ".join(extra).rsplit(", ", 1))
            return extra, f"{name} holds parameters only: {listed} of {other} left out."
    return (), ""


def scoped_paths(va: NormalizedView, vb: NormalizedView, opts: CompareOptions) -> tuple[list[str], int]:
    """Canonical paths to compare (sorted) and how many were left out."""
    ignored = set(va.ignored) | set(vb.ignored)  # ignored on either side: compared on neither
    union = sorted((set(va.leaves) | set(vb.leaves)) - ignored)
    skipped_groups = set(groups_left_out(va, vb, opts)[0])
    kept = [p for p in union if in_scope(p, opts.include, opts.exclude) and p.split("/", 1)[0] not in skipped_groups]
    left_out = len(union) - len(kept) + len(ignored)
    return kept, left_out


def _header_notes(va: NormalizedView, vb: NormalizedView, opts: CompareOptions, results: Sequence[LeafResult]) -> list[str]:
    """Sentences a reader needs before the rows: scope decisions and layouts not understood."""
    notes = [*va.notes, *vb.notes]
    scope = groups_left_out(va, vb, opts)[1]
    if scope:
        notes.append(scope)
    one_sided = sum(r.kind in (ONLY_IN_A, ONLY_IN_B) for r in results)
    generic = not (va.layout.canonical and vb.layout.canonical)
    if generic and results and one_sided * 2 > len(results):
        notes.append(
            f"{one_sided} of {len(results)} leaves are on one side only: the two layouts probably differ "
            f"({va.name}: {va.layout.name}, {vb.name}: {vb.layout.name}); check the layouts above, or map paths with rename=."
        )
    return notes


def diff_views(
    va: NormalizedView, vb: NormalizedView, opts: CompareOptions = CompareOptions(),
    selection: Optional[Iterable[Selection]] = None,
) -> ParityReport:
    """Compare two views (or only `selection` of them) and return every leaf's result."""
    t0 = time.perf_counter()
    paths, ignored = scoped_paths(va, vb, opts)
    wanted: list[tuple[str, Optional[tuple[int, int]]]]
    if selection is None:
        wanted = [(p, None) for p in paths]
    else:
        wanted = [(p, sel.layer_range) for sel in selection for p in sel.paths]

    results: dict[int, LeafResult] = {}
    jobs: list[tuple[int, _Job]] = []
    for pos, (path, layer_range) in enumerate(wanted):
        la, lb = va.leaves.get(path), vb.leaves.get(path)
        done, cast_to, notes = _structural(path, la, lb, opts, (va.name, vb.name))
        if done is not None:
            results[pos] = replace(done, layer_range=layer_range) if done.layers is not None else done
            continue
        if not opts.compare_values:
            results[pos] = LeafResult(path, None, shape_a=la.shape, shape_b=lb.shape, dtype_a=la.dtype, dtype_b=lb.dtype, layers=la.layers, layer_range=layer_range, notes=notes)
            continue
        compare_dtype = cast_to or la.dtype
        tol = resolve_tolerance(path, compare_dtype, opts)
        if la.layers is None:
            layer_range = None
        extent = [slice(0, d) for d in la.shape]
        if layer_range is not None:
            extent[0] = slice(*layer_range)
        itemsize = max(_itemsize(la.dtype), _itemsize(lb.dtype))
        blocks, _, _ = _plan_blocks(extent, la, lb, itemsize, opts.read_budget)
        job = _Job(path, la, lb, tol, cast_to, layer_range, notes, blocks)
        job.stored = _stored_pair(va, vb, job, opts)
        job.as_stored = _read_as_stored(la, lb)
        jobs.append((pos, job))

    for pos, result in _run_jobs(va, vb, jobs, opts):
        results[pos] = result

    report = ParityReport(
        names=(va.name, vb.name), layouts=(va.describe(), vb.describe()),
        results=[results[i] for i in sorted(results)], ignored=ignored if selection is None else 0,
        values_compared=opts.compare_values,
    )
    report.notes = _header_notes(va, vb, opts, report.results)
    report.wall_time = time.perf_counter() - t0
    return report


def _itemsize(dtype: str) -> int:
    if dtype == "str":
        return 1
    return _np_dtype(dtype).itemsize


def _run_jobs(va: NormalizedView, vb: NormalizedView, jobs: list[tuple[int, _Job]], opts: CompareOptions) -> Iterator[tuple[int, LeafResult]]:
    """Read blocks ahead while earlier ones are compared, holding at most `read_budget`
    decoded bytes (the block being compared included); a block larger than the budget (one
    big stored chunk) is read alone.

    A leaf both sides store alike (`job.stored`) is read as stored chunk bytes first: equal
    bytes are equal values, and only the chunks whose bytes differ are decoded. When that
    finds differences, the rest of the leaf is read as values (a recomputed model differs
    everywhere, and reading both forms would cost more than decoding); after a few such
    leaves in a row, later leaves skip the stored bytes too.
    """
    work = [(pos, job, i, _block_bytes(job, job.blocks[i])) for pos, job in jobs for i in range(len(job.blocks))]
    inflight: deque = deque()
    held = 0
    nxt = 0
    misses = 0  # leaves in a row whose stored bytes differed: the model was recomputed
    while nxt < len(work) or inflight:
        while nxt < len(work) and (not inflight or held + work[nxt][3] <= opts.read_budget):
            pos, job, i, cost = work[nxt]
            block = job.blocks[i]
            if job.stored is not None and misses >= STORED_MISSES_BEFORE_VALUES and i == 0:
                job.stored = None
            if job.stored is not None:
                reads: Any = job.stored.start(va, vb, block)
            else:
                reads = _start_reads(va, vb, job, block)
            inflight.append((pos, job, i, cost, reads))
            held += cost
            nxt += 1
        pos, job, i, cost, reads = inflight.popleft()
        if isinstance(reads, tuple):
            pa, pb = reads
            a, b = pa.result(), pb.result()
            job.acc.bytes_read += pa.nbytes + pb.nbytes
            _compare_values(job, a, b, job.blocks[i], opts)
            del a, b, pa, pb
        else:
            differed = _settle_stored(va, vb, job, reads, opts)
            if differed and job.stored is not None:
                job.stored = None  # blocks not yet issued are read as values
                misses += 1
            elif not differed:
                misses = 0
        del reads
        held -= cost
        if i == len(job.blocks) - 1:
            yield pos, _finish(job)


STORED_MISSES_BEFORE_VALUES = 3


class _StoredPair:
    """A leaf both sides store with the same dtype, chunk grid and encoding (plain arrays, or
    stacks on the same axis): its chunks can be compared as stored bytes."""

    def __init__(self, raw_a: Any, raw_b: Any, layout: Any, axis: Optional[int]) -> None:
        self.raw_a, self.raw_b, self.layout, self.axis = raw_a, raw_b, layout, axis

    def _stored_index(self, block: tuple[slice, ...]) -> tuple[slice, ...]:
        if self.axis is None:
            return block
        rest = block[1:]
        return rest[: self.axis] + (block[0],) + rest[self.axis:]

    def _canonical_index(self, stored: tuple[slice, ...]) -> tuple[slice, ...]:
        if self.axis is None:
            return stored
        return (stored[self.axis],) + stored[: self.axis] + stored[self.axis + 1:]

    def start(self, va: NormalizedView, vb: NormalizedView, block: tuple[slice, ...]) -> list[tuple[tuple[slice, ...], Any, Any]]:
        """Start reading the stored bytes of every chunk the block touches, both sides:
        (the chunk's part of the block in canonical coordinates, read of A, read of B)."""
        stored = self._stored_index(block) if block else ()
        grid = self.layout.grid
        per_axis = [range(s.start // g, -(-s.stop // g)) for s, g in zip(stored, grid)]
        out = []
        for coords in itertools.product(*per_axis):
            part = tuple(slice(max(s.start, c * g), min(s.stop, (c + 1) * g)) for s, c, g in zip(stored, coords, grid))
            out.append((self._canonical_index(part), va.checkpoint.stored_chunk(self.raw_a, coords, self.layout),
                        vb.checkpoint.stored_chunk(self.raw_b, coords, self.layout)))
        return out


def _stored_pair(va: NormalizedView, vb: NormalizedView, job: _Job, opts: CompareOptions) -> Optional[_StoredPair]:
    """Whether equal stored bytes may settle this leaf: same dtype, no cast, the same storage
    form on both sides (a plain array, or a stack on the same axis; never a family of
    per-layer arrays or a leaf in memory) and the same chunk grid and encoding. With
    `equal_nan=False` a NaN must not equal itself, which equal bytes cannot tell: floats then
    go through values."""
    la, lb = job.la, job.lb
    if not opts.stored_bytes or job.cast_to is not None or la.dtype != lb.dtype or la.shape != lb.shape:
        return None
    if not opts.equal_nan and _kind(la.dtype) == "float":
        return None
    sa, sb = la.storage, lb.storage
    if not (sa.raw and sb.raw) or sa.per_layer or sb.per_layer or sa.axis != sb.axis:
        return None
    layout_a = va.checkpoint.chunk_layout(sa.raw)
    if layout_a is None or layout_a != vb.checkpoint.chunk_layout(sb.raw):
        return None
    return _StoredPair(sa.raw, sb.raw, layout_a, sa.axis)


def _settle_stored(va: NormalizedView, vb: NormalizedView, job: _Job, reads: list, opts: CompareOptions) -> bool:
    """Compare a block's stored chunks; decode and compare values only where bytes differ
    (different bytes may still hold equal values). True when some chunk's bytes differed."""
    differing = []
    itemsizes = _itemsize(job.la.dtype) + _itemsize(job.lb.dtype)
    for part, ra, rb in reads:
        stored_a, stored_b = ra.result(), rb.result()
        n = math.prod(s.stop - s.start for s in part)
        if stored_a is not None and stored_a == stored_b:
            job.acc.n_total += n  # identical encodings of identical values: nothing to decode
            job.acc.bytes_read += n * itemsizes
        else:
            differing.append(part)
    for part in differing:
        pa, pb = _start_reads(va, vb, job, part)
        a, b = pa.result(), pb.result()
        job.acc.bytes_read += pa.nbytes + pb.nbytes
        _compare_values(job, a, b, part, opts)
    return bool(differing)


def _block_bytes(job: _Job, block: tuple[slice, ...]) -> int:
    """Memory a block's read holds at its peak: the block itself, both sides, plus every
    stored chunk it touches, decoded whole by tensorstore before the block's part is copied
    out. A slab read one chunk's part at a time (`_read_in_parts`) holds one chunk a side."""
    n = math.prod(s.stop - s.start for s in block)
    total = n * (_itemsize(job.la.dtype) + _itemsize(job.lb.dtype))
    in_parts = job.as_stored and _cuts_chunks(job, block)
    for leaf in (job.la, job.lb):
        c = leaf.chunk_shape
        if c is not None and len(c) == len(block):
            touched = 1
            for s, ci, d in zip(block, c, leaf.shape):
                ci = max(1, min(ci, d))
                touched *= ci if in_parts else min(-(-s.stop // ci) * ci, d) - s.start // ci * ci
            total += touched * _itemsize(leaf.dtype)
    return total


def _compare_values(job: _Job, a: Any, b: Any, block: tuple[slice, ...], opts: CompareOptions) -> None:
    if isinstance(a, str) or isinstance(b, str):
        job.acc.n_total += 1
        if a != b:
            job.acc.n_mismatch += 1
            job.acc.worst = (math.inf, (), a, b)
            job.acc.headroom, job.acc.headroom_index = math.inf, ()
        return
    origin = tuple(s.start for s in block)
    layered = job.la.layers is not None
    cast = None if job.cast_to is None else _np_dtype(job.cast_to)
    if isinstance(a, list) or isinstance(b, list):  # per-layer arrays on a side: never stacked
        for i in range(block[0].stop - block[0].start):
            ai, bi = np.asarray(a[i]), np.asarray(b[i])
            compare_block(ai[np.newaxis], bi[np.newaxis], job.tol, opts.equal_nan, job.acc, (origin[0] + i, *origin[1:]), layered, cast)
        return
    if job.as_stored:
        compare_stored_block(a, b, job.tol, opts.equal_nan, job.acc, origin, job.la.storage.axis if layered else None, cast)
        return
    compare_block(a, b, job.tol, opts.equal_nan, job.acc, origin, layered, cast)


def _finish(job: _Job) -> LeafResult:
    la, lb = job.la, job.lb
    if la.layers is not None:  # layers never decoded (identical pieces or stored bytes) drifted 0
        start, stop = job.layer_range or (0, la.layers)
        for layer in range(start, stop):
            job.acc.layer_drift.setdefault(layer, [0.0, 0.0, 0.0])
    stats = job.acc.stats()
    return LeafResult(
        job.path, VALUES if stats.n_mismatch else None,
        shape_a=la.shape, shape_b=lb.shape, dtype_a=la.dtype, dtype_b=lb.dtype,
        layers=la.layers, layer_range=job.layer_range, stats=stats, tolerance=job.tol,
        notes=job.notes, bytes_read=job.acc.bytes_read,
    )


__all__ = ("CompareOptions", "Selection", "DEFAULT_TOLERANCES", "resolve_tolerance", "compare_block", "diff_views", "scoped_paths")
