"""The pytest side of fingerprints: the `ckpt_fingerprint` fixture's file naming, writing in
update mode, and the run-wide bookkeeping that finds unused fingerprint files.

Files live next to the tests, one per test (and per extra call):
`<test dir>/__fingerprints__/<test module>/<test name>[.<name or call index>].json`, so xdist
workers never write the same file, and each write is a temp file renamed into place.

Unused files (as syrupy reports unused snapshots) are only judged for modules whose every
test was selected: under `-k`, `--lf` or a `file::test` argument, a file whose test did not
run is not called unused. A file whose test passed without using it is, in any run.
Loading this module imports nothing heavy; the fingerprint work is imported when used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

UPDATE_OPTION = "--ckpt-update-fingerprints"
FOLDER = "__fingerprints__"
WORKER_KEY = "ckptparity_fingerprints"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-\[\]=,+]")


def fingerprint_folder(test_path: Path) -> Path:
    return test_path.parent / FOLDER / test_path.stem


def file_stem(test_name: str) -> str:
    return _UNSAFE.sub("_", test_name)


@dataclass
class FingerprintRun:
    """Per-run bookkeeping (config.stash); plain data so workers can ship it."""

    update: bool = False
    used: set[str] = field(default_factory=set)  # fingerprint files read or written
    missing: set[str] = field(default_factory=set)  # asked for, not there (their tests failed)
    written: list[str] = field(default_factory=list)
    unchanged: int = 0
    selected: dict[str, set[str]] = field(default_factory=dict)  # folder -> test file stems selected
    partial: set[str] = field(default_factory=set)  # folders of modules not wholly selected
    passed: set[tuple[str, str]] = field(default_factory=set)  # (folder, stem) of tests that passed
    users: set[tuple[str, str]] = field(default_factory=set)  # (folder, stem) of tests that used the fixture
    complete: bool = True
    unused: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "used": sorted(self.used), "missing": sorted(self.missing), "written": self.written, "unchanged": self.unchanged,
            "selected": {k: sorted(v) for k, v in self.selected.items()}, "partial": sorted(self.partial),
            "users": sorted(self.users),
        }

    def merge(self, d: dict[str, Any]) -> None:
        self.used.update(d.get("used", ()))
        self.missing.update(d.get("missing", ()))
        self.written.extend(d.get("written", ()))
        self.unchanged += int(d.get("unchanged", 0))
        for k, v in d.get("selected", {}).items():
            self.selected.setdefault(k, set()).update(v)
        self.partial.update(d.get("partial", ()))
        self.users.update(tuple(u) for u in d.get("users", ()))


run_key = pytest.StashKey[FingerprintRun]()


def _owner(item: Any) -> Optional[tuple[str, str]]:
    path = getattr(item, "path", None)
    if path is None or not str(path).endswith(".py"):
        return None
    return str(fingerprint_folder(Path(path))), file_stem(item.name)


class FingerprintTracker:
    """Hooks that record which tests were selected and passed, and judge unused files."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.run = config.stash.setdefault(run_key, FingerprintRun(update=bool(config.getoption("ckpt_update_fingerprints", False))))

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        for item in items:
            owner = _owner(item)
            if owner:
                self.run.selected.setdefault(owner[0], set()).add(owner[1])
        if any("::" in str(a) for a in self.config.args):  # `file::test`: modules not wholly collected
            self.run.partial.update(self.run.selected)

    def pytest_deselected(self, items: list[Any]) -> None:
        for item in items:
            owner = _owner(item)
            if owner:
                self.run.partial.add(owner[0])

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" and report.passed:
            path = Path(str(self.config.rootpath)) / report.nodeid.split("::")[0]
            name = report.nodeid.split("::")[-1]
            self.run.passed.add((str(fingerprint_folder(path)), file_stem(name)))

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        data = getattr(node, "workeroutput", {}).get(WORKER_KEY)
        if data:
            self.run.merge(data)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if hasattr(self.config, "workerinput"):
            self.config.workeroutput[WORKER_KEY] = self.run.to_dict()  # type: ignore[attr-defined]
            return
        stopped = session.shouldstop or session.shouldfail or exitstatus not in (0, 1)
        self.run.complete = not stopped
        if stopped:
            return
        self.run.unused = find_unused(self.run)
        if self.run.update:
            for f in self.run.unused:
                Path(f).unlink(missing_ok=True)
                self.run.deleted.append(f)
            for folder in {Path(f).parent for f in self.run.unused}:
                try:
                    folder.rmdir()  # only when empty: a gone module's folder leaves no trace
                except OSError:
                    pass

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if hasattr(self.config, "workerinput"):
            return
        run, tr = self.run, terminalreporter
        if not (run.written or run.unused or run.unchanged or run.used):
            return
        tr.write_sep("-", "checkpoint fingerprints")
        if run.update:
            tr.write_line(f"{_files(len(run.written))} written, {run.unchanged} unchanged, {len(run.deleted)} unused deleted")
            for f in sorted(run.written):
                tr.write_line(f"  written: {f}")
            for f in sorted(run.deleted):
                tr.write_line(f"  deleted: {f}")
        elif run.unused:
            tr.write_line(f"{_files(len(run.unused))} unused (no test uses them; delete them or run with {UPDATE_OPTION}):", yellow=True)
            for f in run.unused:
                tr.write_line(f"  unused: {f}")
        elif run.used - run.missing or not run.missing:
            tr.write_line(f"{_files(len(run.used - run.missing))} checked, none unused")
        if run.missing and not run.update:
            tr.write_line(f"{_files(len(run.missing))} missing (their tests failed; run pytest with {UPDATE_OPTION} to create them):", yellow=True)
            for f in sorted(run.missing):
                tr.write_line(f"  missing: {f}")


def _files(n: int) -> str:
    return f"{n} fingerprint {'file' if n == 1 else 'files'}"


def find_unused(run: FingerprintRun) -> list[str]:
    """Files that no test claims: in the folders of selected modules, their test is gone (only
    judged when the whole module was selected) or it passed without using them; and every file
    in the folder of a module that no longer exists."""
    unused = []
    for folder, stems in sorted(run.selected.items()):
        d = Path(folder)
        if not d.is_dir():
            continue
        for f in sorted(d.glob("*.json")):
            if str(f) in run.used:
                continue
            owners = [s for s in stems if f.name == f"{s}.json" or f.name.startswith(f"{s}.")]
            if not owners:
                if folder not in run.partial:
                    unused.append(str(f))
            elif any((folder, s) in run.passed and (folder, s) in run.users for s in owners):
                unused.append(str(f))
    # The folders of modules that are gone: next to a module this run collected, a folder whose
    # module no longer exists (no file of that name, whatever its suffix) holds files no test
    # can use, whatever was selected.
    for root in sorted({Path(folder).parent for folder in run.selected}):
        if not root.is_dir():
            continue
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            if str(sub) in run.selected or any(root.parent.glob(f"{sub.name}.*")):
                continue
            unused.extend(str(f) for f in sorted(sub.glob("*.json")) if str(f) not in run.used)
    return unused


_TOLERANCE_KEYS = ("atol", "rtol", "tolerances", "read_budget", "ignore_rngs", "dtype_policy")


class FingerprintFixture:
    """What the `ckpt_fingerprint` fixture returns: call it with a checkpoint or a tree."""

    def __init__(self, request: pytest.FixtureRequest, base: dict[str, Any]) -> None:
        self.request = request
        self.base = {k: v for k, v in base.items() if k in _TOLERANCE_KEYS}
        self.calls = 0
        self.run = request.config.stash.setdefault(run_key, FingerprintRun())
        node_path = Path(str(request.node.path))
        self.folder = fingerprint_folder(node_path)
        self.stem = file_stem(request.node.name)

    def path_for(self, name: Optional[str]) -> Path:
        if name is not None:
            if not name or _UNSAFE.search(name):
                raise pytest.UsageError(f"ckpt_fingerprint name {name!r} must be non-empty letters, digits, '_', '-' or '.'.")
            return self.folder / f"{self.stem}.{name}.json"
        index = self.calls
        return self.folder / (f"{self.stem}.json" if index == 0 else f"{self.stem}.{index}.json")

    def __call__(self, ckpt_or_tree: Any, *, name: Optional[str] = None, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        from pytest_ckptparity.errors import CkptParityUsageError

        path = self.path_for(name)
        self.calls += 1
        self.run.used.add(str(path))
        self.run.users.add((str(self.folder), self.stem))
        options = {**self.base, **kwargs}
        try:
            if self.run.update:
                return self._update(ckpt_or_tree, path, options)
            if not path.is_file():
                self.run.missing.add(str(path))
                pytest.fail(f"fingerprint file '{path}' does not exist; run pytest with {UPDATE_OPTION} to create it.", pytrace=False)
            from pytest_ckptparity.api import assert_ckpt_fingerprint

            return assert_ckpt_fingerprint(ckpt_or_tree, path, **options)
        except CkptParityUsageError as e:
            pytest.fail(str(e), pytrace=False)

    def _update(self, ckpt_or_tree: Any, path: Path, options: dict[str, Any]) -> Any:
        """Write the fingerprint, unless the file holds the same values already (same digests,
        shapes and dtypes): an unchanged model leaves the file, and its diff, alone."""
        from pytest_ckptparity.errors import CkptParityUsageError
        from pytest_ckptparity.api import take_fingerprint
        from pytest_ckptparity.fingerprint import read_fingerprint, write_fingerprint

        take = {k: options[k] for k in ("read_budget", "ignore_rngs", "include", "exclude", "ignore", "step", "rename", "scan_axis") if k in options}
        if "format_a" in options or "format" in options:
            take["format"] = options.get("format", options.get("format_a"))
        fp = take_fingerprint(ckpt_or_tree, **take)
        if path.is_file():
            try:
                old = read_fingerprint(path)
            except CkptParityUsageError:
                old = None
            if old is not None and _same_values(old, fp):
                self.run.unchanged += 1
                return fp
        write_fingerprint(fp, path)
        self.run.written.append(str(path))
        return fp


def _same_values(a: Any, b: Any) -> bool:
    if set(a.leaves) != set(b.leaves):
        return False
    return all((x.shape, x.dtype, x.digest, x.layers) == (y.shape, y.dtype, y.digest, y.layers) for x, y in ((a.leaves[p], b.leaves[p]) for p in a.leaves))
