"""Turn a `ParityReport` into text: plain for logs and exception messages, rich for colour
terminals. Compares nothing; every number comes from the report.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any, Optional

from pytest_ckptparity._model import (
    DTYPE, FINGERPRINT, LAYOUT, NOT_BIT_IDENTICAL_NOTE, ONLY_IN_A, ONLY_IN_B, VALUES, LeafResult, ParityReport,
)

DEFAULT_MAX_ROWS = 20  # rows before "... and K more"; pytest -v raises it, -vv shows all


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def _index(index: tuple[int, ...], layered: bool) -> str:
    if layered and index:
        rest = index[1:]
        return f"[layer {index[0]}] index {tuple(rest)}" if rest else f"[layer {index[0]}]"
    return f"index {tuple(index)}"


def located_path(r: LeafResult) -> str:
    """The path with the layers a mismatch is in, e.g. `.../kernel [layer 1]`."""
    layers = r.stats.mismatched_layers if r.stats else ()
    if layers:
        shown = ", ".join(str(i) for i in layers[:8]) + (", ..." if len(layers) > 8 else "")
        return f"{r.path} [layer{'s' if len(layers) > 1 else ''} {shown}]"
    if r.layer_range is not None:
        lo, hi = r.layer_range
        return f"{r.path} [layer {lo}]" if hi == lo + 1 else f"{r.path} [layers {lo}-{hi - 1}]"
    return r.path


def _shape_dtype(r: LeafResult) -> str:
    a = f"{r.dtype_a} {tuple(r.shape_a)}" if r.shape_a is not None else "-"
    b = f"{r.dtype_b} {tuple(r.shape_b)}" if r.shape_b is not None else "-"
    return a if a == b else f"{a} vs {b}"


def kind_text(r: LeafResult, names: tuple[str, str] = ("A", "B")) -> str:
    """The kind of mismatch in the sides' own names: `only in linen` rather than `only in A`."""
    if r.kind == ONLY_IN_A:
        return f"only in {names[0]}"
    if r.kind == ONLY_IN_B:
        return f"only in {names[1]}"
    return r.kind or "match"


def describe_mismatch(r: LeafResult, names: tuple[str, str] = ("A", "B")) -> str:
    """One sentence for one mismatching leaf: counts, diffs, the worst element and values."""
    na, nb = names
    if r.kind == VALUES and r.stats is not None:
        s = r.stats
        layered = r.layers is not None
        pct = 100.0 * s.n_mismatch / s.n_total if s.n_total else 0.0
        parts = [f"{s.n_mismatch}/{s.n_total} ({pct:.3g}%) elements differ"]
        if s.n_nonfinite:
            who = "all" if s.n_nonfinite == s.n_mismatch else f"{s.n_nonfinite}"
            parts.append(f"{who} of them NaN/inf against a different value")
        if s.n_nan_pairs:
            who = "all" if s.n_nan_pairs == s.n_mismatch else f"{s.n_nan_pairs}"
            parts.append(f"{who} of them NaN against NaN (equal_nan=False)")
        finite_mismatches = s.n_mismatch - s.n_nonfinite - s.n_nan_pairs
        if finite_mismatches:
            parts.append(f"max abs diff {_num(s.max_abs)}, max rel diff {_num(s.max_rel)}")
        elif s.max_abs:
            parts.append(f"finite pairs within tolerance (max abs diff {_num(s.max_abs)})")
        if s.worst_index is not None:
            label = "worst at" if finite_mismatches else "at"
            parts.append(f"{label} {_index(s.worst_index, layered)}: {na}={_num(s.worst_a)} {nb}={_num(s.worst_b)}")
        if s.first_indices and 1 < s.n_mismatch < s.n_total:
            shown = ", ".join(_index(i, layered) for i in s.first_indices)
            parts.append(f"first at {shown}")
        if r.tolerance is not None:
            parts.append(r.tolerance.describe())
        text = "; ".join(parts)
    elif r.kind == FINGERPRINT:  # against a fingerprint: the notes say which statistics moved
        return f"{'; '.join(r.notes)}; {r.tolerance.describe() if r.tolerance else ''}".rstrip("; ")
    elif r.kind == "shape":
        text = f"shape {tuple(r.shape_a)} vs {tuple(r.shape_b)}"
    elif r.kind == "dtype":
        text = f"dtype {r.dtype_a} vs {r.dtype_b} (dtype_policy='cast' compares the values)"
    elif r.kind == LAYOUT:
        text = "layer layout differs, values not compared (a layer stack never matches a plain array or a stack on another axis)"
    else:
        text = f"present in {na if r.kind == ONLY_IN_A else nb} only"
    if r.notes:
        text += f" [{'; '.join(r.notes)}]"
    return text


def headroom_text(report: ParityReport) -> str:
    """`headroom 0.42 at path index (..)`: how close the closest element came to its tolerance."""
    if not report.values_compared or not report.results:
        return ""
    if report.statistics_only:  # a fingerprint holds no elements: say what was judged
        loose = sum(1 for r in report.results if r.ok and any(n.startswith(NOT_BIT_IDENTICAL_NOTE) for n in r.notes))
        if loose:
            return f"statistics within tolerance, {loose} {'leaf' if loose == 1 else 'leaves'} not bit-identical"
        return "every digest equal (bit-identical to the fingerprint)"
    h, leaf, index = report.headroom()
    if leaf is None:
        return "every value identical"
    where = f" {_index(index, leaf.layers is not None)}" if index else ""
    return f"headroom {_num(h)} of the allowance at {leaf.path}{where}"


def summary_line(report: ParityReport) -> str:
    na, nb = report.names
    n = len(report.results)
    if report.passed:
        what = ("leaf matches" if n == 1 else "leaves match") + ("" if report.values_compared else " in structure, shape and dtype")
        room = headroom_text(report)
        return f"checkpoint parity: {n} {what} ({na} vs {nb})" + (f"; {room}" if room else "")
    bad = report.mismatches
    first = ", ".join(f"{located_path(r)} ({kind_text(r, report.names)})" for r in bad[:3])
    more = f", +{len(bad) - 3} more" if len(bad) > 3 else ""
    hint = "; dtypes differ: dtype_policy='cast' compares the values" if any(r.kind == DTYPE for r in bad) else ""
    differ = "leaf differs" if n == 1 else "leaves differ"
    return f"checkpoint parity failed: {len(bad)} of {n} {differ}: {first}{more}{hint}"


def side_line(report: ParityReport, side: int) -> str:
    """`A: Linen TrainState, scanned on axis 1, at /runs/linen/7/items (step 7)`."""
    name, layout = report.names[side], report.layouts[side]
    location = report.locations[side] if len(report.locations) > side else ""
    step = report.steps[side] if len(report.steps) > side else None
    text = f"{name}: {layout}" if layout else ""
    if location and not location.startswith("<"):
        text = (text + ", at " if text else f"{name}: ") + location
    if step is not None:
        text = (text or f"{name}:") + f" (step {step})"
    return text


def _header(report: ParityReport) -> list[str]:
    lines = [side_line(report, 0), side_line(report, 1), *report.notes]
    if report.ignored:
        why = " (RNG state among them: it is left out by default; compare_rngs / ignore_rngs=False includes it)" if report.rngs_ignored else ""
        lines.append(f"{report.ignored} {'leaf' if report.ignored == 1 else 'leaves'} left out by scope or layout rules{why}")
    return [l for l in lines if l]


MORE_HINT = "use -vv or max_rows=None to see all"

# --------------------------------------------------------------------------------------
# The per-layer strip: one cell per layer of a failing layer stack, coloured by headroom
# --------------------------------------------------------------------------------------

STRIP_CELLS = 96  # a deeper stack shows the worst of several layers per cell
STRIP_LEVELS = ((0.0, ".", "grey50"), (0.1, "-", "green"), (1.0, "+", "yellow"), (float("inf"), "#", "bold red"))
STRIP_LEGEND = ". identical  - below 0.1 of the tolerance  + up to the tolerance  # beyond it"


def _strip_level(h: float) -> tuple[str, str]:
    for bound, char, style in STRIP_LEVELS:
        if h <= bound:
            return char, style
    return STRIP_LEVELS[-1][1:]


def strip_cells(r: LeafResult) -> tuple[list[tuple[str, str]], int]:
    """(char, rich style) per cell and how many layers one cell covers."""
    drift = r.stats.layer_drift if r.stats else ()
    per = max(1, -(-len(drift) // STRIP_CELLS))
    cells = [_strip_level(max(d.headroom for d in drift[i:i + per])) for i in range(0, len(drift), per)]
    return cells, per


def strip_leaves(report: ParityReport, max_rows: Optional[int]) -> list[LeafResult]:
    """The failing layer stacks among the rows shown."""
    bad = report.mismatches if max_rows is None else report.mismatches[:max_rows]
    return [r for r in bad if r.kind == VALUES and r.stats is not None and r.stats.layer_drift]


def strip_caption(r: LeafResult, per: int) -> str:
    drift = r.stats.layer_drift if r.stats else ()
    worst = max(drift, key=lambda d: d.headroom)
    first, last = drift[0].layer, drift[-1].layer
    span = f"layers {first}-{last}" + (f", {per} per cell" if per > 1 else "")
    return f"{span}; worst layer {worst.layer}: headroom {_num(worst.headroom)}, max abs diff {_num(worst.max_abs)}"


def layer_strip_lines(report: ParityReport, max_rows: Optional[int] = DEFAULT_MAX_ROWS) -> list[str]:
    """Plain text: `  path  |..#.|  layers 0-3; worst layer 2: headroom 41, max abs diff 0.5`."""
    leaves = strip_leaves(report, max_rows)
    if not leaves:
        return []
    lines = ["per-layer headroom (" + STRIP_LEGEND + "):"]
    for r in leaves:
        cells, per = strip_cells(r)
        lines.append(f"  {r.path}  |{''.join(c for c, _ in cells)}|  {strip_caption(r, per)}")
    return lines


def render_plain(
    report: ParityReport, max_rows: Optional[int] = DEFAULT_MAX_ROWS, *, more_hint: str = MORE_HINT, layer_strips: bool = False,
) -> str:
    lines = [summary_line(report), *_header(report)]
    bad = report.mismatches
    shown = bad if max_rows is None else bad[:max_rows]
    for r in shown:
        lines.append(f"  {located_path(r)}  [{kind_text(r, report.names)}] {_shape_dtype(r)}: {describe_mismatch(r, report.names)}")
    if len(shown) < len(bad):
        lines.append(f"  ... and {len(bad) - len(shown)} more ({more_hint})")
    if layer_strips:
        lines.extend(layer_strip_lines(report, max_rows))
    return "\n".join(lines)


def render_rich(
    report: ParityReport, max_rows: Optional[int] = DEFAULT_MAX_ROWS, *, color: bool = True, width: int = 160,
    more_hint: str = MORE_HINT, layer_strips: bool = False,
) -> str:
    """A rich table as text (ANSI colours when `color`). Every cell is literal text: a path
    such as `kernel [layer 1]` is never read as rich markup."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=color, no_color=not color, width=width, highlight=False, soft_wrap=False)
    style = "bold green" if report.passed else "bold red"
    console.print(Text(summary_line(report), style=style))
    for line in _header(report):
        console.print(Text(line, style="dim"))
    bad = report.mismatches
    if bad:
        table = Table(show_header=True, header_style="bold", expand=False, show_lines=False)
        table.add_column("path", overflow="fold")
        table.add_column("kind", style="red")
        table.add_column("shape / dtype", overflow="fold")
        table.add_column("what differs", overflow="fold")
        shown = bad if max_rows is None else bad[:max_rows]
        for r in shown:
            table.add_row(Text(located_path(r)), Text(kind_text(r, report.names)), Text(_shape_dtype(r)), Text(describe_mismatch(r, report.names)))
        console.print(table)
        if len(shown) < len(bad):
            console.print(Text(f"... and {len(bad) - len(shown)} more ({more_hint})"))
    if layer_strips:
        _print_layer_strips(console, report, max_rows)
    return buf.getvalue().rstrip("\n")


def _print_layer_strips(console: Any, report: ParityReport, max_rows: Optional[int]) -> None:
    """One coloured cell per layer of each failing stack, the worst layer named."""
    from rich.text import Text

    leaves = strip_leaves(report, max_rows)
    if not leaves:
        return
    legend = Text()
    legend.append("per-layer headroom: ", style="bold")
    for _, char, style in STRIP_LEVELS:
        legend.append("\u2588", style=style)
    legend.append(" identical, below 0.1, up to, beyond the tolerance", style="dim")
    console.print(legend)
    for r in leaves:
        cells, per = strip_cells(r)
        line = Text(f"  {r.path}  ")
        for _, style in cells:
            line.append("\u2588", style=style)
        line.append(f"  {strip_caption(r, per)}", style="dim")
        console.print(line)


def color_terminal(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM", "") != "dumb"


def render(
    report: ParityReport, *, color: Optional[bool] = None, max_rows: Optional[int] = DEFAULT_MAX_ROWS, more_hint: str = MORE_HINT,
    layer_strips: bool = False,
) -> str:
    """The report as text: a rich table with colours on a colour terminal (or `color=True`),
    plain text otherwise. `max_rows` caps the mismatch rows (None: all). `layer_strips` adds
    one line per failing layer stack: a cell per layer coloured by headroom (the CLI's)."""
    if color is None:
        color = color_terminal()
    if color:
        return render_rich(report, max_rows, color=True, more_hint=more_hint, layer_strips=layer_strips)
    return render_plain(report, max_rows, more_hint=more_hint, layer_strips=layer_strips)


# --------------------------------------------------------------------------------------
# The JSON report (docs/json-schema.md): one document shape for the CLI and a pytest run
# --------------------------------------------------------------------------------------

JSON_SCHEMA = 1


def comparison_record(report: ParityReport, *, test: Optional[str] = None, expected_failure: bool = False) -> dict[str, Any]:
    """One comparison of the JSON report: `ParityReport.to_dict()` plus the test that ran it."""
    record = report.to_dict()
    record["test"] = test
    record["expected_failure"] = bool(expected_failure) and not report.passed
    return record


def _max_abs(leaf: dict[str, Any]) -> float:
    v = (leaf.get("stats") or {}).get("max_abs", 0.0)
    return float(v) if isinstance(v, (int, float)) else float("inf")


def _headroom_of(leaf: dict[str, Any]) -> float:
    v = (leaf.get("stats") or {}).get("headroom", 0.0)
    try:
        return float(v)  # "inf" for an exact leaf that differs (JSON has no infinity)
    except (TypeError, ValueError):
        return 0.0


def run_totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the comparisons of a run.

    Comparisons a test expected to fail (it passed although a `CkptParityError` was raised,
    e.g. inside `pytest.raises`) are counted apart and never as mismatches. Leaves are counted
    once per checkpoint pair even when generated items split a layer stack between them.
    """
    counted = [r for r in records if not r.get("expected_failure")]
    outcome: dict[tuple, str] = {}
    for r in counted:
        pair = (tuple(r.get("names") or ()), tuple(r.get("locations") or ()))
        for leaf in r.get("leaves", []):
            key = (pair, leaf["path"])
            if not leaf.get("ok"):
                outcome[key] = leaf.get("kind") or "values"
            else:
                outcome.setdefault(key, "match")
    by_outcome: dict[str, int] = {}
    for kind in outcome.values():
        by_outcome[kind] = by_outcome.get(kind, 0) + 1
    worst, worst_test = None, None
    for r in counted:
        if r.get("passed"):
            continue
        for leaf in r.get("leaves", []):
            if not leaf.get("ok") and (worst is None or _max_abs(leaf) > _max_abs(worst)):
                worst, worst_test = leaf, r.get("test")
    loose = len({((tuple(r.get("names") or ()), tuple(r.get("locations") or ())), leaf["path"])
                 for r in counted if r.get("statistics_only") for leaf in r.get("leaves", [])
                 if leaf.get("ok") and any(str(n).startswith(NOT_BIT_IDENTICAL_NOTE) for n in leaf.get("notes") or ())})
    room, room_test = None, None
    for r in counted:
        for leaf in r.get("leaves", []):
            if leaf.get("ok") and _headroom_of(leaf) > (_headroom_of(room) if room else 0.0):
                room, room_test = leaf, r.get("test")
    return {
        "comparisons": len(records),
        "comparisons_passed": sum(1 for r in records if r.get("passed")),
        "comparisons_failed": sum(1 for r in counted if not r.get("passed")),
        "comparisons_expected_to_fail": len(records) - len(counted),
        "leaves_compared": len(outcome),
        "leaves_mismatched": sum(n for k, n in by_outcome.items() if k != "match"),
        "leaves_by_outcome": dict(sorted(by_outcome.items())),
        "bytes_read": sum(int(l.get("bytes_read") or 0) for r in records for l in r.get("leaves", [])),
        "wall_time_s": round(sum(float((r.get("totals") or {}).get("wall_time_s") or 0.0) for r in records), 6),
        "worst_leaf": worst["path"] if worst else None,
        "worst_kind": (worst.get("kind") or "values") if worst else None,
        "worst_test": worst_test if worst else None,
        "headroom": _headroom_of(room) if room else 0.0,
        "headroom_leaf": room["path"] if room else None,
        "headroom_index": (room.get("stats") or {}).get("headroom_index") if room else None,
        "headroom_test": room_test if room else None,
        "values_compared": any(r.get("values_compared", True) for r in records),
        "statistics_only": bool(records) and all(r.get("statistics_only") for r in records),
        "leaves_not_bit_identical": loose,
        "passed": all(r.get("passed") for r in counted),
    }


def summary_lines(totals: dict[str, Any]) -> list[tuple[str, bool]]:
    """The terminal summary of a pytest run: (line, whether it reports a failure)."""
    t = totals
    parts = [f"{t['comparisons_passed']} passed", f"{t['comparisons_failed']} failed"]
    if t.get("comparisons_expected_to_fail"):
        parts.append(f"{t['comparisons_expected_to_fail']} failed as their tests expected")
    labels = {"match": "match", "values": "values differ", "shape": "shapes differ", "dtype": "dtypes differ", "layout": "layer layouts differ", "statistics": "statistics moved"}
    outcomes = ", ".join(f"{n} {labels.get(kind, kind)}" for kind, n in sorted(t["leaves_by_outcome"].items(), key=lambda kv: (kv[0] != "match", kv[0])))
    lines = [
        (f"comparisons: {t['comparisons']} ({', '.join(parts)})", False),
        (f"leaves: {t['leaves_compared']} compared" + (f" ({outcomes})" if outcomes else ""), False),
        (f"bytes read: {t['bytes_read']:,}  wall time in comparisons: {t['wall_time_s']:.3f} s", False),
    ]
    workers = t.get("workers") or {}
    if workers:  # which xdist workers (hosts) compared what: every host reads its own subtrees
        each = "; ".join(f"{w} on {d['host']}: {d['comparisons']} comparisons, {d['bytes_read']:,} bytes" for w, d in workers.items())
        lines.append((f"workers that ran comparisons: {len(workers)} ({each})", False))
    if t["worst_leaf"]:
        lines.append((f"worst leaf: {t['worst_leaf']} ({t['worst_kind']}) in {t['worst_test'] or 'a comparison outside tests'}", True))
    if t["headroom_leaf"]:
        index = t.get("headroom_index")
        where = f" index {tuple(index)}" if index else ""
        test = f" in {t['headroom_test']}" if t.get("headroom_test") else ""
        lines.append((f"headroom: {_num(float(t['headroom']))} of the allowance at {t['headroom_leaf']}{where}{test} (closest to tolerance among matching leaves)", False))
    elif t.get("values_compared") and t["leaves_by_outcome"].get("match") and not t.get("statistics_only"):
        lines.append(("headroom: 0 (every value of the matching leaves is identical)", False))
    if t.get("leaves_not_bit_identical"):
        n = t["leaves_not_bit_identical"]
        lines.append((f"fingerprints: {n} matching {'leaf is' if n == 1 else 'leaves are'} not bit-identical to the fingerprint "
                      f"(statistics within tolerance; a fingerprint has no per-element headroom)", False))
    elif t.get("statistics_only") and t["leaves_by_outcome"].get("match"):
        lines.append(("fingerprints: every matching leaf is bit-identical to its fingerprint (every digest equal)", False))
    return lines


def json_document(records: list[dict[str, Any]], *, tool: str, totals: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The whole JSON report: schema version, totals, then every comparison."""
    import time

    from pytest_ckptparity import __version__

    return {
        "schema": JSON_SCHEMA,
        "tool": tool,
        "version": __version__,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "totals": totals if totals is not None else run_totals(records),
        "comparisons": records,
    }


__all__ = (
    "render", "render_plain", "render_rich", "summary_line", "describe_mismatch", "located_path", "kind_text",
    "headroom_text", "layer_strip_lines", "DEFAULT_MAX_ROWS", "JSON_SCHEMA", "comparison_record", "run_totals", "json_document", "summary_lines",
)
