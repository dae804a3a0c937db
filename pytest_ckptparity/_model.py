"""Plain data shared by every layer: array metadata, tolerances, leaf results, the report.

Numbers live here; text lives in `report.py`. Everything is a frozen dataclass or a plain
container so results can cross process boundaries (xdist) as dicts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

Index = tuple[int, ...]

# Kinds of leaf mismatch, in the order a reader cares about them.
ONLY_IN_A = "only in A"
ONLY_IN_B = "only in B"
SHAPE = "shape"
DTYPE = "dtype"
VALUES = "values"
LAYOUT = "layout"  # a layer stack against a plain array, or stacks on different axes: never compared
FINGERPRINT = "statistics"  # values differ from a fingerprint: statistics moved beyond tolerance
NOT_BIT_IDENTICAL_NOTE = "not bit-identical"  # how a leaf note starts when it passed against a fingerprint on statistics alone


@dataclass(frozen=True)
class ArrayInfo:
    """What metadata tells about one stored leaf, before any data is read."""

    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: "float32", "bfloat16", "uint32", "str" for strings
    chunk_shape: Optional[tuple[int, ...]] = None
    note: str = ""  # e.g. "PRNG key data (threefry2x32)"

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    exact: bool = False  # integers, bools, strings

    def describe(self) -> str:
        return "exact" if self.exact else f"atol={self.atol:g}, rtol={self.rtol:g}"


@dataclass(frozen=True)
class LayerDrift:
    """How far one layer of a layered leaf drifted: the largest |a - b|, the largest
    |a - b| / |b| and the headroom (|a - b| / (atol + rtol * |b|), above 1 is a mismatch).
    All 0 when the layer is identical on both sides."""

    layer: int
    max_abs: float = 0.0
    max_rel: float = 0.0
    headroom: float = 0.0


@dataclass(frozen=True)
class ValueStats:
    """Element-wise outcome for one leaf (or one slice of it), in canonical coordinates.

    For a layered leaf the first index coordinate is the layer.
    """

    n_total: int = 0
    n_mismatch: int = 0
    n_nonfinite: int = 0  # mismatches where one side is NaN/inf and the other is not
    n_nan_pairs: int = 0  # mismatches that are NaN against NaN (equal_nan=False)
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst_index: Optional[Index] = None
    worst_a: Any = None
    worst_b: Any = None
    first_indices: tuple[Index, ...] = ()
    mismatched_layers: tuple[int, ...] = ()
    # The largest |a - b| / (atol + rtol * |b|) over the elements (1.0: at the limit; above:
    # a mismatch), and where it is. 0 when every element is identical; inf for an exact leaf
    # that differs.
    headroom: float = 0.0
    headroom_index: Optional[Index] = None
    # Per layer of a layered leaf (every layer compared, in order): where the drift is.
    layer_drift: tuple[LayerDrift, ...] = ()


@dataclass(frozen=True)
class LeafResult:
    """The verdict for one canonical leaf (or the layers of it an item owns)."""

    path: str
    kind: Optional[str]  # None when the leaf matches, else one of the kinds above
    shape_a: Optional[tuple[int, ...]] = None
    shape_b: Optional[tuple[int, ...]] = None
    dtype_a: Optional[str] = None
    dtype_b: Optional[str] = None
    layers: Optional[int] = None  # layer count when the leaf is a layer stack
    layer_range: Optional[tuple[int, int]] = None  # the layers compared, [start, stop)
    stats: Optional[ValueStats] = None
    tolerance: Optional[Tolerance] = None
    notes: tuple[str, ...] = ()
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return self.kind is None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        return _jsonable(d)


@dataclass(repr=False)
class ParityReport:
    """Everything one comparison found. Truthy only on parity."""

    names: tuple[str, str] = ("A", "B")
    layouts: tuple[str, str] = ("", "")
    locations: tuple[str, str] = ("", "")  # where each side was read: item folder, URL or "<in-memory dict>"
    steps: tuple[Optional[int], Optional[int]] = (None, None)  # the step opened in a manager root
    results: list[LeafResult] = field(default_factory=list)
    ignored: int = 0  # canonical leaves left out by scope or rules (rngs by default)
    values_compared: bool = True
    wall_time: float = 0.0
    notes: list[str] = field(default_factory=list)  # header sentences: scope decisions, layout fallbacks
    statistics_only: bool = False  # B (or A) is a fingerprint: statistics and digests, no per-element figures
    rngs_ignored: bool = False  # RNG state was left out (the default), so the header says so

    @property
    def mismatches(self) -> list[LeafResult]:
        return [r for r in self.results if not r.ok]

    @property
    def passed(self) -> bool:
        return not self.mismatches

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.results)

    def worst(self) -> Optional[LeafResult]:
        """The mismatching leaf a reader should look at first (largest abs diff, else first)."""
        bad = self.mismatches
        if not bad:
            return None
        with_stats = [r for r in bad if r.stats is not None and r.stats.n_mismatch]
        if with_stats:
            return max(with_stats, key=lambda r: (r.stats.max_abs, r.stats.n_mismatch))
        return bad[0]

    def headroom(self) -> tuple[float, Optional[LeafResult], Optional[Index]]:
        """The largest |a - b| / (atol + rtol * |b|) of any compared element, its leaf and index.

        Below 1.0 everything is within tolerance; how far below tells how much drift is left
        before a comparison fails. (0.0, None, None) when nothing differs or no value was read.
        """
        best: tuple[float, Optional[LeafResult], Optional[Index]] = (0.0, None, None)
        for r in self.results:
            s = r.stats
            if s is not None and s.headroom > best[0]:
                best = (s.headroom, r, s.headroom_index)
        return best

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        na, nb = self.names
        n = len(self.results)
        if self.passed:
            h, _, _ = self.headroom()
            return f"<ParityReport passed: {n} leaves match ({na} vs {nb}), headroom {h:.3g}>"
        worst = self.worst()
        return f"<ParityReport failed: {len(self.mismatches)} of {n} leaves differ ({na} vs {nb}), worst {worst.path if worst else '-'}>"

    def totals(self) -> dict[str, Any]:
        worst = self.worst()
        h, h_leaf, h_index = self.headroom()
        return {
            "leaves_compared": len(self.results),
            "leaves_mismatched": len(self.mismatches),
            "leaves_ignored": self.ignored,
            "bytes_read": self.bytes_read,
            "wall_time_s": round(self.wall_time, 6),
            "worst_leaf": worst.path if worst else None,
            "worst_kind": worst.kind if worst else None,
            "headroom": h,
            "headroom_leaf": h_leaf.path if h_leaf else None,
            "headroom_index": list(h_index) if h_index is not None else None,
            "passed": self.passed,
        }

    def to_dict(self) -> dict[str, Any]:
        """One comparison in the JSON report's shape (see docs/json-schema.md)."""
        return _jsonable({
            "names": list(self.names),
            "locations": list(self.locations),
            "steps": list(self.steps),
            "layouts": list(self.layouts),
            "notes": list(self.notes),
            "passed": self.passed,
            "values_compared": self.values_compared,
            "statistics_only": self.statistics_only,
            "totals": self.totals(),
            "leaves": [r.to_dict() for r in self.results],
        })


def _jsonable(x: Any) -> Any:
    """Turn numpy scalars, tuples and odd floats into JSON-safe values."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        if x != x or x in (float("inf"), float("-inf")):
            return repr(x)
        return x
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if hasattr(x, "item"):
        try:
            return _jsonable(x.item())
        except Exception:  # noqa: BLE001 - fall back to text for exotic scalars
            return str(x)
    return str(x)
