"""The pytest11 entry point: options, ini keys, markers, fixtures, generated items, summary.

A thin shell: the work lives in `api`, run-wide state in `_session`, items in `_items`.
Loading this module imports nothing heavy (no numpy, jax, flax, orbax, tensorstore): it runs
in every pytest session of our users, most of which never touch a checkpoint.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import pytest

from pytest_ckptparity._session import RunStats, Settings, build_settings, open_cached, settings_key, stats_key

GROUP = "checkpoint parity"
OPT_A, OPT_B = "--ckpt-a", "--ckpt-b"
SPLIT_CHOICES = ("group", "layer", "leaf")
POLICY_CHOICES = ("strict", "cast")
WORKER_KEY = "ckptparity"
comparison_key = pytest.StashKey[Any]()
listener_key = pytest.StashKey[Callable]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("ckptparity", GROUP)
    g.addoption(OPT_A, dest="ckpt_a", metavar="PATH", help="checkpoint A: orbax manager root, step, item or bare folder.")
    g.addoption(OPT_B, dest="ckpt_b", metavar="PATH", help="checkpoint B (the reference: |a-b| <= atol + rtol*|b|).")
    g.addoption("--atol", dest="ckpt_atol", metavar="X", help="absolute tolerance for every float leaf (default: per dtype).")
    g.addoption("--rtol", dest="ckpt_rtol", metavar="X", help="relative tolerance for every float leaf (default: per dtype).")
    g.addoption("--ckpt-include", dest="ckpt_include", action="append", metavar="GLOB", help="compare only paths matching GLOB (repeatable).")
    g.addoption("--ckpt-exclude", dest="ckpt_exclude", action="append", metavar="GLOB", help="leave out paths matching GLOB (repeatable).")
    g.addoption("--ckpt-step", dest="ckpt_step", type=int, metavar="N", help="step to open in manager roots (default: latest committed).")
    g.addoption("--ckpt-structure-only", dest="ckpt_structure_only", action="store_true", help="compare paths, shapes and dtypes only; read no array data.")
    g.addoption("--ckpt-dtype-policy", dest="ckpt_dtype_policy", choices=POLICY_CHOICES, default="strict", help="strict: a dtype difference is a mismatch; cast: compare in the lower precision.")
    g.addoption("--ckpt-split", dest="ckpt_split", choices=SPLIT_CHOICES, default="layer", help="granularity of generated items (default: layer).")
    g.addoption("--ckpt-report", dest="ckpt_report", metavar="PATH", help="write every leaf's result and the totals as JSON.")
    g.addoption("--ckpt", dest="ckpt_named", action="append", metavar="NAME=PATH", help="a named checkpoint for ckpt(name) and ckpt_matrix (repeatable).")
    g.addoption("--ckpt-format-a", dest="ckpt_format_a", metavar="LAYOUT", help="force A's layout instead of detecting it.")
    g.addoption("--ckpt-format-b", dest="ckpt_format_b", metavar="LAYOUT", help="force B's layout instead of detecting it.")
    g.addoption("--ckpt-compare-rngs", dest="ckpt_compare_rngs", action="store_true", help="also compare NNX RNG state (ignored by default).")
    g.addoption("--ckpt-read-budget", dest="ckpt_read_budget", metavar="MIB", help="decoded array data held at once per comparison, in MiB (default: 256; a larger stored chunk is still read whole).")
    g.addoption("--ckpt-update-fingerprints", dest="ckpt_update_fingerprints", action="store_true", help="write or refresh the ckpt_fingerprint files instead of asserting against them; delete unused ones.")
    parser.addini("ckpt_atol", "absolute tolerance for checkpoint parity (command line --atol wins).", default="")
    parser.addini("ckpt_rtol", "relative tolerance for checkpoint parity (command line --rtol wins).", default="")
    parser.addini("ckpt_tolerances", "per-path tolerances, one 'glob atol rtol' per line.", type="linelist", default=[])
    parser.addini("ckpt_read_budget", "decoded array data held at once per comparison, in MiB (--ckpt-read-budget wins).", default="")
    parser.addini("ckpt_paths", "named checkpoints, one 'name = path' per line.", type="linelist", default=[])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ckpt_parity(**kwargs): override assert_ckpt_parity options (atol, rtol, include, exclude, ...) for the ckpt_parity fixture of one test.")
    config.addinivalue_line("markers", "ckpt_matrix(*names): run the test once per pair of named checkpoints (fixture ckpt_pair), ids like 'a-vs-b'.")
    settings = build_settings(config)
    config.stash[settings_key] = settings
    config.stash[stats_key] = RunStats()

    from pytest_ckptparity import api

    verbosity = config.get_verbosity()
    api.default_max_rows = 20 if verbosity <= 0 else (50 if verbosity == 1 else None)

    def record(report: Any) -> None:
        config.stash[stats_key].add_report(report)

    api.add_report_listener(record)
    config.stash[listener_key] = record
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistMerge(config), "ckptparity-xdist")
    from pytest_ckptparity._fingerprint_plugin import FingerprintTracker

    config.pluginmanager.register(FingerprintTracker(config), "ckptparity-fingerprints")


def pytest_unconfigure(config: pytest.Config) -> None:
    record = config.stash.get(listener_key, None)
    if record is not None:
        from pytest_ckptparity import api

        api.remove_report_listener(record)
        api.default_max_rows = 20


class _XdistMerge:
    """Workers ship their statistics; the controller merges them (nothing counted twice)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        data = getattr(node, "workeroutput", {}).get(WORKER_KEY)
        if data:
            self.config.stash[stats_key].merge(data)


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def render_for(config: pytest.Config, report: Any) -> str:
    """The report as this run wants it: colour per --color, rows per verbosity."""
    from pytest_ckptparity import api
    from pytest_ckptparity.report import render_plain, render_rich

    color = config.get_terminal_writer().hasmarkup
    rows = api.default_max_rows
    return render_rich(report, rows, color=True) if color else render_plain(report, rows)


# --------------------------------------------------------------------------------------
# Generated items
# --------------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    settings = config.stash[settings_key]
    if not (settings.ckpt_a and settings.ckpt_b):
        return
    from pytest_ckptparity._items import make_items
    from pytest_ckptparity.errors import CkptParityUsageError

    try:
        comparison = _comparison(config, settings)
        items.extend(make_items(session, comparison, settings.split))
    except CkptParityUsageError as e:
        raise pytest.UsageError(str(e)) from None


def _comparison(config: pytest.Config, settings: Settings) -> Any:
    if comparison_key not in config.stash:
        from pytest_ckptparity.api import OPTION_NAMES, Comparison, make_options

        kw = dict(settings.helper_kwargs)
        options = make_options(**{k: kw.pop(k) for k in OPTION_NAMES if k in kw})
        a = open_cached(config, settings.ckpt_a, "A")
        b = open_cached(config, settings.ckpt_b, "B")
        config.stash[comparison_key] = Comparison(a, b, options=options, **{k: kw[k] for k in ("format_a", "format_b", "ignore_rngs")})
    return config.stash[comparison_key]


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


def _configured(request: pytest.FixtureRequest, option_name: str, path: Optional[str], name: str) -> Any:
    if not path:
        pytest.skip(f"no checkpoint given: pass {option_name} PATH to run this test")
    return open_cached(request.config, path, name)


@pytest.fixture(scope="session")
def ckpt_a(request: pytest.FixtureRequest) -> Any:
    """Checkpoint A from ``--ckpt-a`` (opened lazily; skips the test when not given).

    Example::

        def test_params_match(ckpt_a, ckpt_b, ckpt_parity):
            ckpt_parity(ckpt_a, ckpt_b, include="params")
    """
    return _configured(request, OPT_A, request.config.stash[settings_key].ckpt_a, "A")


@pytest.fixture(scope="session")
def ckpt_b(request: pytest.FixtureRequest) -> Any:
    """Checkpoint B from ``--ckpt-b``, the reference side (skips the test when not given)."""
    return _configured(request, OPT_B, request.config.stash[settings_key].ckpt_b, "B")


@pytest.fixture(scope="session")
def ckpt(request: pytest.FixtureRequest) -> Callable[[str], Any]:
    """Open a named checkpoint from ``--ckpt NAME=PATH`` or the ``ckpt_paths`` ini key.

    Example::

        def test_nnx_matches_linen(ckpt, ckpt_parity):
            ckpt_parity(ckpt("nnx"), ckpt("linen"))
    """
    settings = request.config.stash[settings_key]

    def get(name: str) -> Any:
        if name not in settings.named:
            pytest.skip(f"no checkpoint named {name!r}: pass --ckpt {name}=PATH or add it to ckpt_paths")
        return open_cached(request.config, settings.named[name], name)

    return get


@pytest.fixture
def ckpt_parity(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``assert_ckpt_parity`` pre-bound to this run's tolerances, scopes and dtype policy.

    Keyword arguments, then ``@pytest.mark.ckpt_parity(...)``, override the configured values.

    Example::

        @pytest.mark.ckpt_parity(exclude="opt_state")
        def test_weights(ckpt_a, ckpt_b, ckpt_parity):
            report = ckpt_parity(ckpt_a, ckpt_b, rtol=1e-5)
            assert report.passed
    """
    from pytest_ckptparity.api import assert_ckpt_parity

    base = dict(request.config.stash[settings_key].helper_kwargs)
    marker = request.node.get_closest_marker("ckpt_parity")
    if marker is not None:
        if marker.args:
            raise pytest.UsageError("@pytest.mark.ckpt_parity takes keyword arguments only, e.g. ckpt_parity(atol=1e-4).")
        base.update(marker.kwargs)

    def check(a: Any, b: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        return assert_ckpt_parity(a, b, **{**base, **kwargs})

    return check


class CkptPair(NamedTuple):
    """Two named checkpoints of a ``ckpt_matrix`` test."""

    name_a: str
    name_b: str
    a: Any
    b: Any

    def __iter__(self) -> Iterator[Any]:  # `a, b = ckpt_pair`
        return iter((self.a, self.b))


@pytest.fixture
def ckpt_pair(request: pytest.FixtureRequest) -> CkptPair:
    """One pair of named checkpoints for a test marked ``@pytest.mark.ckpt_matrix(...)``.

    Example::

        @pytest.mark.ckpt_matrix("linen_scan", "nnx_scan", "nnx_noscan")
        def test_migration(ckpt_pair, ckpt_parity):
            ckpt_parity(*ckpt_pair, names=(ckpt_pair.name_a, ckpt_pair.name_b))
    """
    if not hasattr(request, "param"):
        raise pytest.UsageError("the ckpt_pair fixture needs @pytest.mark.ckpt_matrix('name1', 'name2', ...) on the test.")
    name_a, name_b = request.param
    settings = request.config.stash[settings_key]
    for n in (name_a, name_b):
        if n not in settings.named:
            pytest.skip(f"no checkpoint named {n!r}: pass --ckpt {n}=PATH or add it to ckpt_paths")
    return CkptPair(name_a, name_b, open_cached(request.config, settings.named[name_a], name_a), open_cached(request.config, settings.named[name_b], name_b))


@pytest.fixture
def ckpt_fingerprint(request: pytest.FixtureRequest) -> Any:
    """Check a checkpoint or live tree against this test's fingerprint file (golden file).

    The file is ``<test dir>/__fingerprints__/<module>/<test name>.json`` (further calls:
    ``<test name>.1.json``, or ``name="x"`` gives ``<test name>.x.json``). Run pytest with
    ``--ckpt-update-fingerprints`` to write or refresh the files; without it a missing file fails.

    Example::

        def test_checkpoint_is_unchanged(ckpt_fingerprint):
            ckpt_fingerprint("runs/nnx/checkpoints", rtol=1e-5)
    """
    from pytest_ckptparity._fingerprint_plugin import FingerprintFixture

    return FingerprintFixture(request, request.config.stash[settings_key].helper_kwargs)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("ckpt_matrix")
    if marker is None:
        return
    names = list(marker.args)
    if len(names) < 2 or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise pytest.UsageError(f"@pytest.mark.ckpt_matrix needs two or more distinct checkpoint names, got {names!r}.")
    if "ckpt_pair" not in metafunc.fixturenames:
        raise pytest.UsageError(f"{metafunc.definition.nodeid} is marked ckpt_matrix but does not use the ckpt_pair fixture.")
    pairs = list(itertools.combinations(names, 2))
    metafunc.parametrize("ckpt_pair", pairs, ids=[f"{a}-vs-{b}" for a, b in pairs], indirect=True)


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    stats = config.stash.get(stats_key, None)
    if stats is None:
        return
    if _is_worker(config):
        config.workeroutput[WORKER_KEY] = stats.to_dict()  # type: ignore[attr-defined]
        return
    path = config.stash[settings_key].report_path
    if path:
        out = {"totals": stats.totals(), "leaves": stats.leaves, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        Path(path).write_text(json.dumps(out, indent=1, sort_keys=True))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    stats = config.stash.get(stats_key, None)
    if stats is None or _is_worker(config) or not stats.comparisons:
        return
    t = stats.totals()
    tr = terminalreporter
    tr.write_sep("=", GROUP)
    tr.write_line(f"leaves compared: {t['leaves_compared']}  mismatched: {t['leaves_mismatched']}  comparisons: {t['comparisons']}")
    tr.write_line(f"bytes read: {t['bytes_read']:,}  wall time in comparisons: {t['wall_time_s']:.3f} s")
    if t["worst_leaf"]:
        tr.write_line(f"worst leaf: {t['worst_leaf']} ({t['worst_kind']})", red=True)
    report_path = config.stash[settings_key].report_path
    if report_path:
        tr.write_line(f"JSON report: {report_path}")
