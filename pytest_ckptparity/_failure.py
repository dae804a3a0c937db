"""How a parity failure shows in pytest's output, for generated items and users' own tests.

A `CkptParityError` becomes a short traceback cut to the user's own line, then the report:
a rich table when the terminal takes colours, plain text otherwise (and in JUnit XML). The
display is built from plain data (`failure_payload`), so it crosses from an xdist worker to
the controller with the test report and is drawn there for the controller's terminal.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from _pytest._code.code import ReprFileLocation, TerminalRepr


def _short_traceback(item: pytest.Item, excinfo: pytest.ExceptionInfo[BaseException]) -> tuple[list[str], tuple[str, int]]:
    """`path:line: in function` and the statement, for each frame the user wrote; frames
    marked `__tracebackhide__` and those inside this package are left out."""
    try:
        tb = item._traceback_filter(excinfo) if hasattr(item, "_traceback_filter") else excinfo.traceback.filter(excinfo)  # noqa: SLF001
    except Exception:  # noqa: BLE001 - a display detail must never hide the failure
        tb = excinfo.traceback.filter(excinfo)
    lines: list[str] = []
    where = (str(getattr(item, "path", "")), 0)
    base = str(item.config.invocation_params.dir)
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    for entry in tb:
        path = str(entry.path)
        if os.path.abspath(path).startswith(package):  # our own frames: the message says it all
            continue
        try:
            shown = os.path.relpath(path, base) if os.path.isabs(path) else path
        except ValueError:  # another drive
            shown = path
        lines.append(f"{shown}:{entry.lineno + 1}: in {entry.name}")
        try:
            lines.extend(f"    {l}" for l in entry.statement.deindent().lines)
        except Exception:  # noqa: BLE001 - no source (e.g. exec'd code)
            pass
        where = (shown, entry.lineno + 1)
    return lines, where


def failure_payload(item: pytest.Item, excinfo: pytest.ExceptionInfo[BaseException]) -> dict[str, Any]:
    """Everything the display needs, as plain data."""
    from pytest_ckptparity import _run_hooks
    from pytest_ckptparity._items import CkptParityItem
    from pytest_ckptparity.report import render_plain, render_rich, summary_line

    if isinstance(item, CkptParityItem):
        location, (path, lineno) = [], (item.nodeid, 0)
    else:
        location, (path, lineno) = _short_traceback(item, excinfo)
    kind = type(excinfo.value)
    name = f"{kind.__module__}.{kind.__qualname__}"
    report = getattr(excinfo.value, "report", None)
    if report is None:  # a usage error: its one sentence, no frames from inside the library
        text = f"E   {name}: {excinfo.value}"
        return {"location": location, "plain": text, "rich": text, "crash": [path, lineno, f"{name}: {excinfo.value}"]}
    rows = _run_hooks.max_rows
    if hasattr(report, "failed_steps"):  # assert_ckpt_parity(..., steps=...): a TrajectoryReport
        from pytest_ckptparity.trajectory import render_trajectory, summary_line as steps_summary

        return {"location": location, "plain": render_trajectory(report, color=False, max_rows=rows),
                "rich": render_trajectory(report, color=True, max_rows=rows), "crash": [path, lineno, f"{name}: {steps_summary(report)}"]}
    return {
        "location": location,
        "plain": render_plain(report, rows, layer_strips=True),
        "rich": render_rich(report, rows, color=True, layer_strips=True),
        "crash": [path, lineno, f"{name}: {summary_line(report)}"],
    }


class ParityFailureRepr(TerminalRepr):
    """pytest's long representation of a parity failure."""

    def __init__(self, location: list[str], plain: str, rich: str, crash: list[Any]) -> None:
        self.location = list(location)
        self.plain = plain
        self.rich = rich
        self.reprcrash = ReprFileLocation(str(crash[0]), int(crash[1]), str(crash[2]))  # the short summary's message

    def toterminal(self, tw: Any) -> None:
        for line in self.location:
            tw.line(line)
        for line in (self.rich if tw.hasmarkup else self.plain).splitlines():
            tw.line(line)


def failure_repr(payload: dict[str, Any]) -> ParityFailureRepr:
    return ParityFailureRepr(payload["location"], payload["plain"], payload["rich"], payload["crash"])
