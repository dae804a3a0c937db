"""The verdicts: compare two normalized views leaf by leaf (structure, shape, dtype, layout,
then values) and gather a `ParityReport`. Builds no strings beyond short notes; `report.py`
turns the result into text.

Which leaves, which tolerance and which verdict are decided here; how blocks are read is
`read_plan.py`'s job and how two blocks are compared element by element is `kernel.py`'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Optional, Sequence

from pytest_ckptparity._model import (
    DTYPE, LAYOUT, ONLY_IN_A, ONLY_IN_B, SHAPE, LeafResult, ParityReport, Tolerance,
)
from pytest_ckptparity._paths import glob_match, in_scope
from pytest_ckptparity.kernel import DEFAULT_TOLERANCES, EXACT, _itemsize, _kind, _np_dtype, compare_block, lower_precision
from pytest_ckptparity.normalize import LogicalLeaf, NormalizedView
from pytest_ckptparity.read_plan import DEFAULT_READ_BUDGET, _Job, _plan_blocks, _read_as_stored, _run_jobs, _stored_pair, plan_leaf_in_step

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
        blocks, decodes, stored = _plan_blocks(extent, la, lb, itemsize, opts.read_budget)
        job = _Job(path, la, lb, tol, cast_to, layer_range, notes, blocks)
        job.stored = _stored_pair(va, vb, job, opts)
        job.as_stored = _read_as_stored(la, lb)
        job.in_step = plan_leaf_in_step(va, vb, job, extent, opts.read_budget, decodes, stored)
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


__all__ = ("CompareOptions", "Selection", "DEFAULT_TOLERANCES", "resolve_tolerance", "compare_block", "diff_views", "scoped_paths")
