"""The read plan: which blocks of a leaf to read, in what order, under what byte budget,
and the driver that reads them ahead while earlier ones are compared.

Every leaf is read in blocks aligned to the stored chunks of both sides (so each chunk is
decoded once), of at most `read_budget / BLOCK_SHARE` bytes per side unless the common
aligned block is larger: that is read alone while it fits in the budget, else in slabs of
the block share or one chunk (some chunks are then decoded more than once). Reads of the
next blocks are issued while the current one is compared (readahead) as long as all decoded
blocks held, the compared one included, fit in `read_budget`. So memory follows the budget or
the largest chunk, never the checkpoint or the two sides' topologies.

Stored bytes: a leaf both sides store alike (dtype, chunk grid, codecs) is read as stored
chunk bytes first; equal bytes are equal values, and only chunks whose bytes differ are
decoded and compared as values.

Rows in step: a leaf that blocks cannot read within the budget (slabs would decode chunks
more than once, or one chunk a side alone is larger than the budget) is read row by row in
step instead when its chunks decode from the front (`read_in_step`, `zarr_rows`); anything
that goes wrong there reads the leaf again, from nothing, in blocks through tensorstore.

Stored order: when both sides hold a leaf as one array (a stack with its layers on the same
axis), blocks are read and compared in that stored axis order (contiguous, no layer-first
view); per-layer figures and indices are computed in canonical (layer first) terms. A slab
that cuts stored chunks is read one chunk's part at a time, one side after the other.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np

from pytest_ckptparity._model import VALUES, LeafResult, Tolerance
from pytest_ckptparity.kernel import (
    _Accumulator, _itemsize, _kind, _np_dtype, compare_block, compare_stored_block,
)
from pytest_ckptparity._native import in_step_turned_off
from pytest_ckptparity._threads import process_threads
from pytest_ckptparity.normalize import LogicalLeaf, NormalizedView
from pytest_ckptparity.read_in_step import InStepPlan, compare_in_step, plan_in_step

if TYPE_CHECKING:  # the options are the verdict module's; only their fields are read here
    from pytest_ckptparity.diff import CompareOptions

DEFAULT_READ_BUDGET = 256 << 20  # decoded bytes held at once, both sides, compared block included
BLOCK_SHARE = 8  # a block (one side) takes at most budget / BLOCK_SHARE: several in flight


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
    slab_depth: int = 1  # parts of a slab decoding at once, a side (`_plan_slab_depth`)
    in_step: Optional[InStepPlan] = None  # two chunk grids read row by row in step (`read_in_step`)


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
            return _read_in_parts(va, job.la, block, job.slab_depth), _SlabParts(vb, job.lb, block, job.slab_depth)
        return (va.checkpoint.read(job.la.storage.raw, _stored_block(job.la, block)),
                vb.checkpoint.read(job.lb.storage.raw, _stored_block(job.lb, block)))
    return va.read(job.la, block), vb.read(job.lb, block)


def _canonical_block(leaf: LogicalLeaf, stored: tuple[slice, ...]) -> tuple[slice, ...]:
    """A block as stored, as a canonical (layer first) block: `_stored_block` undone."""
    axis = leaf.storage.axis
    if leaf.layers is None or axis is None or not stored:
        return stored
    return (stored[axis],) + stored[:axis] + stored[axis + 1:]


def plan_leaf_in_step(va: NormalizedView, vb: NormalizedView, job: _Job, extent: Sequence[slice], read_budget: int, decodes: int, stored: int) -> Optional[InStepPlan]:
    """Whether a leaf that blocks cannot read within the budget is read row by row in step
    instead (`read_in_step`): each chunk decoded once, a few batches held. That is a leaf
    whose blocks are slabs (`decodes` > `stored`: two chunk grids whose common block does
    not fit, so slabs decode chunks more than once), or whose chunks alone are too large:
    reading one chunk a side holds more than the budget (an array written from one device
    is one chunk). It needs both sides one array as stored, chunks that decode from the
    front, and batches that fit the budget. Where blocks fit, they stay: tensorstore reads
    them with fewer copies than stored bytes handed to Python."""
    if not job.as_stored or job.stored is not None or in_step_turned_off():
        return None
    if decodes <= stored and sum(held_by_read(leaf, _one_chunk(leaf)) for leaf in (job.la, job.lb)) <= read_budget:
        return None
    formats = []
    for view, leaf in ((va, job.la), (vb, job.lb)):
        fmt = view.checkpoint.row_format(leaf.storage.raw)
        if fmt is None or leaf.chunk_shape is None or len(leaf.chunk_shape) != len(leaf.shape):
            return None
        stored_chunk = tuple(s.stop for s in _stored_block(leaf, tuple(slice(0, c) for c in leaf.chunk_shape)))
        if tuple(fmt.chunk) != stored_chunk or fmt.dtype.newbyteorder("=") != _np_dtype(leaf.dtype):
            return None
        formats.append(fmt)
    return plan_in_step(_stored_block(job.la, tuple(extent)), formats[0], formats[1], read_budget)


def _one_chunk(leaf: LogicalLeaf) -> tuple[slice, ...]:
    """A leaf's first stored chunk (its whole extent when it has no chunks), canonical."""
    grid = _chunk_extents(leaf, len(leaf.shape)) or leaf.shape
    return tuple(slice(0, min(g, d)) for g, d in zip(grid, leaf.shape))


def _read_in_step(va: NormalizedView, vb: NormalizedView, job: _Job, opts: CompareOptions) -> None:
    """Compare a leaf row by row in step (`read_in_step.compare_in_step`). A chunk that does
    not decode so (damaged, or a form not streamed) starts the leaf again from nothing,
    read through tensorstore block by block as planned, which names damaged data."""
    plan, la, lb = job.in_step, job.la, job.lb
    assert plan is not None

    def compare(a: Any, b: Any, region: tuple[slice, ...]) -> None:
        job.acc.bytes_read += a.nbytes + b.nbytes
        _compare_values(job, a, b, _canonical_block(la, region), opts)

    try:
        compare_in_step(
            plan,
            lambda coords: va.checkpoint.chunk_rows(la.storage.raw, coords, plan.fmt_a),
            lambda coords: vb.checkpoint.chunk_rows(lb.storage.raw, coords, plan.fmt_b),
            compare, process_threads(),
        )
    except Exception:  # noqa: BLE001 - NotStreamable, or anything else decoding in step: tensorstore reads it, and says what is wrong
        job.acc = _Accumulator()
        job.in_step = None
        for block in job.blocks:
            _compare_reads(va, vb, job, block, _start_reads(va, vb, job, block), opts)


def _compare_reads(va: NormalizedView, vb: NormalizedView, job: _Job, block: tuple[slice, ...], reads: tuple[Any, Any], opts: CompareOptions) -> None:
    """Compare one block's two reads (a slab's B side part by part, see `_SlabParts`)."""
    pa, pb = reads
    if isinstance(pb, _SlabParts):
        a = pa.result()
        for part, b in pb.parts():  # each B part against the same region of A's slab
            _compare_values(job, np.ascontiguousarray(a[_stored_block(job.la, _relative(part, block))]), b, part, opts)
            del b
    else:
        a = pa.result()
        b = pb.result()
        _compare_values(job, a, b, block, opts)
    job.acc.bytes_read += pa.nbytes + pb.nbytes


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


SLAB_PARTS_IN_FLIGHT = 2  # stored chunks a slab read decodes at once, a side, when the budget holds them


def _parts_ahead(view: NormalizedView, leaf: LogicalLeaf, block: tuple[slice, ...], depth: int, first: Any = None) -> Iterator[tuple[tuple[slice, ...], Any]]:
    """A slab's parts (each inside one stored chunk), in C order, with the part's data as
    stored. At most `depth` part reads are unfinished at once: tensorstore
    decodes every chunk a read touches whole, so reading a slab that cuts many chunks in one
    read would hold all of them decoded (and their stored bytes) at once."""
    grid = _chunk_extents(leaf, len(block))
    parts = iter(_chunk_parts(block, grid) if grid is not None else [block])
    raw = leaf.storage.raw
    pending: deque = deque()

    def start() -> None:
        part = next(parts, None)
        if part is not None:
            pending.append((part, view.checkpoint.read(raw, _stored_block(leaf, part))))

    if first is not None:  # the first part's read, started already
        next(parts)
        pending.append(first)
    for _ in range(depth - len(pending)):
        start()
    while pending:
        part, read = pending.popleft()
        data = read.result()
        start()  # the next part decodes while this one is used
        yield part, data


def _read_in_parts(view: NormalizedView, leaf: LogicalLeaf, block: tuple[slice, ...], depth: int) -> Any:
    """Read a slab of one stored array part by part (`_parts_ahead`) into one array as
    stored. The first part's read starts now (the slab is read ahead), the others when the
    slab is asked for."""
    grid = _chunk_extents(leaf, len(block))
    parts = _chunk_parts(block, grid) if grid is not None else [block]
    raw = leaf.storage.raw
    shape = tuple(s.stop - s.start for s in _stored_block(leaf, block))
    first = (parts[0], view.checkpoint.read(raw, _stored_block(leaf, parts[0])))

    def get() -> Any:
        if len(parts) == 1:
            return first[1].result()
        out = None
        for part, data in _parts_ahead(view, leaf, block, depth, first):
            if out is None:
                out = np.empty(shape, data.dtype)
            out[_stored_block(leaf, _relative(part, block))] = data
            del data
        return out

    return _Once(get, math.prod(shape) * _itemsize(leaf.dtype))


def _relative(part: tuple[slice, ...], block: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(p.start - b.start, p.stop - b.start) for p, b in zip(part, block))


class _SlabParts:
    """B's side of a slab, never assembled: its parts are compared one by one against A's
    slab as they are decoded (`parts()`), so B holds at most the parts in flight.
    `result()` assembles the slab, for a caller that needs it whole."""

    def __init__(self, view: NormalizedView, leaf: LogicalLeaf, block: tuple[slice, ...], depth: int) -> None:
        self.view, self.leaf, self.block, self.depth = view, leaf, block, depth
        self.nbytes = math.prod(s.stop - s.start for s in block) * _itemsize(leaf.dtype)

    def parts(self) -> Iterator[tuple[tuple[slice, ...], Any]]:
        return _parts_ahead(self.view, self.leaf, self.block, self.depth)

    def result(self) -> Any:
        return _read_in_parts(self.view, self.leaf, self.block, self.depth).result()


class _Once:
    """A pending read computed once and kept."""

    __slots__ = ("_get", "_value", "nbytes")

    def __init__(self, get: Any, nbytes: int) -> None:
        self._get, self._value, self.nbytes = get, None, nbytes

    def result(self) -> Any:
        if self._value is None:
            self._value = self._get()
            self._get = None  # nor keep what the read held (a slab's first part) alive
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


SLAB_SHAPES_SEARCHED = 250_000  # block shapes whose decodes are counted, at most, per leaf read in slabs


def _slab_candidates(b: int, axis: int, grids: Sequence[tuple[int, ...]]) -> list[int]:
    """Extents a slab may take along one axis: every extent up to 64; beyond, the whole unit,
    multiples of either side's chunk extent (so the slab cuts no chunk of that side there),
    fractions of the unit, 1."""
    if b <= 64:
        return list(range(1, b + 1))
    out = {b, 1} | {-(-b // k) for k in range(2, 33)}
    for g in grids:
        out |= {m * g[axis] for m in range(1, 33) if m * g[axis] < b}
    return sorted(e for e in out if 0 < e <= b)


def _slab_shape(extent: Sequence[slice], unit: Sequence[int], grids: Sequence[tuple[int, ...]], limit: int) -> tuple[int, ...]:
    """The block shape of at most `limit` elements that decodes the fewest stored chunks.

    Used when the two sides' common aligned block (`unit`) is too large to hold. A chunk cut
    by a block is decoded once per block that needs it, and along each axis that count does
    not depend on the other axes: a side's decodes are a product over axes, and every
    combination of candidate extents (`_slab_candidates`) is counted at once. With A's rows
    against B's columns, a square-ish slab that cuts both sides' chunks beats one side's
    whole chunk, which would cut every chunk of the other.
    """
    sizes = [s.stop - s.start for s in extent]
    block = [min(u, n) for u, n in zip(unit, sizes)]
    if math.prod(block) <= limit:
        return tuple(block)
    cands = [_slab_candidates(b, i, grids) for i, b in enumerate(block)]
    while math.prod(len(c) for c in cands) > SLAB_SHAPES_SEARCHED:  # keep the largest axis's chunk multiples and halves
        i = max(range(len(cands)), key=lambda k: len(cands[k]))
        keep = {block[i], 1, -(-block[i] // 2)} | {g[i] for g in grids if g[i] < block[i]}
        if set(cands[i]) <= keep:
            break
        cands[i] = sorted(e for e in cands[i] if e in keep)
    size = np.ones((1,) * len(block))
    decodes = np.zeros((1,) * len(block))
    for grid in grids:
        side = np.ones((1,) * len(block))
        for i, c in enumerate(cands):
            counts = np.array([_overlaps(extent[i], e, grid[i]) for e in c], dtype=float)
            side = side * counts.reshape([-1 if k == i else 1 for k in range(len(block))])
        decodes = decodes + side
    for i, c in enumerate(cands):
        size = size * np.array(c, dtype=float).reshape([-1 if k == i else 1 for k in range(len(block))])
    size, decodes = np.broadcast_arrays(size, decodes)
    fits = size <= limit
    if not fits.any():
        return tuple(1 for _ in block)
    # fewest decodes; among those the largest slab (fewer, bigger reads); then the first in C order
    score = np.where(fits, decodes, np.inf)
    best = score == score.min()
    flat = int(np.argmax(np.where(best, size, -1).ravel()))
    index = np.unravel_index(flat, size.shape)
    return tuple(int(cands[i][k]) for i, k in enumerate(index))


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


def _plan_slab_depth(job: _Job, read_budget: int) -> None:
    """A leaf read in slabs decodes two stored chunks a side at once (the two cores busy,
    not one) when its slabs still fit in the budget so; otherwise one."""
    job.slab_depth = 1
    if not (job.as_stored and job.blocks and any(_cuts_chunks(job, b) for b in job.blocks)):
        return
    job.slab_depth = SLAB_PARTS_IN_FLIGHT
    if max(_block_bytes(job, b) for b in job.blocks) > read_budget:
        job.slab_depth = 1


def _run_jobs(va: NormalizedView, vb: NormalizedView, jobs: list[tuple[int, _Job]], opts: CompareOptions) -> Iterator[tuple[int, LeafResult]]:
    """Read blocks ahead while earlier ones are compared, holding at most `read_budget`
    decoded bytes (the block being compared included); a block larger than the budget (one
    big stored chunk) is read alone. A block in flight counts with the stored chunks its
    read decodes; once read, only the block itself.

    A leaf both sides store alike (`job.stored`) is read as stored chunk bytes first: equal
    bytes are equal values, and only the chunks whose bytes differ are decoded. When that
    finds differences, the rest of the leaf is read as values (a recomputed model differs
    everywhere, and reading both forms would cost more than decoding); after a few such
    leaves in a row, later leaves skip the stored bytes too.
    """
    for _, job in jobs:
        _plan_slab_depth(job, opts.read_budget)
    # a leaf read in step counts what its fallback (blocks, one at a time) may hold, too
    work = [(pos, job, i, _block_bytes(job, job.blocks[i])) if job.in_step is None
            else (pos, job, len(job.blocks) - 1, max(job.in_step.held, *(_block_bytes(job, b) for b in job.blocks)))
            for pos, job in jobs for i in (range(len(job.blocks)) if job.in_step is None else [0])]
    inflight: deque = deque()
    held = 0
    nxt = 0
    misses = 0  # leaves in a row whose stored bytes differed: the model was recomputed

    def issue() -> None:
        nonlocal held, nxt
        while nxt < len(work) and (held <= 0 or held + work[nxt][3] <= opts.read_budget):  # a larger block: alone
            pos, job, i, cost = work[nxt]
            block = job.blocks[i]
            if job.stored is not None and misses >= STORED_MISSES_BEFORE_VALUES and i == 0:
                job.stored = None
            if job.in_step is not None:
                reads: Any = _IN_STEP  # read when its turn comes: its chunks decode in pieces
            elif job.stored is not None:
                reads = job.stored.start(va, vb, block)
            else:
                reads = _start_reads(va, vb, job, block)
            inflight.append((pos, job, i, cost, reads))
            held += cost
            nxt += 1

    while nxt < len(work) or inflight:
        issue()
        pos, job, i, cost, reads = inflight.popleft()
        if reads is _IN_STEP:
            _read_in_step(va, vb, job, opts)
        elif isinstance(reads, tuple) and isinstance(reads[1], _SlabParts):
            _compare_reads(va, vb, job, job.blocks[i], reads, opts)
        elif isinstance(reads, tuple):
            pa, pb = reads
            a, b = pa.result(), pb.result()
            # Read: the stored chunks it was copied from are freed, and only the block is
            # held while it is compared, so the next reads can start now.
            settled = min(cost, pa.nbytes + pb.nbytes)
            held -= cost - settled
            cost = settled
            issue()
            job.acc.bytes_read += pa.nbytes + pb.nbytes
            _compare_values(job, a, b, job.blocks[i], opts)
            del a, b, pa, pb
        else:
            differed = _settle_stored(va, vb, job, reads, opts)
            if differed and job.stored is not None:
                job.stored = None  # blocks not yet issued are read as values
                misses += 1
                _switch_to_values(va, vb, inflight, misses >= STORED_MISSES_BEFORE_VALUES, job)
            elif not differed:
                misses = 0
        del reads
        held -= cost
        if i == len(job.blocks) - 1:
            yield pos, _finish(job)


STORED_MISSES_BEFORE_VALUES = 3
_IN_STEP = object()  # a work item read by `_read_in_step` when its turn comes


def _switch_to_values(va: NormalizedView, vb: NormalizedView, inflight: deque, every_leaf: bool, job: _Job) -> None:
    """Blocks already issued as stored bytes, read as values instead, all at once: those of
    `job` (its bytes differed), and with `every_leaf` those of every leaf not yet begun (the
    model was recomputed). Left as bytes they would each be decoded only when their turn
    comes, one after the other, with the decoding threads idle in between. Each block's cost
    was counted decoded, so reading it as values holds no more than the budget allows."""
    not_begun = {id(j) for _, j, i, _, _ in inflight if i == 0}  # blocks settle in order
    for k, (pos, j, i, cost, reads) in enumerate(inflight):
        if isinstance(reads, tuple) or reads is _IN_STEP:
            continue
        if j is job or every_leaf and id(j) in not_begun:
            j.stored = None
            inflight[k] = (pos, j, i, cost, _start_reads(va, vb, j, j.blocks[i]))


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
    # Parts that are whole chunks decode side by side, as the block's cost counts them; parts
    # that cut chunks (a layer range of a stack) one at a time, each decoding its whole chunk.
    side_by_side = not any(_cuts_chunks(job, part) for part in differing)
    pending = [(part, _start_reads(va, vb, job, part)) for part in differing] if side_by_side else []
    for k, part in enumerate(differing):
        pa, pb = pending[k][1] if side_by_side else _start_reads(va, vb, job, part)
        if side_by_side:
            pending[k] = None  # each part freed once compared
        a, b = pa.result(), pb.result()
        job.acc.bytes_read += pa.nbytes + pb.nbytes
        _compare_values(job, a, b, part, opts)
        del a, b, pa, pb
    return bool(differing)


def _block_bytes(job: _Job, block: tuple[slice, ...]) -> int:
    """Memory a block's read holds at its peak: the block itself, both sides, plus every
    stored chunk it touches, decoded whole by tensorstore before the block's part is copied
    out. A slab that cuts chunks holds A's slab, plus `job.slab_depth` decoded chunks of one
    side at a time with the parts they yield, and the part being compared (B's parts are
    compared as they come, never assembled): see `_parts_ahead`."""
    n = math.prod(s.stop - s.start for s in block)
    if job.as_stored and _cuts_chunks(job, block):
        chunks = []
        for leaf in (job.la, job.lb):
            grid = _chunk_extents(leaf, len(block))
            chunks.append(math.prod(grid) if grid is not None else n)
        parts = []
        for leaf in (job.la, job.lb):
            grid = _chunk_extents(leaf, len(block))
            parts.append(math.prod(min(s.stop - s.start, g) for s, g in zip(block, grid)) if grid is not None else n)
        a_side = (chunks[0] + parts[0]) * _itemsize(job.la.dtype)  # a chunk decoding, the part it yields
        b_side = (chunks[1] + parts[1]) * _itemsize(job.lb.dtype)
        # A's slab, the parts in flight on one side, and the part in hand: B's, or the
        # contiguous copy of A's region it is compared against
        in_hand = parts[1] * (_itemsize(job.la.dtype) + _itemsize(job.lb.dtype))
        return n * _itemsize(job.la.dtype) + job.slab_depth * max(a_side, b_side) + in_hand
    return sum(held_by_read(leaf, block) for leaf in (job.la, job.lb))


def held_by_read(leaf: LogicalLeaf, block: tuple[slice, ...]) -> int:
    """Memory one side's read of a block holds at its peak: the block, plus every stored
    chunk it touches, which tensorstore decodes whole before copying the block's part out."""
    n = math.prod(s.stop - s.start for s in block)
    total = n * _itemsize(leaf.dtype)
    c = leaf.chunk_shape
    if c is not None and len(c) == len(block):
        touched = 1
        for s, ci, d in zip(block, c, leaf.shape):
            ci = max(1, min(ci, d))
            touched *= min(-(-s.stop // ci) * ci, d) - s.start // ci * ci
        total += 2 * touched * _itemsize(leaf.dtype)  # decoded, and their stored bytes (at most as many)
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
