"""Pictures of a comparison: the JSON report document in, one self-contained HTML page out.

A renderer beside `report.py`: it compares nothing and reads no checkpoint. Its only input is
the document `report.json_document(...)` makes, so the CLI and a pytest run (whose records come
from xdist workers) draw the same page. The figures are plotly's: interactive hover and zoom
come with it, and `plotly.js` is embedded once in the page, so the file opens offline.
`plotly` is an optional extra (`pip install 'pytest-ckptparity[html]'`), imported only here,
only when a page is written.

`item_fragment` draws the small per-test picture attached to pytest-html reports: a plain HTML
table coloured by headroom, no script, so a report with hundreds of tests stays light.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from pytest_ckptparity._model import FINGERPRINT
from pytest_ckptparity._outputs import check_output_file
from pytest_ckptparity.errors import CkptParityUsageError

INSTALL_HINT = "pip install 'pytest-ckptparity[html]'"
# The colour scale spans 1e-6 .. 1e4 of the allowance (log10); beyond, colours saturate and the
# hover still shows the true figure. 1.0 (log 0) is the tolerance: the scale turns red there.
LOG_MIN, LOG_MAX = -6.0, 4.0
_AT_TOLERANCE = (0.0 - LOG_MIN) / (LOG_MAX - LOG_MIN)
COLOR_STOPS = (
    (0.0, (234, 244, 236)),
    (0.35, (150, 208, 160)),
    (_AT_TOLERANCE - 1e-3, (246, 213, 92)),
    (_AT_TOLERANCE, (240, 138, 75)),
    (1.0, (155, 28, 28)),
)
IDENTICAL_COLOR = "#dcdce4"  # a layer with every element equal (headroom 0): no colour on a log scale
WORST_LEAVES = 20  # bars in the worst-leaves chart
STEP_LINES = 10  # leaves drawn in the per-step chart
TABLE_ROWS = 1000  # mismatch rows on the page before "... and K more"
FRAGMENT_ROWS = 40  # layered leaves in a pytest-html fragment
NOTES_SHOWN = 20  # header notes of a section before "... and K more"
FINGERPRINT_LAYOUT = "fingerprint of "  # how a fingerprint side describes itself (FingerprintView.describe)
STATISTICS_ONLY = "compared with a fingerprint: statistics only, no per-element figures"


def require_plotly() -> None:
    """Fail in one sentence before any work when the optional plotting library is missing."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        raise CkptParityUsageError(f"the HTML report needs plotly, which is not installed: {INSTALL_HINT}") from None


def check_output_path(path: str, option: str) -> None:
    """A page path that is empty, a folder, or in a missing folder is a usage error up front."""
    check_output_file(path, option, "report.html", thing="page")


# --------------------------------------------------------------------------------------
# The figures, as plain numbers gathered from the document
# --------------------------------------------------------------------------------------


def _num(v: Any) -> float:
    """A JSON figure: numbers, or the strings "inf" / "nan" JSON cannot hold as numbers."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return math.inf if f != f else f  # a NaN headroom can only come from a mismatch: show it as the worst


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}"


def step_label(steps: Any) -> Optional[str]:
    """`7`, or `5 vs 7` when the sides were opened at different steps; None without steps."""
    sa, sb = (list(steps or []) + [None, None])[:2]
    if sa is None and sb is None:
        return None
    return str(sa if sb is None else sb) if sa in (None, sb) or sb is None else f"{sa} vs {sb}"


def _step_sort_key(label: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in label.split(" vs "))


def _pair_locations(record: dict[str, Any]) -> tuple[str, ...]:
    """Each side's manager root when the record names a step, so one pair read at several
    steps stays one pair: `/runs/a/checkpoints/3/items` -> `/runs/a/checkpoints`. A record of
    a step one side lacks carries the roots already."""
    if record.get("missing_step") is not None:
        return tuple(str(loc) for loc in record.get("locations") or ["", ""])
    out = []
    steps = list(record.get("steps") or []) + [None, None]
    for loc, step in zip(record.get("locations") or ["", ""], steps):
        loc = str(loc)
        if step is not None:
            at = loc.rfind(f"/{step}/")
            if at >= 0:
                loc = loc[:at]
            elif loc.endswith(f"/{step}"):
                loc = loc[: -len(str(step)) - 1]
        out.append(loc)
    return tuple(out)


def compared_with_fingerprint(record: dict[str, Any]) -> bool:
    """A side of the comparison was a fingerprint: each leaf's (and layer's) statistics were
    compared, not its elements, so the record has no elementwise figures (its 0s mean nothing).
    Records say so (`statistics_only`); older documents are recognised by a side's layout."""
    if record.get("statistics_only"):
        return True
    return any(str(layout).startswith(FINGERPRINT_LAYOUT) for layout in record.get("layouts") or ()) or any(
        leaf.get("kind") == FINGERPRINT for leaf in record.get("leaves") or ())


@dataclass
class Section:
    """The comparisons of one pair of checkpoints (at one or several steps)."""

    names: tuple[str, ...]
    layouts: tuple[str, ...]
    locations: tuple[str, ...]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps(self) -> list[str]:
        labels = {step_label(r.get("steps")) for r in self.records}
        return sorted((l for l in labels if l is not None), key=_step_sort_key)

    @property
    def last_step(self) -> Optional[str]:
        """The last step that was compared (a step one side lacks has no leaves to draw)."""
        compared = [s for s in self.steps if any(r.get("leaves") for r in self.records_at(s))]
        return (compared or self.steps or [None])[-1]

    def records_at(self, step: Optional[str]) -> list[dict[str, Any]]:
        if step is None:
            return self.records
        return [r for r in self.records if step_label(r.get("steps")) == step]

    @property
    def passed(self) -> bool:
        return all(r.get("passed") or r.get("expected_failure") for r in self.records)

    @property
    def with_fingerprint(self) -> bool:
        return any(compared_with_fingerprint(r) for r in self.records)

    @property
    def tests(self) -> list[str]:
        """The test ids that made the records, in order (none from the command line)."""
        return list(dict.fromkeys(str(r["test"]) for r in self.records if r.get("test")))

    def notes(self) -> list[str]:
        """The comparisons' header notes (scope, layout fallbacks, "not bit-identical" ...),
        once each; prefixed by their step when the section holds several."""
        several = len(self.steps) > 1
        out: dict[str, None] = {}
        for r in self.records:
            if r.get("missing_step") is not None:  # said in its own sentence
                continue
            step = step_label(r.get("steps"))
            for note in r.get("notes") or []:
                out[f"step {step}: {note}" if several and step else str(note)] = None
        return list(out)


def sections(document: dict[str, Any]) -> list[Section]:
    """The document's comparisons grouped by pair, in the order they first appear."""
    out: dict[tuple, Section] = {}
    for r in document.get("comparisons") or []:
        key = (tuple(r.get("names") or ()), _pair_locations(r))
        if key not in out:
            out[key] = Section(tuple(r.get("names") or ("A", "B")), tuple(r.get("layouts") or ("", "")), key[1])
        out[key].records.append(r)
    return list(out.values())


def layer_grid(records: Iterable[dict[str, Any]]) -> dict[str, dict[int, tuple[float, float, float]]]:
    """path -> layer -> (max_abs, max_rel, headroom), the largest over the records (generated
    items split a stack between them; each brings its own layers)."""
    grid: dict[str, dict[int, tuple[float, float, float]]] = {}
    for r in records:
        for leaf in r.get("leaves") or []:
            drift = (leaf.get("stats") or {}).get("layer_drift") or []
            if not drift:
                continue
            row = grid.setdefault(leaf["path"], {})
            for d in drift:
                new = (_num(d.get("max_abs")), _num(d.get("max_rel")), _num(d.get("headroom")))
                old = row.get(int(d["layer"]))
                row[int(d["layer"])] = new if old is None else tuple(max(x, y) for x, y in zip(old, new))  # type: ignore[assignment]
    return dict(sorted(grid.items()))


@dataclass
class LeafFigures:
    path: str
    headroom: float = 0.0
    max_abs: float = 0.0
    max_rel: float = 0.0
    n_mismatch: int = 0
    n_total: int = 0
    ok: bool = True


def leaf_figures(records: Iterable[dict[str, Any]]) -> dict[str, LeafFigures]:
    """path -> the leaf's largest figures over the records (a split stack counts once)."""
    out: dict[str, LeafFigures] = {}
    for r in records:
        for leaf in r.get("leaves") or []:
            f = out.setdefault(leaf["path"], LeafFigures(leaf["path"]))
            s = leaf.get("stats") or {}
            f.headroom = max(f.headroom, _num(s.get("headroom")))
            f.max_abs = max(f.max_abs, _num(s.get("max_abs")))
            f.max_rel = max(f.max_rel, _num(s.get("max_rel")))
            f.n_mismatch += int(s.get("n_mismatch") or 0)
            f.n_total += int(s.get("n_total") or 0)
            f.ok = f.ok and bool(leaf.get("ok"))
    return out


def first_step_outside(section: Section) -> Optional[tuple[int, list[Any]]]:
    """The first step at which a leaf left its tolerance and every leaf that did then (each
    a `trajectory.FirstDrift`: path, out-of-tolerance layers, figures). The same reading as
    the command line's and pytest's summary, from the same records."""
    from pytest_ckptparity.trajectory import first_drifts

    drifts = first_drifts(section.records)
    if not drifts:
        return None
    return drifts[0].step, [d for d in drifts if d.step == drifts[0].step]


# --------------------------------------------------------------------------------------
# Colours (shared by the plotly scale and the script-free fragment)
# --------------------------------------------------------------------------------------


def _position(h: float) -> float:
    z = LOG_MAX if math.isinf(h) else math.log10(h)
    return min(1.0, max(0.0, (z - LOG_MIN) / (LOG_MAX - LOG_MIN)))


def headroom_color(h: float) -> str:
    """The page's colour for a headroom (grey for an identical layer), as `#rrggbb`."""
    if h <= 0:
        return IDENTICAL_COLOR
    t = _position(h)
    for (p0, c0), (p1, c1) in zip(COLOR_STOPS, COLOR_STOPS[1:]):
        if t <= p1:
            w = 0.0 if p1 == p0 else (t - p0) / (p1 - p0)
            return "#" + "".join(f"{round(a + (b - a) * w):02x}" for a, b in zip(c0, c1))
    return "#" + "".join(f"{c:02x}" for c in COLOR_STOPS[-1][1])


TEXT_COLORS = ("#000000", "#ffffff")  # black, not the page's grey-black: 4.5:1 on every colour of the scale


def _luminance(color: str) -> float:
    """WCAG relative luminance of `#rrggbb`."""
    def channel(v: int) -> float:
        c = v / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def contrast_ratio(a: str, b: str) -> float:
    """WCAG contrast ratio of two `#rrggbb` colours (1 .. 21; 4.5 reads as body text)."""
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def text_color(background: str) -> str:
    """The text colour that reads best on a cell's background: dark on light, white on dark red."""
    return max(TEXT_COLORS, key=lambda c: contrast_ratio(c, background))


def _plotly_scale() -> list[list[Any]]:
    return [[p, f"rgb{c}"] for p, c in COLOR_STOPS]


def _log_ticks() -> tuple[list[float], list[str]]:
    vals = [float(v) for v in range(int(LOG_MIN), int(LOG_MAX) + 1, 2)]
    text = ["1 = tolerance" if v == 0 else f"1e{int(v)}" for v in vals]
    return vals, text


# --------------------------------------------------------------------------------------
# plotly figures
# --------------------------------------------------------------------------------------

_e = html.escape  # every user string (paths, names, locations, test ids) goes through this


def heatmap_figure(grid: dict[str, dict[int, tuple[float, float, float]]], title: str) -> Any:
    """Headroom by layered leaf (rows) and layer (columns), log colour scale, hover figures."""
    import plotly.graph_objects as go

    paths = list(grid)
    n_layers = 1 + max((max(row) for row in grid.values() if row), default=-1)
    z: list[list[Optional[float]]] = []
    custom: list[list[list[str]]] = []
    for path in paths:
        zr, cr = [], []
        for layer in range(n_layers):
            cell = grid[path].get(layer)
            if cell is None:
                zr.append(None)
                cr.append([str(layer), "not compared", "-", "-"])
                continue
            a, rel, h = cell
            zr.append(None if h <= 0 else (LOG_MAX if math.isinf(h) else max(LOG_MIN, min(LOG_MAX, math.log10(h)))))
            cr.append([str(layer), _fmt(a), _fmt(rel), "0 (identical)" if h <= 0 else _fmt(h)])
        z.append(zr)
        custom.append(cr)
    vals, text = _log_ticks()
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_layers)), y=[_e(p) for p in paths], customdata=custom,
        colorscale=_plotly_scale(), zmin=LOG_MIN, zmax=LOG_MAX, xgap=1, ygap=1, hoverongaps=True,
        colorbar={"title": {"text": "headroom"}, "tickvals": vals, "ticktext": text},
        hovertemplate="%{y}<br>layer %{customdata[0]}<br>max abs %{customdata[1]}<br>max rel %{customdata[2]}<br>headroom %{customdata[3]}<extra></extra>",
    ))
    fig.update_layout(
        title={"text": _e(title)}, plot_bgcolor=IDENTICAL_COLOR, height=max(260, 80 + 22 * len(paths)),
        margin={"l": 10, "r": 10, "t": 50, "b": 40},
        # Axes spelled out: when every layer is identical every cell is a gap, and plotly would
        # otherwise infer neither the rows nor the layers from the data.
        xaxis={"title": {"text": "layer"}, "dtick": 1 if n_layers <= 40 else None, "showgrid": False, "zeroline": False,
               "range": [-0.5, n_layers - 0.5]},
        yaxis={"automargin": True, "showgrid": False, "zeroline": False,
               "type": "category", "categoryorder": "array", "categoryarray": [_e(p) for p in paths],
               "tickmode": "array", "tickvals": [_e(p) for p in paths], "range": [len(paths) - 0.5, -0.5]},
    )
    return fig


def worst_leaves_figure(figures: dict[str, LeafFigures], title: str) -> Optional[Any]:
    """The leaves closest to (or furthest beyond) their tolerance, as bars on a log axis."""
    import plotly.graph_objects as go

    drifted = sorted((f for f in figures.values() if f.headroom > 0), key=lambda f: -f.headroom)[:WORST_LEAVES]
    if not drifted:
        return None
    finite = [f.headroom for f in drifted if not math.isinf(f.headroom)]
    cap = max([10.0 ** LOG_MAX, *(10 * h for h in finite)])
    drifted.reverse()  # the worst on top
    fig = go.Figure(go.Bar(
        x=[cap if math.isinf(f.headroom) else f.headroom for f in drifted], y=[_e(f.path) for f in drifted], orientation="h",
        marker={"color": [headroom_color(f.headroom) for f in drifted], "line": {"color": "#555", "width": 0.5}},
        customdata=[[_fmt(f.headroom), _fmt(f.max_abs), _fmt(f.max_rel), f"{f.n_mismatch}/{f.n_total}", "match" if f.ok else "MISMATCH"] for f in drifted],
        hovertemplate="%{y}<br>headroom %{customdata[0]} (%{customdata[4]})<br>max abs %{customdata[1]}<br>max rel %{customdata[2]}<br>elements differ %{customdata[3]}<extra></extra>",
    ))
    fig.add_vline(x=1.0, line={"color": "#9b1c1c", "dash": "dash"})
    # On a log axis plotly places annotations by log10 of the value: 0 is the line at 1.
    fig.add_annotation(x=0.0, xref="x", y=1.0, yref="paper", yanchor="bottom", showarrow=False, text="tolerance", font={"color": "#9b1c1c"})
    fig.update_layout(
        title={"text": _e(title)}, height=max(260, 90 + 24 * len(drifted)), margin={"l": 10, "r": 10, "t": 50, "b": 40},
        xaxis={"type": "log", "exponentformat": "power", "title": {"text": "headroom: |a-b| / (atol + rtol*|b|), largest element"}}, yaxis={"automargin": True},
        plot_bgcolor="white",
    )
    return fig


def steps_figure(section: Section) -> Optional[Any]:
    """Headroom per step (x), one line per leaf: the leaves that drifted most over the run."""
    import plotly.graph_objects as go

    steps = section.steps
    if len(steps) < 2:
        return None
    per_step = {s: leaf_figures(section.records_at(s)) for s in steps}
    grids = {s: layer_grid(section.records_at(s)) for s in steps}
    peak: dict[str, float] = {}
    for figs in per_step.values():
        for path, f in figs.items():
            peak[path] = max(peak.get(path, 0.0), f.headroom)
    shown = [p for p, h in sorted(peak.items(), key=lambda kv: -kv[1]) if h > 0][:STEP_LINES]
    if not shown:
        return None
    numeric = all(s.isdigit() for s in steps)
    x = [int(s) for s in steps] if numeric else steps
    fig = go.Figure()
    finite = [f.headroom for figs in per_step.values() for f in figs.values() if 0 < f.headroom < math.inf]
    cap = max([10.0 ** LOG_MAX, *(10 * h for h in finite)])
    for path in shown:
        ys, custom = [], []
        for s in steps:
            f = per_step[s].get(path)
            h = f.headroom if f else 0.0
            ys.append(None if h <= 0 else (cap if math.isinf(h) else h))
            grid = grids[s].get(path, {})
            worst = max(grid.items(), key=lambda kv: kv[1][2])[0] if grid and any(v[2] > 0 for v in grid.values()) else None
            custom.append([s, _fmt(h), _fmt(f.max_abs) if f else "-", "-" if worst is None else str(worst)])
        fig.add_trace(go.Scatter(
            x=x, y=ys, mode="lines+markers", name=_e(path), customdata=custom, connectgaps=False,
            hovertemplate=_e(path) + "<br>step %{customdata[0]}<br>headroom %{customdata[1]}<br>max abs %{customdata[2]}<br>worst layer %{customdata[3]}<extra></extra>",
        ))
    fig.add_hline(y=1.0, line={"color": "#9b1c1c", "dash": "dash"})
    fig.add_annotation(x=0.0, xref="paper", xanchor="left", y=0.0, yref="y", yanchor="bottom", showarrow=False, text="tolerance", font={"color": "#9b1c1c"})
    fig.update_layout(
        title={"text": "headroom per step (the leaves that drifted most)"}, height=420, margin={"l": 10, "r": 10, "t": 50, "b": 40},
        xaxis={"title": {"text": "step"}, "type": "linear" if numeric else "category", **({"tickvals": x} if numeric and len(x) <= 20 else {})},
        yaxis={"type": "log", "title": {"text": "headroom"}, "exponentformat": "power"}, plot_bgcolor="white",
        showlegend=True, legend={"font": {"size": 10}},  # plotly hides a one-line legend: the line would name no leaf
    )
    return fig


def steps_layer_figure(section: Section) -> Optional[Any]:
    """Headroom per step (columns) and layer (rows): the largest over the layered leaves."""
    import plotly.graph_objects as go

    steps = section.steps
    if len(steps) < 2:
        return None
    per_step: dict[str, dict[int, float]] = {}
    for s in steps:
        layers: dict[int, float] = {}
        for row in layer_grid(section.records_at(s)).values():
            for layer, (_, _, h) in row.items():
                layers[layer] = max(layers.get(layer, 0.0), h)
        per_step[s] = layers
    n_layers = 1 + max((max(v) for v in per_step.values() if v), default=-1)
    if n_layers <= 0:
        return None
    z, custom = [], []
    for layer in range(n_layers):
        zr, cr = [], []
        for s in steps:
            h = per_step[s].get(layer)
            zr.append(None if not h else (LOG_MAX if math.isinf(h) else max(LOG_MIN, min(LOG_MAX, math.log10(h)))))
            cr.append([s, str(layer), "not compared" if h is None else "0 (identical)" if h == 0 else _fmt(h)])
        z.append(zr)
        custom.append(cr)
    vals, text = _log_ticks()
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"step {s}" for s in steps], y=list(range(n_layers)), customdata=custom, colorscale=_plotly_scale(),
        zmin=LOG_MIN, zmax=LOG_MAX, xgap=1, ygap=1, colorbar={"title": {"text": "headroom"}, "tickvals": vals, "ticktext": text},
        hovertemplate="step %{customdata[0]}<br>layer %{customdata[1]}<br>headroom %{customdata[2]} (worst layered leaf)<extra></extra>",
    ))
    fig.update_layout(
        title={"text": "headroom per step and layer (the worst layered leaf of each layer)"}, plot_bgcolor=IDENTICAL_COLOR,
        height=max(260, 90 + 20 * n_layers), margin={"l": 10, "r": 10, "t": 50, "b": 40},
        xaxis={"type": "category", "showgrid": False, "zeroline": False},
        yaxis={"title": {"text": "layer"}, "autorange": "reversed", "dtick": 1 if n_layers <= 40 else None, "showgrid": False, "zeroline": False},
    )
    return fig


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #1e1e28; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
.verdict-pass { color: #1a7f37; } .verdict-fail { color: #b31d28; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #d0d0d8; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f2f2f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.mismatches { max-width: 100%; }
table.mismatches td { overflow-wrap: break-word; }
h2 .which { font-weight: normal; font-size: 0.8em; color: #444; }
ul.notes { color: #333; font-size: 0.9em; padding-left: 1.2em; }
.note { color: #555; font-size: 0.9em; }
.figure { margin: 1em 0; }
"""


def _breakable(text: str) -> str:
    """Escaped, with line-break opportunities after `/` and `::`: a long path or test id wraps
    between its names instead of pushing the table out of the window."""
    return _e(text).replace("::", "::<wbr>").replace("/", "/<wbr>")


def _nowrap(text: str) -> str:
    """Escaped and kept on one line (a number, a shape, `atol=1e-05`). Inline style: the table
    also sits in pytest-html reports, which do not have this page's CSS."""
    return f'<span style="white-space:nowrap">{_e(text)}</span>'


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _summary(document: dict[str, Any]) -> str:
    t = document.get("totals") or {}
    passed = bool(t.get("passed"))
    verdict = "parity" if passed else "parity failed"
    rows = [
        ("comparisons", f"{t.get('comparisons', 0)} ({t.get('comparisons_passed', 0)} passed, {t.get('comparisons_failed', 0)} failed)"),
        ("leaves", f"{t.get('leaves_compared', 0)} compared, {t.get('leaves_mismatched', 0)} differ"),
        ("bytes read", f"{int(t.get('bytes_read') or 0):,}"),
    ]
    if t.get("worst_leaf"):
        rows.append(("worst leaf", f"{t['worst_leaf']} ({t.get('worst_kind')})" + (f" in {t['worst_test']}" if t.get("worst_test") else "")))
    if t.get("headroom_leaf"):
        rows.append(("headroom of matching leaves", f"{_fmt(_num(t.get('headroom')))} of the allowance at {t['headroom_leaf']}"))
    rows.append(("written", f"{document.get('written', '')} by {document.get('tool', '')} {document.get('version', '')}"))
    return f'<p class="verdict-{"pass" if passed else "fail"}"><b>{_e(verdict)}</b></p>' + _kv_table(rows)


def _sides(section: Section) -> str:
    """Each side's name, layout and location; its step when the section holds one step."""
    first = section.records[0]
    several = len(section.steps) > 1
    locations = section.locations if several else tuple(first.get("locations") or ())
    steps = list(first.get("steps") or []) + [None, None]
    rows = []
    for i in (0, 1):
        name = section.names[i] if len(section.names) > i else "AB"[i]
        what = section.layouts[i] if len(section.layouts) > i else ""
        if len(locations) > i and locations[i]:
            what += f", at {locations[i]}"
        if not several and steps[i] is not None:
            what += f" (step {steps[i]})"
        rows.append((name, what))
    if several:
        rows.append(("steps", ", ".join(section.steps)))
    return _kv_table(rows)


def _located(leaf: dict[str, Any]) -> str:
    layers = (leaf.get("stats") or {}).get("mismatched_layers") or []
    if layers:
        shown = ", ".join(str(i) for i in layers[:8]) + (", ..." if len(layers) > 8 else "")
        return f"{leaf['path']} [layer{'s' if len(layers) > 1 else ''} {shown}]"
    return leaf["path"]


def _shape_dtype(leaf: dict[str, Any]) -> str:
    """HTML: `float32 (2, 16, 32)`, or both sides' when they differ, each kept on one line."""
    a = f"{leaf.get('dtype_a')} {tuple(leaf['shape_a'])}" if leaf.get("shape_a") is not None else "-"
    b = f"{leaf.get('dtype_b')} {tuple(leaf['shape_b'])}" if leaf.get("shape_b") is not None else "-"
    return _nowrap(a) if a == b else f"{_nowrap(a)} vs {_nowrap(b)}"


def _kind(leaf: dict[str, Any], names: tuple[str, ...]) -> str:
    kind = leaf.get("kind") or "match"
    if kind == "only in A" and names:
        return f"only in {names[0]}"
    if kind == "only in B" and len(names) > 1:
        return f"only in {names[1]}"
    return kind


def _tolerance(leaf: dict[str, Any]) -> str:
    """HTML: `atol=1e-05, rtol=1.3e-06`, wrapping only between the two."""
    t = leaf.get("tolerance") or {}
    if not t:
        return "-"
    if t.get("exact"):
        return "exact"
    atol, rtol = _num(t.get("atol")), _num(t.get("rtol"))
    return f"{_nowrap(f'atol={atol:g},')} {_nowrap(f'rtol={rtol:g}')}"


def mismatch_table(records: list[dict[str, Any]], names: tuple[str, ...], *, max_rows: int = TABLE_ROWS, tests: bool = True) -> str:
    """Every mismatching leaf of the records: where, what kind, how far (and which test)."""
    with_steps = len({step_label(r.get("steps")) for r in records}) > 1
    with_tests = tests and any(r.get("test") for r in records)
    rows = [(r, leaf) for r in records for leaf in r.get("leaves") or [] if not leaf.get("ok")]
    if not rows:
        return '<p class="note">No leaf differs.</p>'
    by_stats = {id(r): compared_with_fingerprint(r) for r in records}  # once per record, not per row
    figured = any((leaf.get("stats") or {}) and not by_stats[id(r)] for r, leaf in rows)
    figures = ["elements differ", "max abs", "max rel", "headroom"] if figured else [
        "statistics that moved" if any(by_stats[id(r)] for r, _ in rows) else "notes"]
    head = (["step"] if with_steps else []) + (["test"] if with_tests else []) + ["path", "kind", "shape / dtype", *figures, "tolerance"]
    span = {} if figured else {figures[0]: ' colspan="4"'}  # one column of notes under the four figures' place
    out = ['<table class="mismatches"><tr>' + "".join(f"<th{span.get(h, '')}>{h}</th>" for h in head) + "</tr>"]
    for r, leaf in rows[:max_rows]:
        s = leaf.get("stats") or {}
        h = _num(s.get("headroom"))
        cells: list[tuple[str, str]] = [("", _e(step_label(r.get("steps")) or "-"))] if with_steps else []
        if with_tests:
            cells.append(("", _breakable(str(r.get("test") or "-")) + (" (expected to fail)" if r.get("expected_failure") else "")))
        cells += [("", _breakable(_located(leaf))), ("", _e(_kind(leaf, names))), ("", _shape_dtype(leaf))]
        num = ' class="num" style="white-space:nowrap"'
        if s and not by_stats[id(r)]:
            total = int(s.get("n_total") or 0)
            n = int(s.get("n_mismatch") or 0)
            pct = f" ({100.0 * n / total:.3g}%)" if total else ""
            bg = headroom_color(h)
            cells += [(num, f"{n}/{total}{pct}"), (num, _fmt(_num(s.get("max_abs")))), (num, _fmt(_num(s.get("max_rel")))),
                      (f'{num[:-1]};background:{bg};color:{text_color(bg)}"', _fmt(h))]
        else:
            # No elementwise figures: against a fingerprint the notes say which statistics moved
            # (its 0/N and 0 headroom would read as "identical"); a structural mismatch has none.
            cells.append((' colspan="4" class="why"', _e("; ".join(str(n) for n in leaf.get("notes") or []) or "-")))
        cells.append(("", _tolerance(leaf)))
        out.append("<tr>" + "".join(f"<td{attrs}>{text}</td>" for attrs, text in cells) + "</tr>")
    out.append("</table>")
    if len(rows) > max_rows:
        out.append(f'<p class="note">... and {len(rows) - max_rows} more (the JSON report holds every leaf).</p>')
    return "".join(out)


def _figure_div(fig: Any, div_id: str) -> str:
    return '<div class="figure">' + fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False}) + "</div>"


def _which(i: int, section: Section) -> str:
    """What tells a section apart from others of the same names: its test, else its number."""
    tests = section.tests
    if not tests:
        return f"comparison {i + 1}"
    return tests[0] + (f" and {len(tests) - 1} more test{'s' if len(tests) > 2 else ''}" if len(tests) > 1 else "")


def _no_bars_sentence(records: list[dict[str, Any]], at: str) -> str:
    """Why there is no bar chart: never "identical" when a leaf failed."""
    if any(r.get("values_compared") is False for r in records):
        return f"Values were not compared{at} (structure only), so there is no drift to draw."
    if any(not leaf.get("ok") for r in records for leaf in r.get("leaves") or []):
        return f"No value compared element by element has drifted{at}; the leaves below differ in structure (see their kind)."
    return f"Every compared value is identical{at}: no leaf has drifted."


def _section_html(i: int, section: Section, which: str = "") -> str:
    na, nb = (list(section.names) + ["A", "B"])[:2]
    step = section.last_step if len(section.steps) > 1 else None
    at = f" at step {step}" if step is not None else ""
    verdict = "parity" if section.passed else "parity failed"
    label = f' <span class="which">({_breakable(which)})</span>' if which else ""
    parts = [f'<section id="pair-{i}"><h2>{_e(na)} vs {_e(nb)}{label}: <span class="verdict-{"pass" if section.passed else "fail"}">{verdict}</span></h2>', _sides(section)]
    notes = section.notes()
    if notes:
        more = [f"... and {len(notes) - NOTES_SHOWN} more (the JSON report holds them all)"] if len(notes) > NOTES_SHOWN else []
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes[:NOTES_SHOWN] + more) + "</ul>")
    first = first_step_outside(section) if len(section.steps) > 1 else None
    if first is not None:
        from pytest_ckptparity.trajectory import drift_line

        first_step, drifts = first
        shown = drift_line(drifts).split(": ", 1)[1]  # word for word the terminal summary's line
        parts.append(f'<p class="first-drift"><b>First step outside tolerance: step {first_step}</b>: {_e(shown)}</p>')
    for r in section.records:  # a step committed on one side only: no comparison, a sentence
        if r.get("missing_step") is not None:
            parts.append(f'<p class="verdict-fail">{_e("; ".join(r.get("notes") or []))}</p>')
    if len(section.steps) > 1:
        for fig, kind in ((steps_figure(section), "steps"), (steps_layer_figure(section), "steps-layers")):
            if fig is not None:
                parts.append(_figure_div(fig, f"{kind}-{i}"))
    records = section.records_at(step)
    grid = layer_grid(records)
    if section.with_fingerprint:
        parts.append(f'<p class="note fingerprint"><b>{STATISTICS_ONLY[0].upper() + STATISTICS_ONLY[1:]}</b>: each leaf and layer was '
                     "compared by its count, NaN and inf counts, min, max, mean, std and norms, so there is no per-layer heatmap and no "
                     "headroom chart; the table says which statistics moved.</p>")
    elif grid:
        parts.append(_figure_div(heatmap_figure(grid, f"headroom by layer{at}: |a-b| / (atol + rtol*|b|), grey = identical"), f"heatmap-{i}"))
    else:
        parts.append('<p class="note">No layer stacks were compared here, so there is no per-layer heatmap.</p>')
    if not section.with_fingerprint:
        bars = worst_leaves_figure(leaf_figures(records), f"the {WORST_LEAVES} leaves closest to or beyond tolerance{at}")
        parts.append(_figure_div(bars, f"worst-{i}") if bars is not None else f'<p class="note">{_e(_no_bars_sentence(records, at))}</p>')
    parts.append(f"<h3>Mismatches{' (every step)' if len(section.steps) > 1 else ''}</h3>")
    parts.append(mismatch_table(section.records, section.names))
    parts.append("</section>")
    return "\n".join(parts)


def render_page(document: dict[str, Any]) -> str:
    """The whole page as one HTML string; plotly.js is embedded once (no network when viewed)."""
    require_plotly()
    from plotly.offline import get_plotlyjs

    secs = sections(document)
    body = ["<h1>Checkpoint parity: drift report</h1>", _summary(document)]
    if not secs:
        body.append('<p class="note">The report holds no comparison.</p>')
    shared = {n for n in (s.names for s in secs) if sum(1 for t in secs if t.names == n) > 1}
    body += [_section_html(i, s, _which(i, s) if s.names in shared else "") for i, s in enumerate(secs)]
    title = "checkpoint parity" + (" (failed)" if not (document.get("totals") or {}).get("passed", True) else "")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{CSS}</style>"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_page(document: dict[str, Any], path: str) -> Path:
    """Write the page; returns its path."""
    out = Path(path)
    page = render_page(document)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as e:
        raise CkptParityUsageError(f"cannot write the HTML report {path!r}: {e.strerror or e}.") from None
    return out


# --------------------------------------------------------------------------------------
# The per-test fragment for pytest-html (no script, no plotly)
# --------------------------------------------------------------------------------------


def item_fragment(records: list[dict[str, Any]]) -> str:
    """A small picture of a test's comparisons: per layered leaf a row of cells coloured by
    headroom (hover: the figures), then the mismatch table. Plain HTML, a few KB."""
    out = ['<div class="ckptparity-extra">']
    for r in records:
        names = tuple(r.get("names") or ("A", "B"))
        t = r.get("totals") or {}
        step = step_label(r.get("steps"))
        verdict = "parity" if r.get("passed") else "parity failed"
        colour = "#1a7f37" if r.get("passed") else "#b31d28"
        figures = STATISTICS_ONLY if compared_with_fingerprint(r) else f"headroom {_fmt(_num(t.get('headroom')))}"
        line = f"{t.get('leaves_compared', 0)} leaves, {t.get('leaves_mismatched', 0)} differ, {figures}"
        out.append(f'<p><b style="color:{colour}">{verdict}</b> {_e(names[0])} vs {_e(names[-1])}' + (f" at step {_e(step)}" if step else "") + f": {_e(line)}</p>")
        for note in r.get("notes") or []:
            out.append(f'<p style="margin:0 0 0 1em;font-size:90%">{_e(str(note))}</p>')
        grid = layer_grid([r])
        if grid:
            rows = sorted(grid.items(), key=lambda kv: -max((v[2] for v in kv[1].values()), default=0.0))[:FRAGMENT_ROWS]
            rows.sort()
            out.append('<table class="ckptparity-layers" style="border-collapse:collapse;font-size:11px"><tr><th>headroom by layer</th></tr>')
            for path, row in rows:
                cells = []
                for layer in sorted(row):
                    a, rel, h = row[layer]
                    tip = f"layer {layer}: max abs {_fmt(a)}, max rel {_fmt(rel)}, headroom {_fmt(h)}"
                    cells.append(f'<td title="{_e(tip)}" style="background:{headroom_color(h)};width:12px;height:12px;border:1px solid #fff;padding:0"></td>')
                worst = max(row.items(), key=lambda kv: kv[1][2])
                label = f"worst layer {worst[0]}: {_fmt(worst[1][2])}" if worst[1][2] > 0 else "identical"
                out.append(f"<tr><td style=\"padding-right:6px\">{_e(path)}</td>{''.join(cells)}<td style=\"padding-left:6px\">{_e(label)}</td></tr>")
            out.append("</table>")
        if not r.get("passed"):
            out.append(mismatch_table([r], names, max_rows=50, tests=False))  # the test is the row it sits in
    out.append("</div>")
    return "\n".join(out)


__all__ = ("render_page", "write_page", "item_fragment", "sections", "layer_grid", "leaf_figures", "first_step_outside",
           "headroom_color", "require_plotly", "check_output_path", "INSTALL_HINT")
