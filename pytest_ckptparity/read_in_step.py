"""Two chunk grids read row by row, in step: every stored chunk decoded once, in pieces.

When A and B were written on different meshes (A's shards split rows, B's columns), the
smallest region made of whole chunks of both sides can be most of an array, and reading it
in slabs decodes chunks more than once and holds several whole chunks at a time. Here, for
each region of the trailing axes made of whole chunks of both sides, every chunk of either
side that covers it is decompressed from the front (`zarr_rows.ChunkRows`) in step with the
others: a batch of rows along the first stored axis at a time, both sides' batches
assembled from their chunks' rows and compared. Each chunk is decoded exactly once, and
memory is a few batches plus each open chunk's input piece and window, whatever the size of
the chunks. Chunks decode on worker threads (libzstd and zlib run without the GIL) while
the batch before is compared.

Everything here is in stored coordinates; `read_plan` decides when to read a leaf so and
maps the batches to canonical (layer first) terms.
"""

from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from pytest_ckptparity.zarr_rows import INPUT_PIECE, ChunkRows, RowFormat

BATCH_BYTES = 8 << 20  # rows decoded at once, a side: about this many bytes
BATCHES_AHEAD = 2  # batches decoding while one is compared
MAX_OPEN_CHUNKS = 64  # chunks of one side open at once (one region's); beyond, not read in step
DECODER_BUFFERS = 1 << 20  # a zstd decoder's own buffers beyond its window, counted per open chunk
WINDOW_LOGS = (23, 22, 21)  # zstd windows a plan allows (8, 4, 2 MiB), the largest the budget holds

Region = tuple[slice, ...]


@dataclass(frozen=True)
class InStepPlan:
    """How to read one stored array pair in step: the region compared, the two sides'
    formats (their chunk grids), the regions of the trailing axes, rows per batch and the
    bytes held at peak."""

    extent: Region
    fmt_a: RowFormat
    fmt_b: RowFormat
    regions: tuple[Region, ...]
    batch_rows: int
    held: int

    @property
    def grid_a(self) -> tuple[int, ...]:
        return tuple(self.fmt_a.chunk)

    @property
    def grid_b(self) -> tuple[int, ...]:
        return tuple(self.fmt_b.chunk)


def _trailing_regions(extent: Region, grid_a: Sequence[int], grid_b: Sequence[int]) -> list[Region]:
    """The extent's trailing axes cut on the smallest grid made of whole chunks of both sides."""
    ranges = []
    for s, a, b in zip(extent[1:], grid_a[1:], grid_b[1:]):
        unit = math.lcm(a, b)
        first = s.start - s.start % unit
        ranges.append([slice(max(x, s.start), min(x + unit, s.stop)) for x in range(first, s.stop, unit)])
    return [tuple(r) for r in itertools.product(*ranges)]


def _chunks_over(region: Region, grid: Sequence[int]) -> list[tuple[int, ...]]:
    """Trailing chunk coordinates of one side that a trailing region touches."""
    return list(itertools.product(*(range(s.start // g, -(-s.stop // g)) for s, g in zip(region, grid[1:]))))


def plan_in_step(extent: Region, fmt_a: RowFormat, fmt_b: RowFormat, budget: int) -> Optional[InStepPlan]:
    """A plan when the two grids can be read in step within `budget` bytes, else None."""
    itemsize_a, itemsize_b = fmt_a.dtype.itemsize, fmt_b.dtype.itemsize
    grid_a, grid_b = tuple(fmt_a.chunk), tuple(fmt_b.chunk)
    if len(grid_a) != len(extent) or len(grid_b) != len(extent) or not extent:
        return None
    if any(s.stop <= s.start for s in extent):
        return None
    regions = _trailing_regions(extent, grid_a, grid_b)
    widest = max(math.prod(s.stop - s.start for s in r) for r in regions)
    open_a = max(len(_chunks_over(r, grid_a)) for r in regions)
    open_b = max(len(_chunks_over(r, grid_b)) for r in regions)
    if max(open_a, open_b) > MAX_OPEN_CHUNKS:
        return None
    row_a, row_b = widest * itemsize_a, widest * itemsize_b
    for window_log in WINDOW_LOGS:  # zstd levels 1-3 (orbax writes 1 and 3) need 2 MiB at most
        decoders = 0
        for fmt, n in ((fmt_a, open_a), (fmt_b, open_b)):  # each open chunk: its input pieces and decoder
            chunk_bytes = math.prod(fmt.chunk) * fmt.dtype.itemsize
            if fmt.codec != "raw":
                decoders += n * (min(2 * INPUT_PIECE, chunk_bytes) + min((1 << window_log) + DECODER_BUFFERS, chunk_bytes))
        # batches take what the open chunks leave: BATCHES_AHEAD + 2 a side (those compared and
        # decoding, and chunks' rows before they are copied), each at most BATCH_BYTES
        rows = min(BATCH_BYTES // max(row_a, row_b, 1), (budget - decoders) // ((BATCHES_AHEAD + 2) * (row_a + row_b)),
                   extent[0].stop - extent[0].start)
        if rows >= 1:
            held = decoders + (BATCHES_AHEAD + 2) * rows * (row_a + row_b)
            return InStepPlan(tuple(extent), fmt_a.with_window_log(window_log), fmt_b.with_window_log(window_log),
                              tuple(regions), rows, held)
    return None


def _row_batches(rows: slice, g_a: int, g_b: int, batch: int) -> list[tuple[int, int]]:
    """Row ranges of at most `batch` rows that never cross a chunk edge of either side."""
    edges = {rows.start, rows.stop}
    for g in (g_a, g_b):
        edges.update(range(rows.start - rows.start % g + g, rows.stop, g))
    edges = sorted(edges)
    out = []
    for lo, hi in zip(edges, edges[1:]):
        out.extend((r, min(r + batch, hi)) for r in range(lo, hi, batch))
    return out


class _Lane:
    """One side's chunks along one trailing position of a region, read down the rows: a
    chunk at a time (each opened when the rows reach it), one batch after the other."""

    def __init__(self, open_rows: Callable[[tuple[int, ...]], ChunkRows], grid: Sequence[int], region: Region, trailing: tuple[int, ...], side: int, rows_end: int) -> None:
        self.open_rows, self.grid, self.trailing, self.side, self.rows_end = open_rows, tuple(grid), trailing, side, rows_end
        src, dst = [], []
        for s, c, g in zip(region, trailing, self.grid[1:]):
            a, b = max(s.start, c * g), min(s.stop, (c + 1) * g)
            src.append(slice(a - c * g, b - c * g))
            dst.append(slice(a - s.start, b - s.start))
        self.src, self.dst = (slice(None), *src), (slice(None), *dst)
        # the chunk's rows fill the region's whole width: decode straight into the batch
        self.whole = all(d.start == 0 and d.stop == s.stop - s.start and sr.start == 0 and sr.stop == g
                         for d, s, sr, g in zip(dst, region, src, self.grid[1:]))
        self.stream: Optional[ChunkRows] = None
        self.row_chunk = -1
        self.next = 0  # the next batch this lane decodes

    def decode(self, lo: int, hi: int, out: np.ndarray) -> None:
        """Rows [lo, hi) of this lane's chunk, into its part of `out` (the side's batch)."""
        g0 = self.grid[0]
        if lo // g0 != self.row_chunk or self.stream is None:
            self.close()
            self.row_chunk = lo // g0
            self.stream = self.open_rows((self.row_chunk, *self.trailing))
        stream = self.stream
        assert stream is not None
        first = lo - self.row_chunk * g0
        if stream.rows_done < first:
            stream.skip(first - stream.rows_done)
        if self.whole:
            stream.read_into(out)
        else:
            rows = stream.read(hi - lo)
            out[self.dst] = rows[self.src]
        if hi == min((self.row_chunk + 1) * g0, self.rows_end):  # the last rows wanted of this chunk
            stream.finish()  # its stored stream must end with it, as tensorstore checks
            self.close()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def compare_in_step(
    plan: InStepPlan, open_a: Callable[[tuple[int, ...]], ChunkRows], open_b: Callable[[tuple[int, ...]], ChunkRows],
    compare: Callable[[np.ndarray, np.ndarray, Region], None], threads: int,
) -> None:
    """Read both sides in step and call `compare(a, b, region)` on every batch, in order.
    A chunk that cannot be decoded here raises `zarr_rows.NotStreamable` (nothing is then
    known to be compared: the caller reads the leaf again another way).

    Each lane (a side's chunks at one trailing position) decodes its batches in order on
    the worker threads, each batch as soon as the lane finished the one before and the
    batch is open; batches open as the ones before them are compared (`BATCHES_AHEAD`)."""
    dtypes = tuple(f.dtype.newbyteorder("=") for f in (plan.fmt_a, plan.fmt_b))
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ckptparity-rows") as pool:
        for region in plan.regions:
            _Region(plan, region, (open_a, open_b), dtypes, pool).run(compare)


class _Region:
    """The lanes of one trailing region and the batches down its rows (see `compare_in_step`)."""

    def __init__(self, plan: InStepPlan, region: Region, opens: tuple, dtypes: tuple, pool: ThreadPoolExecutor) -> None:
        self.region, self.dtypes, self.pool = region, dtypes, pool
        self.lanes = [_Lane(opens[side], grid, region, t, side, plan.extent[0].stop)
                      for side, grid in enumerate((plan.grid_a, plan.grid_b)) for t in _chunks_over(region, grid)]
        self.batches = _row_batches(plan.extent[0], plan.grid_a[0], plan.grid_b[0], plan.batch_rows)
        self.shape = tuple(s.stop - s.start for s in region)
        self.outs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.left: dict[int, int] = {}  # lanes still decoding each open batch
        self.opened = 0
        self.running = 0  # lane tasks submitted and not finished
        self.error: Optional[BaseException] = None
        self.lock = threading.Condition()

    def _open(self) -> None:
        """Open the next batch (under the lock): its buffers, and the lanes waiting for it."""
        j = self.opened
        if j >= len(self.batches):
            return
        lo, hi = self.batches[j]
        self.outs[j] = tuple(np.empty((hi - lo, *self.shape), dt) for dt in self.dtypes)  # type: ignore[assignment]
        self.left[j] = len(self.lanes)
        self.opened += 1
        for lane in self.lanes:
            if lane.next == j:  # waiting for this batch
                self._submit(lane)

    def _submit(self, lane: _Lane) -> None:
        self.running += 1
        self.pool.submit(self._step, lane)

    def _step(self, lane: _Lane) -> None:
        j = lane.next
        try:
            if self.error is None:
                lo, hi = self.batches[j]
                lane.decode(lo, hi, self.outs[j][lane.side])
        except BaseException as e:  # noqa: BLE001 - handed to the comparing thread
            with self.lock:
                self.error = self.error or e
        with self.lock:
            self.running -= 1
            lane.next = j + 1
            self.left[j] -= 1
            if lane.next < self.opened and self.error is None:
                self._submit(lane)
            self.lock.notify_all()

    def run(self, compare: Callable[[np.ndarray, np.ndarray, Region], None]) -> None:
        try:
            with self.lock:
                for _ in range(BATCHES_AHEAD + 1):
                    self._open()
            for j, (lo, hi) in enumerate(self.batches):
                with self.lock:
                    while self.left[j] and self.error is None:
                        self.lock.wait()
                    if self.error is not None:
                        raise self.error
                    a, b = self.outs.pop(j)
                    self._open()
                compare(a, b, (slice(lo, hi), *self.region))
                del a, b
        finally:
            with self.lock:
                self.error = self.error or _Stopped()
                while self.running:  # a lane still decoding must not outlive its chunk
                    self.lock.wait()
            for lane in self.lanes:
                lane.close()


class _Stopped(Exception):
    """The region ended (or failed): lanes still queued do nothing."""
