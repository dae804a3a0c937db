"""Fingerprints: what a checkpoint holds, in a small text file, so a later run can check a
new checkpoint (or a live state) against it without the reference checkpoint.

A fingerprint is taken on the canonical view (after normalization), so every layout of one
model has the same fingerprint. Per canonical leaf it records shape, dtype, a digest of the
values and float64 statistics (count, NaN and inf counts, min, max, mean, std, L2 norm, sum
of |x|); a layered leaf also gets them per layer, so a drift is located to a layer.

The digest is position-keyed and chunk-independent: every element contributes
`mix64(bits + flat_index * G)` and the digest is the sum of those, mod 2**64. `bits` is the
element's little-endian bit pattern (integers by value, sign-extended), `flat_index` its
position in the canonical (layer-first, C-order) array, `mix64` the splitmix64 finalizer.
Because a sum does not care in which order or blocks it is taken, the leaf is read once, in
blocks that follow the stored chunks (as a comparison reads it), and still has one digest
whatever the chunking or layout. `mix64` is a bijection, so changing any single element
always changes the digest.

A fingerprint file opens like a checkpoint (`open_fingerprint`, and `open_checkpoint` on a
`.json` path): it answers with statistics instead of arrays, and `fingerprint_diff` compares.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from pytest_ckptparity import _native
from pytest_ckptparity._model import ArrayInfo
from pytest_ckptparity._paths import KeyPath
from pytest_ckptparity.kernel import PIECE_ELEMENTS, _itemsize, _pieces, _pool
from pytest_ckptparity.read_plan import BLOCK_SHARE, DEFAULT_READ_BUDGET, _blocks, chunk_alignment, held_by_read
from pytest_ckptparity.errors import CkptParityUsageError
from pytest_ckptparity.normalize import Layout, LogicalLeaf, NormalizedView, Storage
from pytest_ckptparity.sources import Checkpoint, Pending

FORMAT = "ckptparity-fingerprint"
SCHEMA = 1
STAT_FIELDS = ("count", "nan", "posinf", "neginf", "min", "max", "mean", "std", "l2", "sum_abs")
_COUNTS = frozenset(STAT_FIELDS[:4])
NATIVE_PIECE_ELEMENTS = 1 << 20
_MASK = (1 << 64) - 1
_G = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
HOW_TO_CREATE = "create it with 'ckptparity fingerprint CKPT -o {path}' (a file of the ckpt_fingerprint fixture: run pytest with --ckpt-update-fingerprints)"


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """float64 statistics of one leaf or one layer; min/max/mean/std/l2 cover finite elements
    only and are None when there is none."""

    count: int = 0
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    min: Optional[float] = None
    max: Optional[float] = None
    mean: Optional[float] = None
    std: Optional[float] = None
    l2: Optional[float] = None
    sum_abs: Optional[float] = None

    @property
    def finite(self) -> int:
        return self.count - self.nan - self.posinf - self.neginf

    def row(self) -> list[Any]:
        return [getattr(self, f) for f in STAT_FIELDS]


class _Acc:
    """Streaming statistics: Chan et al.'s pairwise merge for mean and M2, plain sums for the
    rest, and the digest as a sum mod 2**64. Merging in a fixed order gives the same floats."""

    __slots__ = ("count", "nan", "posinf", "neginf", "n", "mean", "m2", "sumsq", "sum_abs", "min", "max", "digest")

    def __init__(self) -> None:
        self.count = self.nan = self.posinf = self.neginf = self.n = 0
        self.mean = self.m2 = self.sumsq = self.sum_abs = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.digest = 0

    def merge(self, o: "_Acc") -> None:
        self.count += o.count
        self.nan += o.nan
        self.posinf += o.posinf
        self.neginf += o.neginf
        self.digest = (self.digest + o.digest) & _MASK
        if o.n:
            n = self.n + o.n
            delta = o.mean - self.mean
            self.mean += delta * o.n / n
            self.m2 += o.m2 + delta * delta * self.n * o.n / n
            self.n = n
            self.sumsq += o.sumsq
            self.sum_abs += o.sum_abs
            self.min = min(self.min, o.min)
            self.max = max(self.max, o.max)

    def stats(self) -> Stats:
        if not self.n:
            return Stats(self.count, self.nan, self.posinf, self.neginf)
        return Stats(
            self.count, self.nan, self.posinf, self.neginf, float(self.min), float(self.max), float(self.mean),
            math.sqrt(max(self.m2, 0.0) / self.n), math.sqrt(self.sumsq), float(self.sum_abs),
        )


def _bits(x: np.ndarray) -> np.ndarray:
    """The elements' bit patterns as uint64 (integers by value, sign-extended)."""
    kind = x.dtype.kind
    if kind == "i":
        return x.astype(np.int64).view(np.uint64)
    if kind in "ub":
        return x.astype(np.uint64)
    size = x.dtype.itemsize
    if kind == "c" or size > 8:  # statistics of a real line would miss the imaginary part
        raise CkptParityUsageError(f"dtype {x.dtype} is not supported in fingerprints yet (complex statistics are not defined); exclude the leaf, or compare with the reference checkpoint.")
    if x.dtype.byteorder == ">":
        x = x.astype(x.dtype.newbyteorder("<"))
    return x.view(f"<u{size}")  # added to uint64 as is: no widened copy


_offset_cache: dict[tuple, np.ndarray] = {}


def _offsets(shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """flat offsets * G (mod 2**64) of a piece of `shape` in a leaf with element `strides`."""
    key = (shape, strides)
    table = _offset_cache.get(key)
    if table is None:
        table = np.zeros(shape, np.uint64)
        for axis, (n, s) in enumerate(zip(shape, strides)):
            idx = np.arange(n, dtype=np.uint64) * np.uint64(s)
            table += idx.reshape((n,) + (1,) * (len(shape) - axis - 1))
        table = table.reshape(-1)
        table *= _G
        if len(_offset_cache) > 64:
            _offset_cache.clear()
        _offset_cache[key] = table
    return table


_local = threading.local()


def _scratch(n: int, dtype: Any, slot: int) -> np.ndarray:
    """A per-thread buffer of `n` elements, reused piece after piece. A fresh 1 MiB temporary
    per step is a fresh mapping whose page faults cost more than the arithmetic (measured with
    glibc's default malloc settings: 9.6 ns per element for the digest with fresh temporaries,
    2.5 with these)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (np.dtype(dtype), slot)
    buf = buffers.get(key)
    if buf is None or buf.size < n:
        buf = buffers[key] = np.empty(max(n, PIECE_ELEMENTS), dtype)
    return buf[:n]


def _digest(x: np.ndarray, base: int, strides: tuple[int, ...]) -> int:
    """sum(mix64(bits + (base + offset) * G)) mod 2**64 over one piece."""
    n = x.size
    z, t = _scratch(n, np.uint64, 0), _scratch(n, np.uint64, 1)
    with np.errstate(over="ignore"):
        np.add(_offsets(x.shape, strides), np.uint64((base * int(_G)) & _MASK), out=z)
        bits = _bits(x).reshape(-1)
        z += bits
        np.right_shift(z, np.uint64(30), out=t)
        z ^= t
        z *= _C1
        np.right_shift(z, np.uint64(27), out=t)
        z ^= t
        z *= _C2
        np.right_shift(z, np.uint64(31), out=t)
        z ^= t
    return int(z.sum(dtype=np.uint64))


def _piece_acc(x: np.ndarray, base: int, strides: tuple[int, ...]) -> _Acc:
    """Statistics and digest of one piece: in the native
    kernel when it is built and takes the dtype, else with numpy (same digest)."""
    x = np.asarray(x)  # a 0-d leaf indexed with () is a numpy scalar, which has no buffer to hand to C
    acc = _Acc()
    acc.count = int(x.size)
    if not x.size:
        return acc
    lib = _native.library()
    kind = _native.FINGERPRINT_KINDS.get(x.dtype.name) if lib is not None and x.dtype.byteorder != ">" else None
    if kind is not None:
        return _native_piece_acc(lib, kind, x, base, strides, acc)
    return _numpy_piece_acc(x, base, strides, acc)


def _native_piece_acc(lib: Any, kind: int, x: np.ndarray, base: int, strides: tuple[int, ...], acc: _Acc) -> _Acc:
    import ctypes

    ndim = x.ndim
    dims = (ctypes.c_int64 * max(ndim, 1))(*x.shape)
    bstrides = (ctypes.c_int64 * max(ndim, 1))(*x.strides)
    estrides = (ctypes.c_int64 * max(ndim, 1))(*strides)
    out_f = (ctypes.c_double * 6)()
    out_i = (ctypes.c_int64 * 4)()
    digest = ctypes.c_uint64()
    if lib.ckpt_fingerprint_piece(x.ctypes.data, kind, ndim, dims, bstrides, estrides, base & _MASK, out_f, out_i, ctypes.byref(digest)):
        return _numpy_piece_acc(x, base, strides, acc)
    acc.digest = int(digest.value)
    acc.nan, acc.posinf, acc.neginf, finite = (int(v) for v in out_i)
    if finite:
        acc.n = finite
        total, acc.min, acc.max, acc.sum_abs, acc.sumsq, acc.m2 = (float(v) for v in out_f)
        acc.mean = total / finite
    return acc


def _numpy_piece_acc(x: np.ndarray, base: int, strides: tuple[int, ...], acc: _Acc) -> _Acc:
    acc.digest = _digest(x, base, strides)
    y = _scratch(x.size, np.float64, 2)
    np.copyto(y, x.reshape(-1), casting="unsafe")  # exact for every float up to float64, bf16 and fp8 included
    total = float(y.sum())
    if not math.isfinite(total):  # a NaN or inf among the elements (or a float64 overflow)
        finite = np.isfinite(y)
        acc.nan = int(np.count_nonzero(np.isnan(y)))
        acc.posinf = int(np.count_nonzero(y == np.inf))
        acc.neginf = int(np.count_nonzero(y == -np.inf))
        y = y[finite]
        if not y.size:
            return acc
        total = float(y.sum())
    acc.n = int(y.size)
    acc.mean = total / acc.n
    acc.min = float(y.min())
    acc.max = float(y.max())
    # No np.dot: BLAS threads would fight the piece pool, and their summation order varies.
    t = np.abs(y, out=_scratch(y.size, np.float64, 3))
    acc.sum_abs = float(t.sum())
    acc.sumsq = float(np.multiply(y, y, out=t).sum())
    np.subtract(y, acc.mean, out=t)
    acc.m2 = float(np.multiply(t, t, out=t).sum())
    return acc


# --------------------------------------------------------------------------------------
# Fingerprints in memory
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeafPrint:
    """The fingerprint of one canonical leaf."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    digest: int
    stats: Stats
    layers: Optional[int] = None
    stack: str = ""
    layer_digests: tuple[int, ...] = ()
    layer_stats: tuple[Stats, ...] = ()
    note: str = ""


@dataclass
class Fingerprint:
    """A whole checkpoint's fingerprint: its leaves plus where it came from."""

    leaves: dict[str, LeafPrint]
    layout: str = ""
    layout_name: str = ""
    location: str = ""
    step: Optional[int] = None
    tool: str = ""
    scope: dict[str, Any] = field(default_factory=dict)  # include/exclude/ignore it was taken with
    bytes_read: int = 0
    wall_time: float = 0.0
    leaf_bytes: dict[str, int] = field(default_factory=dict)  # decoded bytes read per leaf (when taken)


def _tool() -> str:
    from pytest_ckptparity import __version__

    return f"pytest-ckptparity {__version__}"


def _read_ahead(view: NormalizedView, work: list[tuple[Any, tuple[slice, ...], int]], budget: int) -> Iterator[tuple[Any, tuple[slice, ...], Any, int]]:
    """Blocks in order, reads issued ahead while earlier blocks are processed, holding at most
    `budget` decoded bytes (the processed block included, and the stored chunks each read
    decodes, counted as a comparison counts them); a larger block is read alone."""
    inflight: deque = deque()
    held = nxt = 0
    while nxt < len(work) or inflight:
        while nxt < len(work) and (not inflight or held + work[nxt][2] <= budget):
            leaf, block, cost = work[nxt]
            inflight.append((leaf, block, cost, view.read(leaf, block)))
            held += cost
            nxt += 1
        leaf, block, cost, pending = inflight.popleft()
        data = pending.result()
        yield leaf, block, data, pending.nbytes
        del data, pending
        held -= cost


def _strides(shape: Sequence[int]) -> tuple[int, ...]:
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= d
    return tuple(reversed(out))


def fingerprint_view(
    view: NormalizedView, *, paths: Optional[Iterable[str]] = None, layer_range: Optional[tuple[int, int]] = None,
    read_budget: int = DEFAULT_READ_BUDGET, scope: Optional[Mapping[str, Any]] = None,
) -> Fingerprint:
    """Take the fingerprint of `view` (or of `paths` in it, or of `layer_range` of their layer
    stacks) in one streaming pass: each stored chunk is decoded once, blocks under the budget."""
    t0 = time.perf_counter()
    wanted = list(view.leaves) if paths is None else [p for p in paths if p in view.leaves]
    block_budget = max(1, read_budget // BLOCK_SHARE)
    work: list[tuple[Any, tuple[slice, ...], int]] = []
    accs: dict[str, list[_Acc]] = {}
    strings: dict[str, _Acc] = {}
    for path in wanted:
        leaf = view.leaves[path]
        if leaf.dtype.startswith("complex"):  # before any read: one sentence naming the leaf
            raise CkptParityUsageError(
                f"{view.name}: leaf '{path}' is {leaf.dtype}, which fingerprints do not support yet (complex statistics are not "
                f"defined); exclude it (exclude='{path}') or compare with the reference checkpoint.")
        if leaf.dtype == "str":
            strings[path] = _Acc()
            work.append((leaf, (), 1))
            continue
        extent = [slice(0, d) for d in leaf.shape]
        if leaf.layers is not None and layer_range is not None:
            extent[0] = slice(*layer_range)
        item = _itemsize(leaf.dtype)
        accs[path] = [_Acc() for _ in range(leaf.layers if leaf.layers is not None else 1)]
        for block in _blocks(extent, chunk_alignment(leaf, leaf), item, block_budget):
            work.append((leaf, block, held_by_read(leaf, tuple(block))))  # the block and the chunks it decodes

    bytes_read = 0
    leaf_bytes: dict[str, int] = {}
    for leaf, block, data, nbytes in _read_ahead(view, work, read_budget):
        bytes_read += nbytes
        leaf_bytes[leaf.path] = leaf_bytes.get(leaf.path, 0) + nbytes
        if leaf.path in strings:
            acc = strings[leaf.path]
            acc.count = 1
            acc.digest = int.from_bytes(hashlib.blake2b(str(data).encode(), digest_size=8).digest(), "little")
            continue
        _fold_block(leaf, block, data, accs[leaf.path])

    prints: dict[str, LeafPrint] = {}
    for path in wanted:
        leaf = view.leaves[path]
        if path in strings:
            acc = strings[path]
            prints[path] = LeafPrint(path, tuple(leaf.shape), leaf.dtype, acc.digest, acc.stats(), note=leaf.note)
            continue
        parts = accs[path]
        if leaf.layers is None:
            prints[path] = LeafPrint(path, tuple(leaf.shape), leaf.dtype, parts[0].digest, parts[0].stats(), note=leaf.note)
            continue
        total = _Acc()
        lo, hi = layer_range if layer_range is not None else (0, leaf.layers)
        for acc in parts[lo:hi]:
            total.merge(acc)
        prints[path] = LeafPrint(
            path, tuple(leaf.shape), leaf.dtype, total.digest, total.stats(), layers=leaf.layers, stack=leaf.stack,
            layer_digests=tuple(a.digest for a in parts), layer_stats=tuple(a.stats() for a in parts), note=leaf.note,
        )
    ckpt = view.checkpoint
    return Fingerprint(
        prints, layout=view.describe(), layout_name=view.layout.name, location=ckpt.location, step=ckpt.step,
        tool=_tool(), scope=dict(scope or {}), bytes_read=bytes_read, wall_time=time.perf_counter() - t0, leaf_bytes=leaf_bytes,
    )


def _fold_block(leaf: LogicalLeaf, block: tuple[slice, ...], data: Any, parts: list[_Acc]) -> None:
    """Fold one block into the per-layer (or whole-leaf) accumulators, piece by piece, pieces
    spread over the thread pool and merged in order."""
    strides = _strides(leaf.shape)
    origin = tuple(s.start for s in block)
    # The C loop needs no temporaries, so its pieces only spread work over the pool: larger
    # ones cost less Python per element (numpy's pieces bound its scratch buffers).
    limit = NATIVE_PIECE_ELEMENTS if _native.library() is not None else PIECE_ELEMENTS
    jobs: list[tuple[int, Any, int]] = []  # (accumulator index, piece array, flat base)
    if leaf.layers is None:
        arr = np.asarray(data)
        for piece in _pieces(arr.shape, limit):
            start = [o + (piece[i].start if i < len(piece) else 0) for i, o in enumerate(origin)]
            jobs.append((0, arr[piece], sum(a * s for a, s in zip(start, strides))))
    else:
        for i in range(block[0].stop - block[0].start):
            layer = origin[0] + i
            arr = np.asarray(data[i])  # a list of per-layer arrays or a stacked block: same indexing
            for piece in _pieces(arr.shape, limit):
                start = [layer] + [o + (piece[k].start if k < len(piece) else 0) for k, o in enumerate(origin[1:])]
                jobs.append((layer, arr[piece], sum(a * s for a, s in zip(start, strides))))

    def work(job: tuple[int, Any, int]) -> _Acc:
        return _piece_acc(job[1], job[2], strides[len(strides) - job[1].ndim:])

    results = map(work, jobs) if len(jobs) == 1 else _pool().map(work, jobs)
    for (index, _, _), acc in zip(jobs, results):
        parts[index].merge(acc)


# --------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------


def _hex(d: int) -> str:
    return f"{d:016x}"


def _num(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, float):
        return repr(x)  # the shortest text that reads back as the same float
    return str(int(x))


def _row(s: Stats) -> str:
    return "[" + ", ".join(_num(v) for v in s.row()) + "]"


def _leaf_body(lp: LeafPrint) -> dict[str, Any]:
    """The leaf as JSON values (what the checksum covers)."""
    d: dict[str, Any] = {"digest": _hex(lp.digest), "dtype": lp.dtype, "shape": list(lp.shape), "stats": lp.stats.row()}
    if lp.layers is not None:
        d.update(layers=lp.layers, stack=lp.stack, layer_digests=[_hex(x) for x in lp.layer_digests], layer_stats=[s.row() for s in lp.layer_stats])
    if lp.note:
        d["note"] = lp.note
    return d


def _checksum(leaves: Mapping[str, Any]) -> str:
    text = json.dumps(leaves, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def to_json(fp: Fingerprint) -> str:
    """Diff-friendly JSON: sorted keys, one leaf per block, one layer per line."""
    bodies = {p: _leaf_body(fp.leaves[p]) for p in sorted(fp.leaves)}
    head = {
        "checksum": _checksum(bodies), "format": FORMAT, "schema": SCHEMA, "stat_fields": list(STAT_FIELDS),
        "source": {"layout": fp.layout, "layout_name": fp.layout_name, "location": fp.location, "step": fp.step, "scope": fp.scope},
        "tool": fp.tool or _tool(),
    }
    lines = ["{"]
    for key in sorted(head):
        lines.append(f' {json.dumps(key)}: {json.dumps(head[key], sort_keys=True)},')
    lines.append(' "leaves": {')
    for n, (path, body) in enumerate(bodies.items()):
        lines.append(f"  {json.dumps(path)}: {{")
        keys = sorted(body)
        for k, key in enumerate(keys):
            value = body[key]
            end = "," if k < len(keys) - 1 else ""
            if key == "layer_stats":
                rows = ",\n".join("    " + _row(s) for s in fp.leaves[path].layer_stats)
                lines.append(f'   "layer_stats": [\n{rows}\n   ]{end}')
            elif key == "stats":
                lines.append(f'   "stats": {_row(fp.leaves[path].stats)}{end}')
            else:
                lines.append(f"   {json.dumps(key)}: {json.dumps(value)}{end}")
        lines.append("  }" + ("," if n < len(bodies) - 1 else ""))
    lines.append(" }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_fingerprint(fp: Fingerprint, path: Union[str, os.PathLike]) -> Path:
    """Write atomically (a temp file in the same folder, then a rename): concurrent writers
    (xdist workers) and readers never see half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(to_json(fp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a golden file is shared like any other
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


class _Bad(Exception):
    pass


def _stats_from(row: Any, where: str, count: int) -> Stats:
    if not isinstance(row, list) or len(row) != len(STAT_FIELDS):
        raise _Bad(f"{where}: statistics must be a list of {len(STAT_FIELDS)} values ({', '.join(STAT_FIELDS)})")
    values = dict(zip(STAT_FIELDS, row))
    for name in STAT_FIELDS:
        v = values[name]
        if name in _COUNTS:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise _Bad(f"{where}: '{name}' must be a non-negative integer, got {v!r}")
        elif v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            raise _Bad(f"{where}: '{name}' must be a finite number or null, got {v!r}")
    s = Stats(**{k: (float(v) if k not in _COUNTS and v is not None else v) for k, v in values.items()})
    if s.count != count:
        raise _Bad(f"{where}: count {s.count} does not match the shape ({count} elements)")
    if s.finite < 0:
        raise _Bad(f"{where}: more NaN and inf elements than elements")
    present = [getattr(s, k) is not None for k in ("min", "max", "mean", "std", "l2", "sum_abs")]
    if s.finite and not all(present) or not s.finite and any(present[:4]):
        raise _Bad(f"{where}: min, max, mean, std must be given exactly when there are finite elements")
    if s.finite and not (s.min <= s.max and s.std >= 0 and s.l2 >= 0 and s.sum_abs >= 0):
        raise _Bad(f"{where}: inconsistent statistics (min > max or a negative norm)")
    return s


def _digest_from(text: Any, where: str) -> int:
    if not isinstance(text, str) or len(text) != 16:
        raise _Bad(f"{where}: a digest must be 16 hex digits, got {text!r}")
    try:
        return int(text, 16)
    except ValueError:
        raise _Bad(f"{where}: a digest must be 16 hex digits, got {text!r}") from None


def _leaf_from(path: str, d: Any) -> LeafPrint:
    where = f"leaf '{path}'"
    if not isinstance(d, dict):
        raise _Bad(f"{where} must be an object")
    unknown = set(d) - {"digest", "dtype", "shape", "stats", "layers", "stack", "layer_digests", "layer_stats", "note"}
    if unknown:
        raise _Bad(f"{where} has unknown fields {sorted(unknown)}")
    shape = d.get("shape")
    if not isinstance(shape, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
        raise _Bad(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    dtype = d.get("dtype")
    if dtype != "str":
        try:
            _itemsize(str(dtype))
        except TypeError:
            raise _Bad(f"{where}: unknown dtype {dtype!r}") from None
    count = 1 if dtype == "str" else math.prod(shape)
    stats = _stats_from(d.get("stats"), where, count)
    digest = _digest_from(d.get("digest"), where)
    layers = d.get("layers")
    if layers is None:
        if "layer_stats" in d or "layer_digests" in d:
            raise _Bad(f"{where}: per-layer entries without 'layers'")
        return LeafPrint(path, tuple(shape), str(dtype), digest, stats, note=str(d.get("note", "")))
    if not isinstance(layers, int) or isinstance(layers, bool) or not shape or shape[0] != layers:
        raise _Bad(f"{where}: 'layers' must equal the first dimension of the shape, got {layers!r}")
    rows, digests = d.get("layer_stats"), d.get("layer_digests")
    if not isinstance(rows, list) or not isinstance(digests, list) or len(rows) != layers or len(digests) != layers:
        raise _Bad(f"{where}: needs {layers} layer_stats rows and {layers} layer_digests")
    per_layer = count // layers if layers else 0
    lstats = tuple(_stats_from(r, f"{where} layer {i}", per_layer) for i, r in enumerate(rows))
    ldigests = tuple(_digest_from(x, f"{where} layer {i}") for i, x in enumerate(digests))
    if sum(ldigests) & _MASK != digest:
        raise _Bad(f"{where}: the layer digests do not add up to the leaf digest")
    return LeafPrint(path, tuple(shape), str(dtype), digest, stats, layers, str(d.get("stack", "")), ldigests, lstats, str(d.get("note", "")))


def from_json(text: str, where: str = "<fingerprint>") -> Fingerprint:
    """Parse and check a fingerprint file; any damage is one `CkptParityUsageError` sentence."""
    regen = "regenerate it with 'ckptparity fingerprint CKPT -o FILE' (a file of the ckpt_fingerprint fixture: pytest --ckpt-update-fingerprints)"
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CkptParityUsageError(f"'{where}' is not a valid fingerprint file (not JSON: {e}); {regen}.", path=where) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CkptParityUsageError(f"'{where}' is not a ckptparity fingerprint file (no \"format\": \"{FORMAT}\"); pass a file written by 'ckptparity fingerprint'.", path=where)
    schema = data.get("schema")
    if schema != SCHEMA:
        newer = isinstance(schema, int) and schema > SCHEMA
        what = "a newer pytest-ckptparity; upgrade it" if newer else f"an unknown schema {schema!r}; {regen}"
        raise CkptParityUsageError(f"'{where}' was written by {what}.", path=where)
    leaves = data.get("leaves")
    if not isinstance(leaves, dict) or data.get("stat_fields") != list(STAT_FIELDS):
        raise CkptParityUsageError(f"'{where}' is a damaged fingerprint file (leaves or stat_fields missing); {regen}.", path=where)
    try:
        checksum = _checksum(leaves)
    except ValueError:  # NaN or Infinity written into the file: never by the writer
        checksum = None
    if checksum is None or data.get("checksum") != checksum:
        raise CkptParityUsageError(f"'{where}' was edited by hand or damaged (its checksum does not match its contents); {regen}.", path=where)
    try:
        prints = {p: _leaf_from(p, d) for p, d in leaves.items()}
    except _Bad as e:
        raise CkptParityUsageError(f"'{where}' is a damaged fingerprint file ({e}); {regen}.", path=where) from None
    src = data.get("source") if isinstance(data.get("source"), dict) else {}
    step = src.get("step")
    return Fingerprint(
        prints, layout=str(src.get("layout", "")), layout_name=str(src.get("layout_name", "")), location=str(src.get("location", "")),
        step=step if isinstance(step, int) else None, tool=str(data.get("tool", "")), scope=dict(src.get("scope") or {}),
    )


def read_fingerprint(path: Union[str, os.PathLike]) -> Fingerprint:
    if isinstance(path, str) and "://" in path:  # never mangle a URL into a local path
        raise CkptParityUsageError(f"fingerprint file '{path}' is a URL; fingerprint files are read from local disk: copy it here first.", path=path)
    p = Path(path)
    if not p.is_file():
        if p.is_dir():
            raise CkptParityUsageError(f"fingerprint path '{p}' is a folder, not a fingerprint file.", path=p)
        raise CkptParityUsageError(f"fingerprint file '{p}' does not exist; {HOW_TO_CREATE.format(path=p)}.", path=p)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CkptParityUsageError(f"cannot read fingerprint file '{p}' ({type(e).__name__}); check the path and its permissions.", path=p) from None
    return from_json(text, str(p))


# --------------------------------------------------------------------------------------
# A fingerprint is a source
# --------------------------------------------------------------------------------------

FINGERPRINT_LAYOUT = Layout("fingerprint", "fingerprint file", canonical=False)


class FingerprintCheckpoint(Checkpoint):
    """A fingerprint opened like a checkpoint: metadata for every canonical leaf, statistics
    instead of arrays (reading array data is refused)."""

    is_fingerprint = True

    def __init__(self, fingerprint: Fingerprint, *, name: str = "B", location: str = "") -> None:
        self.fingerprint = fingerprint
        self.name = name
        self.location = location or "<fingerprint>"
        self.step = fingerprint.step
        self.custom_metadata = {}

    def leaves(self) -> dict[KeyPath, ArrayInfo]:
        return {tuple(p.split("/")): ArrayInfo(lp.shape, lp.dtype, note=lp.note) for p, lp in self.fingerprint.leaves.items()}

    def read(self, path: KeyPath, index: Optional[tuple] = None) -> Pending:
        raise CkptParityUsageError(f"{self.name}: '{self.location}' is a fingerprint and holds statistics, not arrays; compare it against a checkpoint.")

    def canonical_view(self, *, ignore: Sequence[str] = (), ignore_rngs: bool = True, **_: Any) -> "FingerprintView":
        """The fingerprint's leaves are canonical already: no layout rules run again."""
        from pytest_ckptparity._paths import any_match

        globs = tuple(ignore) + (("rngs",) if ignore_rngs else ())
        leaves, ignored = {}, {}
        for path in sorted(self.fingerprint.leaves):
            lp = self.fingerprint.leaves[path]
            leaf = LogicalLeaf(path, path.split("/")[0], lp.shape, lp.dtype, Storage(raw=tuple(path.split("/"))), layers=lp.layers, note=lp.note, stack=lp.stack)
            (ignored if any_match(path, globs) else leaves)[path] = leaf
        return FingerprintView(self, FINGERPRINT_LAYOUT, leaves, ignored)


class FingerprintView(NormalizedView):
    """The canonical view of a fingerprint file."""

    @property
    def fingerprint(self) -> Fingerprint:
        return self.checkpoint.fingerprint  # type: ignore[attr-defined]

    def describe(self) -> str:
        fp = self.fingerprint
        step = f", step {fp.step}" if fp.step is not None else ""
        return f"fingerprint of {fp.layout or 'a checkpoint'} ({fp.location}{step})"


def open_fingerprint(path: Union[str, os.PathLike], *, name: str = "B") -> FingerprintCheckpoint:
    return FingerprintCheckpoint(read_fingerprint(path), name=name, location=str(path))


__all__ = (
    "Fingerprint", "LeafPrint", "Stats", "STAT_FIELDS", "fingerprint_view", "write_fingerprint", "HOW_TO_CREATE",
    "read_fingerprint", "to_json", "from_json", "open_fingerprint", "FingerprintCheckpoint",
    "FingerprintView",
)
