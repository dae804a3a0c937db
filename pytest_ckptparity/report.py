"""Turn a `ParityReport` into text: plain for logs and exception messages, rich for colour
terminals. Compares nothing; every number comes from the report.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any, Optional

from pytest_ckptparity._model import FINGERPRINT, VALUES, LeafResult, ParityReport

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


def describe_mismatch(r: LeafResult, names: tuple[str, str] = ("A", "B")) -> str:
    """One sentence for one mismatching leaf: counts, diffs, the worst element and values."""
    na, nb = names
    if r.kind == VALUES and r.stats is not None:
        s = r.stats
        pct = 100.0 * s.n_mismatch / s.n_total if s.n_total else 0.0
        parts = [f"{s.n_mismatch}/{s.n_total} ({pct:.3g}%) elements differ"]
        if s.n_nonfinite:
            parts.append(f"{s.n_nonfinite} of them NaN/inf against a different value")
        parts.append(f"max abs diff {_num(s.max_abs)}, max rel diff {_num(s.max_rel)}")
        if s.worst_index is not None:
            layered = r.layers is not None
            parts.append(f"worst at {_index(s.worst_index, layered)}: {na}={_num(s.worst_a)} {nb}={_num(s.worst_b)}")
        if s.first_indices and s.n_mismatch > 1:
            shown = ", ".join(_index(i, r.layers is not None) for i in s.first_indices)
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
    else:
        text = f"present in {na if r.kind == 'only in A' else nb} only"
    if r.notes:
        text += f" [{'; '.join(r.notes)}]"
    return text


def summary_line(report: ParityReport) -> str:
    na, nb = report.names
    n = len(report.results)
    if report.passed:
        what = "leaves match" if report.values_compared else "leaves match in structure, shape and dtype"
        return f"checkpoint parity: {n} {what} ({na} vs {nb})"
    bad = report.mismatches
    first = ", ".join(f"{located_path(r)} ({r.kind})" for r in bad[:3])
    more = f", +{len(bad) - 3} more" if len(bad) > 3 else ""
    return f"checkpoint parity failed: {len(bad)} of {n} leaves differ: {first}{more}"


def _header(report: ParityReport) -> list[str]:
    na, nb = report.names
    la, lb = report.layouts
    lines = [f"{na}: {la}" if la else "", f"{nb}: {lb}" if lb else "", *report.notes]
    if report.ignored:
        lines.append(f"{report.ignored} leaves left out by scope or layout rules (rngs are ignored by default)")
    return [l for l in lines if l]


def render_plain(report: ParityReport, max_rows: Optional[int] = DEFAULT_MAX_ROWS) -> str:
    lines = [summary_line(report), *_header(report)]
    bad = report.mismatches
    shown = bad if max_rows is None else bad[:max_rows]
    for r in shown:
        lines.append(f"  {located_path(r)}  [{r.kind}] {_shape_dtype(r)}: {describe_mismatch(r, report.names)}")
    if len(shown) < len(bad):
        lines.append(f"  ... and {len(bad) - len(shown)} more (use -vv or max_rows=None to see all)")
    return "\n".join(lines)


def render_rich(report: ParityReport, max_rows: Optional[int] = DEFAULT_MAX_ROWS, *, color: bool = True, width: int = 160) -> str:
    """A rich table as text (ANSI colours when `color`)."""
    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=color, no_color=not color, width=width, highlight=False, soft_wrap=False)
    style = "bold green" if report.passed else "bold red"
    console.print(summary_line(report), style=style, markup=False)
    for line in _header(report):
        console.print(line, style="dim", markup=False)
    bad = report.mismatches
    if bad:
        table = Table(show_header=True, header_style="bold", expand=False, show_lines=False)
        table.add_column("path", overflow="fold")
        table.add_column("kind", style="red")
        table.add_column("shape / dtype", overflow="fold")
        table.add_column("what differs", overflow="fold")
        shown = bad if max_rows is None else bad[:max_rows]
        for r in shown:
            table.add_row(located_path(r), r.kind or "", _shape_dtype(r), describe_mismatch(r, report.names))
        console.print(table)
        if len(shown) < len(bad):
            console.print(f"... and {len(bad) - len(shown)} more (use -vv or max_rows=None to see all)", markup=False)
    return buf.getvalue().rstrip("\n")


def color_terminal(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM", "") != "dumb"


def render(report: ParityReport, *, color: Optional[bool] = None, max_rows: Optional[int] = DEFAULT_MAX_ROWS) -> str:
    """Rich with colours on a colour terminal, plain text otherwise."""
    if color is None:
        color = color_terminal()
    return render_rich(report, max_rows, color=True) if color else render_plain(report, max_rows)


__all__ = ("render", "render_plain", "render_rich", "summary_line", "describe_mismatch", "located_path", "DEFAULT_MAX_ROWS")
