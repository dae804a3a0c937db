"""The public entry points: `assert_ckpt_parity`, `compare_checkpoints` and `Comparison`.

Flow: sources (open, metadata) -> normalize (canonical view) -> diff (results) -> report
(text). Option values are checked here, once, so every caller (helper, pytest options, CLI)
gets the same one-sentence usage errors.
"""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence, Union

from pytest_ckptparity import _run_hooks
from pytest_ckptparity._model import ParityReport
from pytest_ckptparity._run_hooks import add_report_listener, remove_report_listener  # noqa: F401 - public here too
from pytest_ckptparity._paths import glob_match
from pytest_ckptparity.diff import DEFAULT_READ_BUDGET, DTYPE_POLICIES, CompareOptions, Selection, diff_views, scoped_paths
from pytest_ckptparity.errors import CkptParityError, CkptParityUsageError, CkptParityWarning
from pytest_ckptparity.normalize import Layout, NormalizedView, normalize
from pytest_ckptparity.read_plan import chunk_alignment
from pytest_ckptparity.report import render
from pytest_ckptparity.sources import Checkpoint, manager_steps
from pytest_ckptparity.sources import open_checkpoint as open_source
from pytest_ckptparity.trajectory import ALL, COMMON, TrajectoryReport, describe_spec, missing_sentence, parse_steps, plan_steps, render_trajectory

if TYPE_CHECKING:  # pragma: no cover
    from pytest_ckptparity.fingerprint import Fingerprint

SPLITS = ("group", "layer", "leaf")



# --------------------------------------------------------------------------------------
# Option checking
# --------------------------------------------------------------------------------------


def _caller_level() -> int:
    """The `stacklevel` that points a warning at the first frame outside this package (the
    user's test or script), however deep inside the package it is raised."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1  # the function about to warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _check_tol(name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise CkptParityUsageError(f"{name} must be a non-negative number, got {value!r}.") from None
    if not math.isfinite(f) or f < 0:
        raise CkptParityUsageError(f"{name} must be a non-negative number, got {value!r}.")
    return f


def _globs(name: str, value: Union[str, Iterable[str], None]) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise CkptParityUsageError(f"{name} must be a glob or a list of globs, got {value!r}.") from None
    if not all(isinstance(v, str) and v for v in out):
        raise CkptParityUsageError(f"{name} must hold non-empty glob strings, got {value!r}.")
    return out


def _tolerance_map(value: Optional[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    if not value:
        return {}
    if not isinstance(value, Mapping):
        raise CkptParityUsageError(f"tolerances must map globs to dict(atol=..., rtol=...), got {value!r}.")
    out: dict[str, dict[str, float]] = {}
    for pattern, tol in value.items():
        if not isinstance(tol, Mapping) or not tol or set(tol) - {"atol", "rtol"}:
            raise CkptParityUsageError(f"tolerances[{pattern!r}] must be a dict with atol and/or rtol, got {tol!r}.")
        out[str(pattern)] = {k: _check_tol(f"tolerances[{pattern!r}][{k!r}]", v) for k, v in tol.items()}
    return out


# The keyword arguments of `make_options`: callers holding every helper keyword in one dict
# (the pytest plugin) split it with this.
OPTION_NAMES = ("atol", "rtol", "tolerances", "include", "exclude", "compare_values", "equal_nan", "dtype_policy", "read_budget")


def make_options(
    *, atol: Any = None, rtol: Any = None, tolerances: Optional[Mapping[str, Mapping[str, float]]] = None,
    include: Any = None, exclude: Any = None, compare_values: bool = True, equal_nan: bool = True,
    dtype_policy: str = "strict", read_budget: int = DEFAULT_READ_BUDGET,
) -> CompareOptions:
    """Validated `CompareOptions`; bad values raise `CkptParityUsageError` with one sentence."""
    if dtype_policy not in DTYPE_POLICIES:
        raise CkptParityUsageError(f"dtype_policy must be one of {', '.join(DTYPE_POLICIES)}, got {dtype_policy!r}.")
    if not isinstance(read_budget, int) or isinstance(read_budget, bool) or read_budget <= 0:
        raise CkptParityUsageError(f"read_budget must be a positive number of bytes, got {read_budget!r}.")
    return CompareOptions(
        atol=_check_tol("atol", atol), rtol=_check_tol("rtol", rtol), tolerances=_tolerance_map(tolerances),
        include=_globs("include", include), exclude=_globs("exclude", exclude),
        compare_values=bool(compare_values), equal_nan=bool(equal_nan), dtype_policy=dtype_policy,
        read_budget=read_budget,
    )


def _rename_rules(rename: Any) -> tuple[tuple[str, str], ...]:
    rules = tuple(tuple(r) for r in (rename or ()))
    for rule in rules:
        if len(rule) != 2 or not all(isinstance(x, str) for x in rule):
            raise CkptParityUsageError(f"rename must be a list of (pattern, replacement) string pairs, got {rename!r}.")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise CkptParityUsageError(f"rename pattern {rule[0]!r} is not a valid regular expression ({e}).") from None
    return rules


def _scan_axes(scan_axis: Any) -> tuple[Optional[int], Optional[int]]:
    """`scan_axis=1` for both sides, `(1, 0)` per side; None keeps the recorded or default axis."""
    pair = tuple(scan_axis) if isinstance(scan_axis, (tuple, list)) else (scan_axis, scan_axis)
    if len(pair) != 2 or not all(a is None or (isinstance(a, int) and not isinstance(a, bool) and a >= 0) for a in pair):
        raise CkptParityUsageError(f"scan_axis must be a non-negative integer or a pair (axis of A, axis of B), got {scan_axis!r}.")
    return pair  # type: ignore[return-value]


def parse_scan_axis(source: str, text: str) -> Union[int, tuple[int, int]]:
    """`1` (both sides) or `0,1` (A's axis, B's axis), as `--scan-axis` / `--ckpt-scan-axis` take it."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) in (1, 2) and all(p.isdigit() for p in parts):
        axes = tuple(int(p) for p in parts)
        return axes[0] if len(axes) == 1 else axes  # type: ignore[return-value]
    raise CkptParityUsageError(f"{source} must be an axis for both sides or two axes 'A,B' (e.g. {source} 0,1), got {text!r}.")


def _check_step(name: str, value: Any) -> Optional[int]:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise CkptParityUsageError(f"{name} must be a non-negative integer, got {value!r}.")
    return value


def _is_url(x: Any) -> bool:
    return isinstance(x, str) and "://" in x


def _storage_options(value: Any, a: Any, b: Any) -> tuple[Optional[dict[str, str]], Optional[dict[str, str]]]:
    """Storage options go to the sides that are object-store URLs."""
    if not value:
        return None, None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CkptParityUsageError(f"storage_options must map option names to strings, got {value!r}.")
    if not (_is_url(a) or _is_url(b)):
        raise CkptParityUsageError("storage options apply to object-store URLs (gs://, s3://), but neither checkpoint is one; drop them or pass a URL.")
    opts = dict(value)
    return (opts if _is_url(a) else None), (opts if _is_url(b) else None)


def parse_key_values(source: str, items: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (--storage-option, --ckpt-storage-option) as a dict."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CkptParityUsageError(f"{source} {item!r} must read KEY=VALUE, e.g. {source} endpoint=http://127.0.0.1:9000.")
        out[key.strip()] = value
    return out


# --------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------


class Comparison:
    """Two checkpoints opened and normalized (metadata only), ready to compare in parts."""

    def __init__(
        self, a: Any, b: Any, *, names: Sequence[str] = ("A", "B"), step: Optional[int] = None,
        step_a: Optional[int] = None, step_b: Optional[int] = None,
        format_a: Union[str, Layout, None] = None, format_b: Union[str, Layout, None] = None,
        rename: Sequence[tuple[str, str]] = (), ignore: Sequence[str] = (), ignore_rngs: bool = True,
        scan_axis: Union[int, tuple[Optional[int], Optional[int]], None] = None, options: Optional[CompareOptions] = None,
        storage_options: Optional[Mapping[str, str]] = None,
    ) -> None:
        if len(tuple(names)) != 2 or not all(isinstance(n, str) and n for n in names):
            raise CkptParityUsageError(f"names must be two non-empty strings, got {names!r}.")
        axes = _scan_axes(scan_axis)
        _check_step("step", step)
        step_a = _check_step("step_a", step_a if step_a is not None else step)
        step_b = _check_step("step_b", step_b if step_b is not None else step)
        na, nb = names
        self.options = options or CompareOptions()
        rules = _rename_rules(rename)
        ignore_globs = _globs("ignore", ignore)
        so_a, so_b = _storage_options(storage_options, a, b)
        self.checkpoints = (
            open_checkpoint(a, step=step_a, name=na, **({"storage_options": so_a} if so_a else {})),
            open_checkpoint(b, step=step_b, name=nb, **({"storage_options": so_b} if so_b else {})),
        )
        if isinstance(scan_axis, (tuple, list)):  # an axis per side: a fingerprint side has none to choose
            for side, ckpt, axis in zip((na, nb), self.checkpoints, axes):
                if axis is not None and getattr(ckpt, "is_fingerprint", False):
                    raise CkptParityUsageError(
                        f"{side}: '{ckpt.location}' is a fingerprint file, whose layer stacks were laid out layer first when it was "
                        f"taken; give the scan axis of the checkpoint side only (scan_axis=N), or take the fingerprint again with its own.")
        kw = dict(rename=rules, ignore=ignore_globs, ignore_rngs=ignore_rngs)
        self.views: tuple[NormalizedView, NormalizedView] = (
            _normalize(self.checkpoints[0], format_a, {**kw, "scan_axis": axes[0]}),
            _normalize(self.checkpoints[1], format_b, {**kw, "scan_axis": axes[1]}),
        )
        # Explicit names win; otherwise an opened checkpoint (a fixture) keeps its own name.
        for view, default, explicit in zip(self.views, ("A", "B"), (na, nb)):
            if explicit != default:
                view.display_name = explicit
        self.ignore_rngs = ignore_rngs
        self.notes: list[str] = self._check_scope()
        for ckpt, view, chosen in zip(self.checkpoints, self.views, (step_a, step_b)):
            newer = tuple(getattr(ckpt, "uncommitted_newer", ()) or ())
            if newer and chosen is None:  # a step asked for by number is what the user wants
                root = getattr(ckpt, "requested", None) or ckpt.location
                steps = ", ".join(str(s) for s in newer)
                note = (f"{view.name}: compared step {ckpt.step} of {root}, its latest committed step; newer step "
                        f"{steps} {'is' if len(newer) == 1 else 'are'} not committed (still being written, or abandoned)")
                self.notes.append(note)
                warnings.warn(CkptParityWarning(note), stacklevel=_caller_level())

    def _check_scope(self) -> list[str]:
        """No typo goes green: every include glob and every tolerance glob must match a leaf, and
        the scope must leave something to compare. Returns header notes (exclude globs that matched nothing)."""
        va, vb = self.views
        left_out = set(va.ignored) | set(vb.ignored)
        union = sorted((set(va.leaves) | set(vb.leaves)) - left_out)
        groups = ", ".join(sorted({p.split("/")[0] for p in union})) or "none"
        where = f"{va.name} or {vb.name}"
        opts = self.options
        for pattern in opts.include:
            if not any(glob_match(p, pattern) for p in union):
                why = ""
                if any(glob_match(p, pattern) for p in left_out):
                    why = " (it matches only leaves left out by default or by ignore rules, such as RNG state: pass ignore_rngs=False / --compare-rngs)"
                raise CkptParityUsageError(
                    f"include glob {pattern!r} matches no leaf of {where}{why}; the top-level groups are: {groups}. "
                    f"Check its spelling (`ckptparity inspect PATH` lists every path).")
        every = set(union) | left_out
        for pattern in opts.tolerances:
            if not any(glob_match(p, pattern) for p in every):
                raise CkptParityUsageError(
                    f"tolerance glob {pattern!r} matches no leaf of {where}, so its atol/rtol would apply nowhere; the top-level "
                    f"groups are: {groups}. Check its spelling (`ckptparity inspect PATH` lists every path).")
        if not union:
            raise CkptParityUsageError(f"nothing to compare: neither {where} holds a leaf (after the layout's ignore rules); a comparison that compares nothing never passes.")
        kept, _ = scoped_paths(va, vb, opts)
        if not kept:
            scope = ", ".join([f"include={list(opts.include)!r}"] * bool(opts.include) + [f"exclude={list(opts.exclude)!r}"] * bool(opts.exclude))
            raise CkptParityUsageError(f"the scope ({scope}) leaves no leaf of {where} to compare; the top-level groups are: {groups}. A comparison that compares nothing never passes.")
        notes = []
        for pattern in opts.exclude:
            if not any(glob_match(p, pattern) for p in union):
                notes.append(f"exclude glob {pattern!r} matched nothing (top-level groups: {groups})")
        return notes

    def run(self, selection: Optional[Iterable[Selection]] = None, *, notify: bool = True) -> ParityReport:
        """Compare everything in scope, or only `selection` (parts from `split`)."""
        va, vb = self.views
        if any(getattr(v.checkpoint, "is_fingerprint", False) for v in self.views):
            from pytest_ckptparity.fingerprint_diff import diff_with_fingerprint  # a side holds statistics, not arrays

            from pytest_ckptparity.fingerprint_diff import NOT_BIT_IDENTICAL

            report = diff_with_fingerprint(va, vb, self.options, selection)
            # A change between tolerance and a leaf's resolution passes on statistics alone:
            # say so where pytest users look (`-W error::pytest_ckptparity.CkptParityWarning`
            # makes it fail).
            for note in report.notes:
                if NOT_BIT_IDENTICAL in note:
                    warnings.warn(CkptParityWarning(note), stacklevel=_caller_level())
        else:
            report = diff_views(va, vb, self.options, selection)
        report.locations = (va.checkpoint.location, vb.checkpoint.location)
        report.steps = (va.checkpoint.step, vb.checkpoint.step)
        report.notes = [*self.notes, *report.notes]
        report.rngs_ignored = self.ignore_rngs and any(p == "rngs" or p.startswith("rngs/") for v in self.views for p in v.ignored)
        if notify:
            self.notify(report)
        return report

    def notify(self, report: ParityReport) -> None:
        """Tell the observers (the pytest plugin's run statistics) about a finished report."""
        for fn in list(_run_hooks.listeners):
            fn(report)

    def ignored_count(self) -> int:
        return scoped_paths(self.views[0], self.views[1], self.options)[1]

    def bytes_to_read(self) -> int:
        """Decoded bytes a whole comparison reads (both sides), from metadata: for progress."""
        return self.bytes_to_read_of(None)

    def bytes_to_read_of(self, selection: Optional[Iterable[Selection]]) -> int:
        """Decoded bytes the comparison of `selection` (None: everything) reads, both sides."""
        va, vb = self.views
        if selection is None:
            paths, _ = scoped_paths(va, vb, self.options)
        else:
            paths = [p for sel in selection for p in sel.paths]
        total = 0
        for p in paths:
            la, lb = va.leaves.get(p), vb.leaves.get(p)
            if la is None or lb is None or la.shape != lb.shape:
                continue
            for leaf in (la, lb):
                total += math.prod(leaf.shape) * _itemsize(leaf.dtype)
        return total

    def split(self, how: str = "layer") -> list[tuple[str, list[Selection]]]:
        """Named parts for generated test items, from metadata only, in a deterministic order.

        `layer` gives one part per layer of each stack (`params/decoder/layers[3]`) where
        both sides store layers in separate chunks. Where a stored chunk spans several
        layers (a scanned array written as one chunk, the usual case), a layer part would
        decode that whole chunk again for every layer, so the part is one leaf over the
        chunk's layers instead (`params/decoder/layers/mlp/wi_0/kernel`, or `...kernel[0:4]`
        when chunks hold 4 layers each): every stored chunk is still read once, and the parts
        still spread across xdist workers.
        """
        if how not in SPLITS:
            raise CkptParityUsageError(f"split must be one of {', '.join(SPLITS)}, got {how!r}.")
        va, vb = self.views
        paths, _ = scoped_paths(va, vb, self.options)
        parts: dict[tuple[str, int, str], tuple[str, list[str], Optional[tuple[int, int]]]] = {}

        def add(sort_key: tuple[str, int, str], name: str, path: str, layers: Optional[tuple[int, int]] = None) -> None:
            parts.setdefault(sort_key, (name, [], layers))[1].append(path)

        for path in paths:
            la, lb = va.leaves.get(path), vb.leaves.get(path)
            if la is None or lb is None:
                name = f"only-in-{va.name if lb is None else vb.name}"
                add((name, -1, ""), name, path)
                continue
            if how == "layer" and la.layers is not None and lb.layers is not None and la.shape == lb.shape and la.stack:
                unit = chunk_alignment(la, lb)[0]
                for start in range(0, la.layers, unit):
                    stop = min(start + unit, la.layers)
                    if stop - start == 1:
                        add((la.stack, start, ""), f"{la.stack}[{start}]", path, (start, stop))
                    else:  # canonical indexing: the layer axis comes first
                        name = path if stop - start == la.layers else f"{path}[{start}:{stop}]"
                        add((la.stack, start, path), name, path, (start, stop))
                continue
            key = _item_key(path, how)
            add((key, -1, ""), key, path)
        return [(name, [Selection(tuple(ps), layers)]) for _, (name, ps, layers) in sorted(parts.items())]


class TrajectoryComparison:
    """Two CheckpointManager roots (two training runs) compared at several steps.

    `steps` is `"all"` (every step either run committed; a step committed by one run only
    fails that step), `"common"` (the steps both committed; none in common is a usage error)
    or step numbers (`"0,2,4"`, `[0, 2, 4]`; one a run has not committed is a usage error).
    Steps are listed from the roots' folders (one listing each); a step is opened only when
    its turn comes, so `run` reads one step's comparison at a time. Keyword arguments are
    those of `Comparison` (except the single-step `step`, `step_a`, `step_b`).
    """

    def __init__(
        self, a: Union[str, os.PathLike], b: Union[str, os.PathLike], *, steps: Any, names: Sequence[str] = ("A", "B"),
        storage_options: Optional[Mapping[str, str]] = None, **comparison_kwargs: Any,
    ) -> None:
        self.spec = parse_steps(steps)
        if len(tuple(names)) != 2 or not all(isinstance(n, str) and n for n in names):
            raise CkptParityUsageError(f"names must be two non-empty strings, got {names!r}.")
        taken = [f"{k}={comparison_kwargs[k]!r}" for k in ("step", "step_a", "step_b") if comparison_kwargs.get(k) is not None]
        if taken:
            raise CkptParityUsageError(
                f"steps={describe_spec(self.spec)!r} and {', '.join(taken)} exclude each other (steps compares several steps, "
                f"step, step_a and step_b pick one); pass only one of them.")
        for k in ("step", "step_a", "step_b"):
            comparison_kwargs.pop(k, None)
        self.names: tuple[str, str] = (names[0], names[1])
        for side, x in zip(self.names, (a, b)):
            if not isinstance(x, (str, os.PathLike)) or isinstance(x, bytes):
                raise CkptParityUsageError(
                    f"{side}: steps= compares CheckpointManager roots given as paths or URLs, not a {type(x).__name__}; pass the folder that holds the step folders.")
            if os.fspath(x).endswith(".json"):
                raise CkptParityUsageError(
                    f"{side}: '{os.fspath(x)}' is a fingerprint file, which holds one checkpoint; steps= compares two CheckpointManager "
                    f"roots step by step. Compare with the fingerprint without steps, or pass the run's root folder.")
        so_a, so_b = _storage_options(storage_options, a, b)
        self.roots: tuple[str, str] = (os.fspath(a) if not _is_url(a) else a, os.fspath(b) if not _is_url(b) else b)
        (ca, pa), (cb, pb) = (manager_steps(x, side=n, storage_options=so) for x, n, so in zip(self.roots, self.names, (so_a, so_b)))
        self.committed = (ca, cb)
        self.steps, holders = plan_steps(self.spec, (ca, cb), self.names, self.roots, (pa, pb))
        self.missing: dict[int, str] = {
            s: missing_sentence(s, h, self.names, (cb, ca)[h], (pb, pa)[h]) for s, h in holders.items()}
        self.missing_holder = holders
        self.notes: list[str] = []
        if self.spec in (ALL, COMMON):
            for name, pending in zip(self.names, (pa, pb)):
                left = [s for s in pending if s not in holders]
                if left:
                    listed = ", ".join(str(s) for s in left)
                    self.notes.append(f"{name}: step {listed} {'is' if len(left) == 1 else 'are'} not committed (still being written, or abandoned) and left out")
        self._kwargs = dict(comparison_kwargs, names=self.names, storage_options=storage_options)
        self._opened: Optional[dict[int, Comparison]] = None

    def comparison(self, step: int) -> Comparison:
        """Both roots opened at `step` (metadata only)."""
        return Comparison(self.roots[0], self.roots[1], step_a=step, step_b=step, **self._kwargs)

    def open_all(self) -> dict[int, Comparison]:
        """Every step's comparison, opened once and kept (metadata only): for pytest items,
        which each compare one part of one step."""
        if self._opened is None:
            self._opened = {step: self.comparison(step) for step in self.steps}
        return self._opened

    def empty_report(self) -> TrajectoryReport:
        return TrajectoryReport(
            names=self.names, roots=self.roots, spec=describe_spec(self.spec), missing=dict(self.missing),
            missing_holder=dict(self.missing_holder), notes=list(self.notes))

    def run(self, *, notify: bool = True) -> TrajectoryReport:
        """Compare step after step; each step's arrays are released before the next opens."""
        report = self.empty_report()
        for step in self.steps:
            report.reports[step] = self.comparison(step).run(notify=notify)
        return report


# --------------------------------------------------------------------------------------
# Opening a side
# --------------------------------------------------------------------------------------


def is_fingerprint_path(obj: Any) -> bool:
    """A `.json` file name: a fingerprint file, which stands in for a checkpoint."""
    return isinstance(obj, (str, os.PathLike)) and not isinstance(obj, bytes) and os.fspath(obj).endswith(".json") and not os.path.isdir(obj)


def open_checkpoint(
    obj: Any, *, step: Optional[int] = None, name: str = "A", storage_options: Optional[Mapping[str, str]] = None,
) -> Checkpoint:
    """Open one side: a fingerprint file (`.json`), an orbax folder or URL, an in-memory tree,
    or an opened checkpoint (passed through). The sources know orbax and trees; a fingerprint
    file is opened here, above them, because reading it back needs the normal form."""
    if is_fingerprint_path(obj) and (not storage_options or _is_url(obj)):  # else the sources' sentence on storage options
        from pytest_ckptparity.fingerprint import open_fingerprint

        return open_fingerprint(obj, name=name)
    return open_source(obj, step=step, name=name, storage_options=storage_options)


def _itemsize(dtype: str) -> int:
    if dtype == "str":
        return 1
    digits = "".join(c for c in dtype if c.isdigit())
    return max(1, int(digits) // 8) if digits else 1


def _normalize(ckpt: Checkpoint, layout: Union[str, Layout, None], kw: dict[str, Any]) -> NormalizedView:
    """A fingerprint holds its canonical view already; any other source is normalized."""
    own = getattr(ckpt, "canonical_view", None)
    return own(**kw) if own is not None else normalize(ckpt, layout=layout, **kw)


def normalized_view(ckpt: Checkpoint, layout: Union[str, Layout, None] = None, **kw: Any) -> NormalizedView:
    """The canonical view of an opened side (`inspect` shows it): a fingerprint file's own,
    anything else through the layout rules."""
    return _normalize(ckpt, layout, kw)


def _item_key(path: str, how: str) -> str:
    keys = path.split("/")
    if how == "leaf":
        return path
    group = keys[0]
    if group == "params" and len(keys) > 2:
        return "/".join(keys[:2])
    if group == "opt_state" and len(keys) > 2:
        return "/".join(keys[:2] if how == "group" else keys[:3])
    return group if len(keys) > 1 else path


# --------------------------------------------------------------------------------------
# The helper
# --------------------------------------------------------------------------------------


def compare_checkpoints(
    a: Any, b: Any, *, atol: Optional[float] = None, rtol: Optional[float] = None,
    tolerances: Optional[Mapping[str, Mapping[str, float]]] = None,
    include: Union[str, Sequence[str], None] = None, exclude: Union[str, Sequence[str], None] = None,
    compare_values: bool = True, equal_nan: bool = True, dtype_policy: str = "strict",
    names: Sequence[str] = ("A", "B"), step: Optional[int] = None,
    step_a: Optional[int] = None, step_b: Optional[int] = None,
    storage_options: Optional[Mapping[str, str]] = None,
    format_a: Union[str, Layout, None] = None, format_b: Union[str, Layout, None] = None,
    rename: Sequence[tuple[str, str]] = (), ignore: Sequence[str] = (), ignore_rngs: bool = True,
    scan_axis: Union[int, tuple[Optional[int], Optional[int]], None] = None, read_budget: int = DEFAULT_READ_BUDGET,
    steps: Union[str, Sequence[int], None] = None,
) -> Union[ParityReport, TrajectoryReport]:
    """Compare and return the report, parity or not (raises only on usage errors).

    `step` picks the step of manager roots on both sides; `step_a` / `step_b` per side.
    `steps` (`"all"`, `"common"`, `"0,2,4"` or a list) compares two manager roots at
    several steps, one after another, and returns a `TrajectoryReport` (see
    `TrajectoryComparison`). `storage_options` go to the sides that are object-store URLs.
    """
    options = make_options(
        atol=atol, rtol=rtol, tolerances=tolerances, include=include, exclude=exclude,
        compare_values=compare_values, equal_nan=equal_nan, dtype_policy=dtype_policy, read_budget=read_budget,
    )
    if steps is not None:
        return TrajectoryComparison(
            a, b, steps=steps, names=names, step=step, step_a=step_a, step_b=step_b, storage_options=storage_options,
            format_a=format_a, format_b=format_b, rename=rename, ignore=ignore, ignore_rngs=ignore_rngs,
            scan_axis=scan_axis, options=options,
        ).run()
    comparison = Comparison(
        a, b, names=names, step=step, step_a=step_a, step_b=step_b, storage_options=storage_options, format_a=format_a, format_b=format_b, rename=rename,
        ignore=ignore, ignore_rngs=ignore_rngs, scan_axis=scan_axis, options=options,
    )
    return comparison.run()


# The plugin raises this with -v / -vv; None shows every row.


def assert_ckpt_parity(
    a: Union[str, os.PathLike, Checkpoint, Any], b: Union[str, os.PathLike, Checkpoint, Any], *,
    atol: Optional[float] = None, rtol: Optional[float] = None,
    tolerances: Optional[Mapping[str, Mapping[str, float]]] = None,
    include: Union[str, Sequence[str], None] = None, exclude: Union[str, Sequence[str], None] = None,
    compare_values: bool = True, equal_nan: bool = True, dtype_policy: str = "strict",
    names: Sequence[str] = ("A", "B"), step: Optional[int] = None,
    step_a: Optional[int] = None, step_b: Optional[int] = None,
    storage_options: Optional[Mapping[str, str]] = None,
    format_a: Union[str, Layout, None] = None, format_b: Union[str, Layout, None] = None,
    rename: Sequence[tuple[str, str]] = (), ignore: Sequence[str] = (), ignore_rngs: bool = True,
    scan_axis: Union[int, tuple[Optional[int], Optional[int]], None] = None, read_budget: int = DEFAULT_READ_BUDGET,
    steps: Union[str, Sequence[int], None] = None,
) -> Union[ParityReport, TrajectoryReport]:
    """Assert that checkpoints `a` and `b` hold the same model.

    `a` and `b` may be paths (orbax manager root, step, item or bare folder), in-memory trees
    or opened checkpoints (the `ckpt_a` fixture), in any mix. B is the reference:
    `|a - b| <= atol + rtol * |b|`. Returns the report on parity; raises `CkptParityError`
    naming every mismatch otherwise, and `CkptParityUsageError` when no verdict is possible.

    With `steps` (two manager roots, e.g. `steps="all"`) every step is compared and a
    `TrajectoryReport` returned; the error then names the first step at which a leaf leaves
    tolerance, the leaf and its layers, then every mismatch step by step.

    >>> assert_ckpt_parity("runs/linen/checkpoints", "runs/nnx/checkpoints", exclude="opt_state")
    """
    __tracebackhide__ = True
    report = compare_checkpoints(
        a, b, atol=atol, rtol=rtol, tolerances=tolerances, include=include, exclude=exclude,
        compare_values=compare_values, equal_nan=equal_nan, dtype_policy=dtype_policy, names=names,
        step=step, step_a=step_a, step_b=step_b, storage_options=storage_options,
        format_a=format_a, format_b=format_b, rename=rename, ignore=ignore,
        ignore_rngs=ignore_rngs, scan_axis=scan_axis, read_budget=read_budget, steps=steps,
    )
    if not report.passed:
        if isinstance(report, TrajectoryReport):
            raise CkptParityError(render_trajectory(report, color=False, max_rows=_run_hooks.max_rows), report)  # type: ignore[arg-type]
        raise CkptParityError(render(report, color=False, max_rows=_run_hooks.max_rows, layer_strips=True), report)
    return report


# --------------------------------------------------------------------------------------
# Fingerprints: the user-facing helpers (the pass itself and the file are fingerprint.py's)
# --------------------------------------------------------------------------------------


def take_fingerprint(
    ckpt_or_tree: Any, *, step: Optional[int] = None, format: Union[str, Layout, None] = None,
    rename: Sequence[tuple[str, str]] = (), ignore: Sequence[str] = (), ignore_rngs: bool = True,
    include: Union[str, Sequence[str], None] = None, exclude: Union[str, Sequence[str], None] = None,
    scan_axis: Optional[int] = None, read_budget: int = DEFAULT_READ_BUDGET, name: str = "checkpoint",
) -> "Fingerprint":
    """The fingerprint of a checkpoint path, an opened checkpoint or an in-memory tree."""
    from pytest_ckptparity._paths import in_scope
    from pytest_ckptparity.fingerprint import fingerprint_view

    if not isinstance(read_budget, int) or isinstance(read_budget, bool) or read_budget <= 0:
        raise CkptParityUsageError(f"read_budget must be a positive number of bytes, got {read_budget!r}.")
    ckpt = open_checkpoint(ckpt_or_tree, step=step, name=name)
    if getattr(ckpt, "is_fingerprint", False):
        return ckpt.fingerprint  # type: ignore[attr-defined]
    inc, exc, ign = _globs("include", include), _globs("exclude", exclude), _globs("ignore", ignore)
    view = normalize(ckpt, layout=format, rename=_rename_rules(rename), ignore=ign, ignore_rngs=ignore_rngs, scan_axis=scan_axis)
    groups = ", ".join(sorted({p.split("/")[0] for p in view.leaves})) or "none"
    for pattern in inc:  # as in a comparison: a misspelt glob must not quietly narrow what the file covers
        if not any(glob_match(p, pattern) for p in view.leaves):
            raise CkptParityUsageError(
                f"include glob {pattern!r} matches no leaf of '{ckpt.location}'; the top-level groups are: {groups}. "
                f"Check its spelling (`ckptparity inspect PATH` lists every path).")
    paths = [p for p in view.leaves if in_scope(p, inc, exc)]
    if not paths:
        raise CkptParityUsageError(f"no leaf of '{ckpt.location}' is in scope (include={list(inc)}, exclude={list(exc)}; the top-level groups are: {groups}); a fingerprint of nothing would check nothing.")
    scope = {k: list(v) for k, v in (("include", inc), ("exclude", exc), ("ignore", ign)) if v}
    if not ignore_rngs:
        scope["rngs"] = True
    return fingerprint_view(view, paths=paths, read_budget=read_budget, scope=scope)


def assert_ckpt_fingerprint(ckpt_or_tree: Any, path: Union[str, os.PathLike], **kwargs: Any) -> Any:
    """Assert that a checkpoint (path, opened checkpoint or in-memory tree) still matches the
    fingerprint file at `path`, within tolerance. Takes `assert_ckpt_parity`'s keywords.

    >>> assert_ckpt_fingerprint("runs/nnx/checkpoints", "tests/golden/llama_nnx.json", rtol=1e-5)
    """
    __tracebackhide__ = True
    from pytest_ckptparity.fingerprint import HOW_TO_CREATE

    if not is_fingerprint_path(path):
        raise CkptParityUsageError(f"'{path}' is not a fingerprint file name; fingerprint files end in .json.")
    if not os.path.isfile(path):
        raise CkptParityUsageError(f"fingerprint file '{path}' does not exist; {HOW_TO_CREATE.format(path=path)}.", path=path)
    kwargs.setdefault("names", (kwargs.pop("name", "checkpoint"), "fingerprint"))
    return assert_ckpt_parity(ckpt_or_tree, path, **kwargs)
