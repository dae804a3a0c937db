"""Verdicts against a fingerprint: the same `LeafResult`s and `ParityReport` a comparison
gives, so the report, the helper and the plugin render them unchanged.

The rule, per leaf (per layer for a layer stack), with B the reference and the element rule
`|a_i - b_i| <= t_i = atol + rtol * |b_i|`:

1. equal digests: identical, pass;
2. exact leaves (integers, booleans, strings, or atol = rtol = 0): any digest difference
   fails, since any change is above tolerance and the digest sees every single-element change;
3. otherwise every statistic must stay within how far noise within tolerance can move it.
   With n finite elements, S = sum |b_i|, L = ||b||_2 and M = max |b_i|:

   - NaN, +inf, -inf counts: equal (NaN or inf never matches anything else)
   - min, max: atol + rtol * M           (each element moves at most t_i <= atol + rtol * M)
   - mean: T / n with T = n * atol + rtol * S   (the sum moves at most sum t_i = T)
   - sum |x|: T                          (| |a_i| - |b_i| | <= |a_i - b_i|)
   - L2: R = sqrt(n * atol^2 + 2 * atol * rtol * S + rtol^2 * L^2) = ||t||_2 (triangle inequality)
   - std: R / sqrt(n)                    (centering is a projection: it cannot lengthen a - b)

   These bounds are sharp, so noise within tolerance never fails. They cannot, though, catch
   every single-element change above tolerance: noise spread over many elements may move a
   sum as far as one large change. A single changed element is certain to be caught when it
   moves by more than the leaf's *resolution* `min(T, (max - min) + atol + rtol * M)` (the
   mean, or the min/max, moves past its allowance) or turns NaN/inf. Between its tolerance
   and the resolution, a change leaves the digest different and the statistics within
   tolerance: the leaf passes and the report says it is not bit-identical.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Iterable, Optional

from pytest_ckptparity._model import FINGERPRINT, NOT_BIT_IDENTICAL_NOTE, LeafResult, ParityReport, Tolerance, ValueStats
from pytest_ckptparity._paths import any_match, in_scope
from pytest_ckptparity.diff import CompareOptions, Selection, _kind, _structural, resolve_tolerance, scoped_paths
from pytest_ckptparity.fingerprint import _MASK, Fingerprint, FingerprintView, LeafPrint, Stats, fingerprint_view
from pytest_ckptparity.normalize import NormalizedView

SLACK = 1e-10  # float64 rounding of sums taken in different orders, relative to their scale
TOL_SLACK = 1e-6  # the element rule is evaluated in float32 for float32 data: its own rounding
SHOWN_UNITS = 4  # layers described in a failure note
SHOWN_STATS = 4
SHOWN_LOOSE = 5  # leaves named in the "not bit-identical" header note
NOT_BIT_IDENTICAL = "not bit-identical to the fingerprint"  # the header note a caller may turn into a warning


def allowances(b: Stats, tol: Tolerance) -> dict[str, float]:
    """How far each statistic of B may move under noise within tolerance (see the module doc)."""
    n = b.finite
    if not n or b.sum_abs is None:
        return {}
    atol, rtol = tol.atol, tol.rtol
    big = max(abs(b.min), abs(b.max))
    s, l2 = b.sum_abs, b.l2
    total = n * atol + rtol * s
    r = math.sqrt(n * atol * atol + 2 * atol * rtol * s + (rtol * l2) ** 2)
    widen = 1 + TOL_SLACK
    return {
        "min": (atol + rtol * big) * widen,
        "max": (atol + rtol * big) * widen,
        "mean": total / n * widen + SLACK * s / n,
        "sum_abs": total * widen + SLACK * s,
        "l2": r * widen + SLACK * l2,
        "std": r / math.sqrt(n) * widen + SLACK * (b.std + abs(b.mean)),
    }


def resolution(b: Stats, tol: Tolerance) -> float:
    """The smallest single-element change certain to move a statistic past its allowance."""
    allow = allowances(b, tol)
    if not allow:
        return 0.0
    return min(b.finite * allow["mean"], (b.max - b.min) + allow["max"])


def moved(a: Stats, b: Stats, tol: Optional[Tolerance]) -> list[tuple[str, Any, Any, float, float]]:
    """Statistics outside their allowance: (name, B value, A value, A - B, allowance).
    `tol` None: exact, every difference counts."""
    out: list[tuple[str, Any, Any, float, float]] = []
    for name in ("count", "nan", "posinf", "neginf"):
        va, vb = getattr(a, name), getattr(b, name)
        if va != vb:
            out.append((name, vb, va, float(va - vb), 0.0))
    allow = allowances(b, tol) if tol is not None else {}
    for name in ("min", "max", "mean", "std", "l2", "sum_abs"):
        va, vb = getattr(a, name), getattr(b, name)
        if va is None or vb is None:
            if (va is None) != (vb is None):
                out.append((name, vb, va, math.inf, 0.0))
            continue
        d = va - vb
        limit = allow.get(name, 0.0)
        if abs(d) > limit:
            out.append((name, vb, va, d, limit))
    return out


def _describe(unit: str, moves: list[tuple[str, Any, Any, float, float]]) -> str:
    def one(m: tuple[str, Any, Any, float, float]) -> str:
        name, vb, va, d, limit = m
        if name in ("count", "nan", "posinf", "neginf"):
            return f"{name} {vb} -> {va}"
        if vb is None or va is None:
            return f"{name} {vb} -> {va}"
        return f"{name} {vb:.6g} -> {va:.6g} (moved {d:+.3g}, allowed {limit:.3g})"

    shown = ", ".join(one(m) for m in moves[:SHOWN_STATS])
    more = f", +{len(moves) - SHOWN_STATS} more" if len(moves) > SHOWN_STATS else ""
    return f"{unit}: {shown}{more}"


def _compare_leaf(path: str, pa: LeafPrint, pb: LeafPrint, tol: Tolerance, digest_comparable: bool,
                  layer_range: Optional[tuple[int, int]], equal_nan: bool = True,
                  ) -> tuple[bool, list[str], tuple[int, ...], float, tuple[Optional[int], ...], float]:
    """(ok, notes, failing layers, largest move, units not bit-identical, resolution) for one
    leaf. A unit is a layer (its index) or the whole leaf (None).

    With `equal_nan=False` a NaN is never equal to anything, itself included, as in a
    comparison: a unit holding a NaN on either side fails even when its digest is unchanged."""
    exact = tol.exact or (tol.atol == 0 and tol.rtol == 0)
    units: list[tuple[Optional[int], int, int, Stats, Stats]] = []
    if pa.layers is not None and pb.layers is not None and pa.layers == pb.layers:
        lo, hi = layer_range if layer_range is not None else (0, pa.layers)
        for i in range(lo, hi):
            units.append((i, pa.layer_digests[i], pb.layer_digests[i], pa.layer_stats[i], pb.layer_stats[i]))
    else:
        units.append((None, pa.digest, pb.digest, pa.stats, pb.stats))
    notes: list[str] = []
    bad_layers: list[int] = []
    worst = 0.0
    loose: list[Optional[int]] = []
    res = 0.0
    for layer, da, db, sa, sb in units:
        if not equal_nan and (sa.nan or sb.nan):
            where = f"layer {layer}" if layer is not None else "leaf"
            notes.append(f"{where}: NaN {sb.nan} -> {sa.nan}; with equal_nan=False a NaN never matches, not even a NaN")
            if layer is not None:
                bad_layers.append(layer)
            worst = math.inf
            continue
        if digest_comparable and da == db:
            continue
        moves = moved(sa, sb, None if exact else tol)
        if exact and not moves:
            moves_text = "values differ (digest differs; every statistic is unchanged)"
        else:
            moves_text = ""
        if moves or exact:
            where = f"layer {layer}" if layer is not None else "leaf"
            notes.append(f"{where}: {moves_text}" if moves_text else _describe(where, moves))
            if layer is not None:
                bad_layers.append(layer)
            worst = max([worst] + [abs(m[3]) for m in moves if math.isfinite(m[3])])
        elif not exact:
            loose.append(layer)
            res = max(res, resolution(sb, tol))
    if len(notes) > SHOWN_UNITS:
        notes = notes[:SHOWN_UNITS] + [f"... and {len(notes) - SHOWN_UNITS} more layers"]
    return not notes, notes, tuple(bad_layers), worst, tuple(loose), res


def _units_text(units: tuple[Optional[int], ...]) -> str:
    """`layers 2, 5` / `layer 3` / `` (a whole leaf)."""
    layers = [u for u in units if u is not None]
    if not layers:
        return ""
    shown = ", ".join(str(u) for u in layers[:8]) + (f", ... ({len(layers)} layers)" if len(layers) > 8 else "")
    return f" in layer{'s' if len(layers) > 1 else ''} {shown}"


def _prints(view: NormalizedView, wanted: list[tuple[str, Optional[tuple[int, int]]]], opts: CompareOptions) -> tuple[dict[tuple[str, Optional[tuple[int, int]]], LeafPrint], dict[str, int]]:
    """Each wanted (path, layer range)'s print: from the file, or taken from the view now."""
    if isinstance(view, FingerprintView):
        fp = view.fingerprint
        return {(p, r): fp.leaves[p] for p, r in wanted if p in fp.leaves}, {}
    by_range: dict[Optional[tuple[int, int]], list[str]] = {}
    for p, r in wanted:
        if p in view.leaves:
            by_range.setdefault(r, []).append(p)
    out: dict[tuple[str, Optional[tuple[int, int]]], LeafPrint] = {}
    bytes_read: dict[str, int] = {}
    for r, paths in by_range.items():
        fp: Fingerprint = fingerprint_view(view, paths=paths, layer_range=r, read_budget=opts.read_budget)
        for p in paths:
            out[(p, r)] = fp.leaves[p]
            bytes_read[p] = bytes_read.get(p, 0) + fp.leaf_bytes.get(p, 0)
    return out, bytes_read


def diff_with_fingerprint(
    va: NormalizedView, vb: NormalizedView, opts: CompareOptions = CompareOptions(),
    selection: Optional[Iterable[Selection]] = None,
) -> ParityReport:
    """Compare two sides of which at least one is a fingerprint (the other is fingerprinted
    on the fly, reading each stored chunk once)."""
    t0 = time.perf_counter()
    paths, ignored = scoped_paths(va, vb, opts)
    scope_notes, outside = _fingerprint_scope(va, vb)
    kept = [p for p in paths if p not in outside]
    ignored += len(paths) - len(kept)
    if selection is None:
        wanted = [(p, None) for p in kept]
    else:
        wanted = [(p, sel.layer_range) for sel in selection for p in sel.paths if p not in outside]

    results: list[LeafResult] = []
    valued: list[tuple[int, str, Optional[tuple[int, int]], Any, Any, Optional[str], tuple[str, ...]]] = []
    for pos, (path, layer_range) in enumerate(wanted):
        la, lb = va.leaves.get(path), vb.leaves.get(path)
        done, cast_to, notes = _structural(path, la, lb, opts)
        if la is None or lb is None or la.layers is None or lb.layers is None:
            layer_range = None
        if done is not None:
            results.append(replace(done, layer_range=layer_range) if done.layers is not None else done)
            continue
        if not opts.compare_values:
            results.append(LeafResult(path, None, shape_a=la.shape, shape_b=lb.shape, dtype_a=la.dtype, dtype_b=lb.dtype, layers=la.layers, layer_range=layer_range, notes=notes))
            continue
        valued.append((len(results), path, layer_range, la, lb, cast_to, notes))
        results.append(None)  # type: ignore[arg-type] - filled below

    need = [(path, r) for _, path, r, *_ in valued]
    prints_a, bytes_a = _prints(va, need, opts) if valued else ({}, {})
    prints_b, bytes_b = _prints(vb, need, opts) if valued else ({}, {})
    loose: list[tuple[str, float]] = []
    for slot, path, layer_range, la, lb, cast_to, notes in valued:
        pa, pb = prints_a[(path, layer_range)], prints_b[(path, layer_range)]
        tol = resolve_tolerance(path, cast_to or la.dtype, opts)
        # A cast between float dtypes changes every bit pattern: only the statistics can agree.
        comparable = cast_to is None or _kind(cast_to) != "float"
        ok, why, layers, worst, changed, res = _compare_leaf(path, pa, pb, tol, comparable, layer_range, opts.equal_nan)
        count = pa.stats.count if layer_range is None else sum(pa.layer_stats[i].count for i in range(*layer_range))
        if ok and changed and not comparable:  # a cast changes every bit: expected, so no warning
            notes = notes + (f"{NOT_BIT_IDENTICAL_NOTE} (compared as {cast_to}: a cast changes the bits); statistics within tolerance",)
        elif ok and changed:
            notes = notes + (f"{NOT_BIT_IDENTICAL_NOTE}{_units_text(changed)}; statistics within tolerance (single-element resolution {res:.3g})",)
            loose.append((path + _units_text(changed), res))
        results[slot] = LeafResult(
            path, None if ok else FINGERPRINT, shape_a=la.shape, shape_b=lb.shape, dtype_a=la.dtype, dtype_b=lb.dtype,
            layers=la.layers if la.layers == lb.layers else None, layer_range=layer_range,
            stats=ValueStats(n_total=count, max_abs=worst, mismatched_layers=layers), tolerance=tol,
            notes=notes + tuple(why), bytes_read=bytes_a.get(path, 0) + bytes_b.get(path, 0),
        )
    report = ParityReport(
        names=(va.name, vb.name), layouts=(va.describe(), vb.describe()), results=results,
        ignored=ignored if selection is None else 0, values_compared=opts.compare_values,
    )
    report.statistics_only = True
    report.notes.extend(scope_notes)
    if loose:
        worst_res = max(r for _, r in loose)
        named = "; ".join(p for p, _ in loose[:SHOWN_LOOSE]) + (f"; and {len(loose) - SHOWN_LOOSE} more" if len(loose) > SHOWN_LOOSE else "")
        report.notes.append(
            f"{len(loose)} {'leaf is' if len(loose) == 1 else 'leaves are'} {NOT_BIT_IDENTICAL} but "
            f"{'its' if len(loose) == 1 else 'their'} statistics are within tolerance: {named} "
            f"(a fingerprint is certain to fail a single changed element only beyond each leaf's resolution, here up to {worst_res:.3g}; "
            f"atol=0, rtol=0 fails on any change)"
        )
    report.wall_time = time.perf_counter() - t0
    return report


def _fingerprint_scope(va: NormalizedView, vb: NormalizedView) -> tuple[list[str], set[str]]:
    """A fingerprint taken with include/exclude/ignore holds only that part of the model: the
    other side's leaves outside that scope are left out (and the report says so), instead of
    failing as present on one side only."""
    notes: list[str] = []
    outside: set[str] = set()
    for view, other in ((va, vb), (vb, va)):
        if not isinstance(view, FingerprintView):
            continue
        scope = view.fingerprint.scope
        who = view.name if view.name == "fingerprint" else f"{view.name}, a fingerprint,"
        if not scope.get("rngs") and any(p == "rngs" or p.startswith("rngs/") or "/rngs/" in p for p in other.leaves):
            notes.append(f"{who} was taken without RNG state ('ckptparity fingerprint --compare-rngs' takes it): the RNG leaves of "
                         f"{other.name} have nothing to be compared with")
        inc, exc, ign = tuple(scope.get("include", ())), tuple(scope.get("exclude", ())), tuple(scope.get("ignore", ()))
        if not (inc or exc or ign):
            continue
        out = {p for p in other.leaves if p not in view.leaves and not (in_scope(p, inc, exc) and not any_match(p, ign))}
        outside |= out
        desc = ", ".join(f"{k}={list(v)}" for k, v in (("include", inc), ("exclude", exc), ("ignore", ign)) if v)
        notes.append(f"{who} was taken with {desc}: {len(out)} leaves of {other.name} outside it are left out")
    return notes, outside


def is_fingerprint_view(view: Any) -> bool:
    return isinstance(view, FingerprintView)


__all__ = ("diff_with_fingerprint", "allowances", "resolution", "moved", "is_fingerprint_view")
