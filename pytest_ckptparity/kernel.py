"""The kernel: elementwise rules over pieces of two blocks, and the figures they keep.

Values: `|a - b| <= atol + rtol * |b|` (B is the reference), exact for integers, booleans and
strings. NaN equals NaN at the same position unless `equal_nan=False`; NaN or inf against
anything else is a mismatch. Identical pieces take a bitwise fast path first. Pieces of
`PIECE_ELEMENTS` elements are compared at once, spread over the CPU cores (numpy releases the
GIL) and merged in order, so every temporary is bounded and the result does not depend on
the order. Blocks in stored axis order (`compare_stored_block`) keep per-layer figures and
canonical (layer first) indices without a layer-first view.

Knows nothing of checkpoints, paths or reports: arrays in, an `_Accumulator` out.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Iterator, Optional

import numpy as np

from pytest_ckptparity import _native
from pytest_ckptparity._model import LayerDrift, Tolerance, ValueStats

DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(atol=1e-7, rtol=1e-7),
    "float32": Tolerance(atol=1e-5, rtol=1.3e-6),
    "bfloat16": Tolerance(atol=1e-5, rtol=1.6e-2),
    "float16": Tolerance(atol=1e-5, rtol=1e-3),
}
EXACT = Tolerance(atol=0.0, rtol=0.0, exact=True)
PIECE_ELEMENTS = 1 << 17  # elements compared at once: bounds every temporary
FIRST_INDICES = 5


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



def _precision(dtype: str) -> int:
    import ml_dtypes  # numpy's finfo does not know bfloat16 and friends; ml_dtypes' does

    return int(ml_dtypes.finfo(_np_dtype(dtype)).nmant)


def lower_precision(d1: str, d2: str) -> str:
    return d1 if _precision(d1) <= _precision(d2) else d2


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy

    return np.dtype(name)


def _itemsize(dtype: str) -> int:
    if dtype == "str":
        return 1
    return _np_dtype(dtype).itemsize



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
        """Fold in the stats of another piece. The result does not depend on the order pieces
        come in (a read plan's choice): ties go to the earliest canonical index, and the
        first indices are the earliest ones."""
        self.n_total += other.n_total
        self.n_mismatch += other.n_mismatch
        self.n_nonfinite += other.n_nonfinite
        self.n_nan_pairs += other.n_nan_pairs
        self.take_headroom(other.headroom, other.headroom_index)
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_rel = max(self.max_rel, other.max_rel)
        if other.worst is not None and (self.worst is None or other.worst[0] > self.worst[0]
                                        or other.worst[0] == self.worst[0] and other.worst[1] < self.worst[1]):
            self.worst = other.worst
        if other.first:
            self.first = sorted(self.first + other.first)[:FIRST_INDICES]
        self.layers |= other.layers
        for layer, figures in other.layer_drift.items():
            mine = self.layer_drift.setdefault(layer, [0.0, 0.0, 0.0])
            mine[:] = [max(x, y) for x, y in zip(mine, figures)]

    def take_headroom(self, value: float, index: Optional[tuple[int, ...]]) -> None:
        """A larger headroom, or an equal one at an earlier canonical index."""
        if index is None:
            return
        if value > self.headroom or (value == self.headroom and value > 0 and (self.headroom_index is None or index < self.headroom_index)):
            self.headroom, self.headroom_index = value, index

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
    acc.take_headroom(block.headroom, block.headroom_index)
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
    The C loop (native/compare.c) does it in one pass when the library is built and takes
    the dtypes; numpy otherwise. Both give the same figures, bit for bit.
    """
    lib = _native.library()
    if lib is not None:
        native = _native_fast_piece(lib, pa, pb, piece, tol, layer_axis, origin, cast, work_dtype, figures)
        if native is not None:
            return native
    return _numpy_fast_piece(pa, pb, piece, tol, layer_axis, origin, cast, work_dtype, figures)


def _numpy_fast_piece(
    pa: np.ndarray, pb: np.ndarray, piece: tuple[slice, ...], tol: Tolerance, layer_axis: Optional[int],
    origin: tuple[int, ...], cast: Optional[np.dtype], work_dtype: Any, figures: _Figures,
) -> bool:
    """`_fast_piece` with numpy: about eleven passes over the piece (plus a cast per side)."""
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


def _native_fast_piece(
    lib: Any, pa: np.ndarray, pb: np.ndarray, piece: tuple[slice, ...], tol: Tolerance, layer_axis: Optional[int],
    origin: tuple[int, ...], cast: Optional[np.dtype], work_dtype: Any, figures: _Figures,
) -> Optional[bool]:
    """`_fast_piece` in one C pass (native/compare.c): the same operations in the same dtype,
    so the same figures bit for bit. None when the C loop does not take these arrays (not
    contiguous, a dtype or cast it does not cover, a tolerance that is not a plain number):
    numpy then does the piece."""
    fn = getattr(lib, "ckpt_compare_piece", None)
    kinds = _native.FINGERPRINT_KINDS
    kind_a, kind_b = kinds.get(pa.dtype.name), kinds.get(pb.dtype.name)
    cast_kind = -1 if cast is None else kinds.get(cast.name)
    if (fn is None or kind_a is None or kind_b is None or cast_kind is None or not pa.dtype.isnative
            or not pb.dtype.isnative or not pa.flags.c_contiguous or not pb.flags.c_contiguous
            or (work_dtype is np.float64) != (cast_kind == 1 or (cast_kind == -1 and kind_a == 1))
            or not (_plain_number(tol.rtol) and _plain_number(tol.atol))):
        return None
    shape = pa.shape
    if layer_axis is None:
        outer, layers, inner, lo = 1, 1, pa.size, None
    else:
        outer, layers, inner = math.prod(shape[:layer_axis]), shape[layer_axis], math.prod(shape[layer_axis + 1:])
        lo = piece[layer_axis].start if layer_axis < len(piece) else 0
    out, where = _native_out()
    if lo is None:
        per_layer = (None, None, None)
    else:
        per_layer = tuple(x.ctypes.data + 8 * lo for x in (figures.layer_abs, figures.layer_rel, figures.layer_head))
    taken = fn(pa.ctypes.data, kind_a, pb.ctypes.data, kind_b, cast_kind, outer, layers, inner,
               float(tol.rtol), float(tol.atol), *per_layer, out, where)
    if taken < 0:
        return None
    if not taken:  # some element not strictly within its allowance, or not finite
        return False
    max_abs, rel, head = out
    figures.max_abs = max(figures.max_abs, max_abs)
    if not math.isnan(rel):
        figures.max_rel = max(figures.max_rel, rel)
    if head > 0 and head >= figures.headroom:
        figures.take_headroom(head, _earliest(np.array([where[0]]), shape, piece, origin, layer_axis))
    return True


def _plain_number(x: Any) -> bool:
    """A Python float (or small int): numpy 2 rounds it to the work dtype, as the C loop does.
    A numpy float64 would make numpy compute in float64 instead."""
    return type(x) is float or (type(x) is int and abs(x) < 1 << 24)


def _native_out() -> tuple[Any, Any]:
    """Per-thread result buffers of the C loop (3 doubles, 1 int64)."""
    bufs = getattr(_local, "native_out", None)
    if bufs is None:
        import ctypes

        bufs = _local.native_out = ((ctypes.c_double * 3)(), (ctypes.c_int64 * 1)())
    return bufs


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
    from pytest_ckptparity._threads import process_threads  # this process's share of the cores

    return process_threads()


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
