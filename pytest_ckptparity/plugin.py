"""The pytest11 entry point: options, ini keys, markers, fixtures, generated items, summary.

A thin shell: the work lives in `api`, run-wide state in `_session`, items in `_items`.
Loading this module imports nothing heavy (no numpy, jax, flax, orbax, tensorstore): it runs
in every pytest session of our users, most of which never touch a checkpoint.
"""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import pytest

from pytest_ckptparity._session import RunStats, Settings, build_settings, open_cached, settings_key, stats_key, usage_errors

GROUP = "checkpoint parity"
OPT_A, OPT_B = "--ckpt-a", "--ckpt-b"
SPLIT_CHOICES = ("group", "layer", "leaf")
POLICY_CHOICES = ("strict", "cast")
GENERATE_CHOICES = ("auto", "yes", "no")
WORKER_KEY = "ckptparity"
comparison_key = pytest.StashKey[Any]()
listener_key = pytest.StashKey[Callable]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("ckptparity", GROUP)
    g.addoption(OPT_A, dest="ckpt_a", metavar="PATH", help="checkpoint A: orbax manager root, step, item or bare folder.")
    g.addoption(OPT_B, dest="ckpt_b", metavar="PATH", help="checkpoint B (the reference: |a-b| <= atol + rtol*|b|).")
    g.addoption("--ckpt-atol", dest="ckpt_atol", metavar="X", help="absolute tolerance for every float leaf (default: per dtype); also --atol unless a conftest defines its own.")
    g.addoption("--ckpt-rtol", dest="ckpt_rtol", metavar="X", help="relative tolerance for every float leaf (default: per dtype); also --rtol unless a conftest defines its own.")
    g.addoption("--ckpt-include", dest="ckpt_include", action="append", metavar="GLOB", help="compare only paths matching GLOB (repeatable).")
    g.addoption("--ckpt-exclude", dest="ckpt_exclude", action="append", metavar="GLOB", help="leave out paths matching GLOB (repeatable).")
    g.addoption("--ckpt-step", dest="ckpt_step", type=int, metavar="N", help="step to open in manager roots (default: latest committed).")
    g.addoption("--ckpt-step-a", dest="ckpt_step_a", type=int, metavar="N", help="step of --ckpt-a's manager root (default: --ckpt-step, else latest committed).")
    g.addoption("--ckpt-step-b", dest="ckpt_step_b", type=int, metavar="N", help="step of --ckpt-b's manager root (default: --ckpt-step, else latest committed).")
    g.addoption("--ckpt-steps", dest="ckpt_steps", metavar="all|common|N,M,...", help="generated items per step and subtree of the --ckpt-a/--ckpt-b manager roots: every committed step (all), the steps both committed (common) or these steps.")
    g.addoption("--ckpt-storage-option", dest="ckpt_storage_options", action="append", metavar="KEY=VALUE", help="a setting for gs:// or s3:// checkpoints, e.g. endpoint=http://127.0.0.1:9000 (repeatable).")
    g.addoption("--ckpt-generate", dest="ckpt_generate", choices=GENERATE_CHOICES, default=None, help="generated items for --ckpt-a/--ckpt-b: auto (default) adds them only when no test paths or node ids are given; yes: always; no: never.")
    g.addoption("--ckpt-structure-only", dest="ckpt_structure_only", action="store_true", help="compare paths, shapes and dtypes only; read no array data.")
    g.addoption("--ckpt-dtype-policy", dest="ckpt_dtype_policy", choices=POLICY_CHOICES, default="strict", help="strict: a dtype difference is a mismatch; cast: compare in the lower precision.")
    g.addoption("--ckpt-split", dest="ckpt_split", choices=SPLIT_CHOICES, default="layer", help="granularity of generated items (default: layer).")
    g.addoption("--ckpt-report", dest="ckpt_report", metavar="PATH", help="write every leaf's result and the totals as JSON.")
    g.addoption("--ckpt-html", dest="ckpt_html", metavar="PATH", help="write a self-contained HTML drift report (per-layer heatmap, worst leaves, mismatches); needs pytest-ckptparity[html].")
    g.addoption("--ckpt", dest="ckpt_named", action="append", metavar="NAME=PATH", help="a named checkpoint for ckpt(name) and ckpt_matrix (repeatable).")
    g.addoption("--ckpt-format-a", dest="ckpt_format_a", metavar="LAYOUT", help="force A's layout instead of detecting it.")
    g.addoption("--ckpt-format-b", dest="ckpt_format_b", metavar="LAYOUT", help="force B's layout instead of detecting it.")
    g.addoption("--ckpt-scan-axis", dest="ckpt_scan_axis", metavar="AXIS[,AXIS_B]", help="the axis layer stacks are stored on, for both sides or per side (default: recorded in the checkpoint, else 1).")
    g.addoption("--ckpt-compare-rngs", dest="ckpt_compare_rngs", action="store_true", help="also compare NNX RNG state (ignored by default).")
    g.addoption("--ckpt-read-budget", dest="ckpt_read_budget", metavar="MIB", help="decoded array data held at once per comparison, in MiB (default: 256; a larger stored chunk is still read whole).")
    g.addoption("--ckpt-update-fingerprints", dest="ckpt_update_fingerprints", action="store_true", help="write or refresh the ckpt_fingerprint files instead of asserting against them; delete unused ones.")
    parser.addini("ckpt_atol", "absolute tolerance for checkpoint parity (--ckpt-atol or --atol wins).", default="")
    parser.addini("ckpt_rtol", "relative tolerance for checkpoint parity (--ckpt-rtol or --rtol wins).", default="")
    parser.addini("ckpt_tolerances", "per-path tolerances, one 'glob atol rtol' per line.", type="linelist", default=[])
    parser.addini("ckpt_read_budget", "decoded array data held at once per comparison, in MiB (--ckpt-read-budget wins).", default="")
    parser.addini("ckpt_paths", "named checkpoints, one 'name = path' per line.", type="linelist", default=[])
    parser.addini("ckpt_generate", "generated items for --ckpt-a/--ckpt-b: auto, yes or no (--ckpt-generate wins).", default="auto")


SHORT_SPELLINGS = (("--atol", "ckpt_atol_short", "absolute tolerance for checkpoint parity (same as --ckpt-atol)."),
                   ("--rtol", "ckpt_rtol_short", "relative tolerance for checkpoint parity (same as --ckpt-rtol)."))


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> Any:
    """`--atol` / `--rtol` are added once the project's conftests have added theirs, and only
    when free: a conftest that defines its own `--atol` keeps it (`--ckpt-atol` still works)."""
    result = yield
    taken = _option_names(parser)
    if taken is not None:
        group = parser.getgroup("ckptparity", GROUP)
        for name, dest, help_text in SHORT_SPELLINGS:
            if name not in taken:
                group.addoption(name, dest=dest, metavar="X", help=help_text)
    return result


def _option_names(parser: pytest.Parser) -> Optional[set[str]]:
    """Every option string registered so far; None if pytest's parser cannot tell us."""
    try:
        groups = [parser._anonymous, *parser._groups]  # noqa: SLF001 - no public listing exists
        return {n for g in groups for opt in g.options for n in opt.names()}
    except AttributeError:
        return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ckpt_parity(**kwargs): override assert_ckpt_parity options (atol, rtol, include, exclude, ...) for the ckpt_parity fixture of one test.")
    config.addinivalue_line("markers", "ckpt_matrix(*names): run the test once per pair of named checkpoints (fixture ckpt_pair), ids like 'a-vs-b'.")
    settings = build_settings(config)
    _check_environment()
    _check_report_option(config)
    _check_html_option(config)
    config.stash[settings_key] = settings
    config.stash[stats_key] = RunStats()

    from pytest_ckptparity import _run_hooks  # not api: a session that compares nothing must not load numpy

    verbosity = config.get_verbosity()
    _run_hooks.max_rows = 20 if verbosity <= 0 else (50 if verbosity == 1 else None)

    def record(report: Any) -> None:
        config.stash[stats_key].add_report(report)

    _run_hooks.add_report_listener(record)
    config.stash[listener_key] = record
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistMerge(config), "ckptparity-xdist")
    from pytest_ckptparity._fingerprint_plugin import FingerprintTracker

    config.pluginmanager.register(FingerprintTracker(config), "ckptparity-fingerprints")


def _check_environment() -> None:
    """CKPTPARITY_NATIVE, CKPTPARITY_IN_STEP and CKPTPARITY_THREADS, before any test runs: a misspelt value is
    one sentence, not a failure in whichever test first touches a checkpoint."""
    from pytest_ckptparity import _native, _threads

    with usage_errors():
        _native.check_environment()
        _threads.process_threads()


def _check_report_option(config: pytest.Config) -> None:
    """--ckpt-report: a place to write, before any test runs."""
    path = config.getoption("ckpt_report", None)
    if path is not None and not _is_worker(config):
        from pytest_ckptparity._outputs import check_output_file

        with usage_errors():
            check_output_file(path, "--ckpt-report", "report.json")


def _check_html_option(config: pytest.Config) -> None:
    """--ckpt-html: plotly present and a place to write, before any test runs."""
    path = config.getoption("ckpt_html", None)
    if path is not None and not _is_worker(config):
        from pytest_ckptparity.drift_page import check_output_path, require_plotly

        with usage_errors():
            check_output_path(path, "--ckpt-html")
            require_plotly()


def pytest_unconfigure(config: pytest.Config) -> None:
    record = config.stash.get(listener_key, None)
    if record is not None:
        from pytest_ckptparity import _run_hooks

        _run_hooks.remove_report_listener(record)
        _run_hooks.max_rows = _run_hooks.DEFAULT_MAX_ROWS


class _XdistMerge:
    """Workers ship their statistics; the controller merges them (nothing counted twice)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        data = getattr(node, "workeroutput", {}).get(WORKER_KEY)
        if data:
            self.config.stash[stats_key].merge(data, worker=str(getattr(node, "workerinput", {}).get("workerid", "?")))


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


# --------------------------------------------------------------------------------------
# Generated items
# --------------------------------------------------------------------------------------


def generates_items(config: pytest.Config) -> bool:
    """Generated items run for --ckpt-a/--ckpt-b unless turned off, or, with the default
    `auto`, unless test paths or node ids were named on the command line (then the run is
    about those tests; `--ckpt-generate=yes` adds the items anyway)."""
    settings = config.stash[settings_key]
    if not (settings.ckpt_a and settings.ckpt_b) or settings.generate == "no":
        return False
    return settings.generate == "yes" or not config.option.file_or_dir


def pytest_report_header(config: pytest.Config) -> Optional[str]:
    settings = config.stash.get(settings_key, None)
    if settings is None or not (settings.ckpt_a and settings.ckpt_b):
        return None
    if generates_items(config):
        return f"ckptparity: {settings.ckpt_a} vs {settings.ckpt_b}, generated items on"
    why = "--ckpt-generate=no" if settings.generate == "no" else "test paths were given; --ckpt-generate=yes adds them"
    return f"ckptparity: {settings.ckpt_a} vs {settings.ckpt_b}, generated items off ({why})"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Open and check the --ckpt-a/--ckpt-b pair before any test runs (on the xdist
    controller too, which collects nothing itself): a bad path or a scope that matches
    nothing stops the run with one sentence (exit 4)."""
    config = session.config
    if _is_worker(config):
        return
    settings = config.stash[settings_key]
    if settings.steps is not None and not generates_items(config):
        # The steps apply to generated items only: without them the run would compare one
        # step (through the fixtures) and pass as if it had checked every step.
        why = "--ckpt-generate=no was given" if settings.generate == "no" else "test paths were given (add --ckpt-generate=yes to run them too)"
        raise pytest.UsageError(f"--ckpt-steps applies to the generated items, and this run generates none: {why}; or drop --ckpt-steps.")
    if not generates_items(config):
        return
    with usage_errors():
        _comparison(config, config.stash[settings_key])


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    settings = config.stash[settings_key]
    if not generates_items(config):
        return
    from pytest_ckptparity._items import make_items

    with usage_errors():
        comparison = _comparison(config, settings)
        items.extend(make_items(session, comparison, settings.split))


def _comparison(config: pytest.Config, settings: Settings) -> Any:
    if comparison_key not in config.stash and settings.steps is not None:  # --ckpt-steps: one comparison per step
        from pytest_ckptparity._session import open_trajectory

        config.stash[comparison_key] = open_trajectory(settings)
    if comparison_key not in config.stash:
        from pytest_ckptparity.api import OPTION_NAMES, Comparison, make_options

        kw = dict(settings.helper_kwargs)
        options = make_options(**{k: kw.pop(k) for k in OPTION_NAMES if k in kw})
        a = open_cached(config, settings.ckpt_a, "A", settings.step_a)
        b = open_cached(config, settings.ckpt_b, "B", settings.step_b)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config.stash[comparison_key] = Comparison(a, b, options=options, **{k: kw[k] for k in ("format_a", "format_b", "ignore_rngs", "scan_axis")})
        if not _is_worker(config):  # once per run, in the warnings summary (workers stay quiet)
            for w in caught:
                config.issue_config_time_warning(w.message, stacklevel=2)
    return config.stash[comparison_key]


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


def _configured(request: pytest.FixtureRequest, option_name: str, path: Optional[str], name: str, step: Optional[int]) -> Any:
    if not path:
        pytest.skip(f"no checkpoint given: pass {option_name} PATH to run this test")
    return _open_or_fail(request.config, path, name, step)


def _open_or_fail(config: pytest.Config, path: str, name: str, step: Optional[int]) -> Any:
    """A checkpoint that cannot be opened fails the test with its one sentence, no frames."""
    from pytest_ckptparity.errors import CkptParityUsageError

    try:
        return open_cached(config, path, name, step)
    except CkptParityUsageError as e:
        pytest.fail(str(e), pytrace=False)


def _named(config: pytest.Config, name: str) -> Any:
    """A named checkpoint; an unknown name is an error naming the known ones. Only a run with
    no named checkpoints at all skips (that run is not about them)."""
    settings = config.stash[settings_key]
    if not settings.named:
        pytest.skip(f"no named checkpoints configured: pass --ckpt {name}=PATH or add '{name} = PATH' to ckpt_paths to run this test")
    if name not in settings.named:
        known = ", ".join(repr(n) for n in sorted(settings.named))
        pytest.fail(f"no checkpoint named {name!r}; the configured names are {known} (from --ckpt NAME=PATH and ckpt_paths).", pytrace=False)
    return _open_or_fail(config, settings.named[name], name, settings.step)


@pytest.fixture(scope="session")
def ckpt_a(request: pytest.FixtureRequest) -> Any:
    """Checkpoint A from ``--ckpt-a`` (opened lazily; skips the test when not given).

    Example::

        def test_params_match(ckpt_a, ckpt_b, ckpt_parity):
            ckpt_parity(ckpt_a, ckpt_b, include="params")
    """
    settings = request.config.stash[settings_key]
    return _configured(request, OPT_A, settings.ckpt_a, "A", settings.step_a)


@pytest.fixture(scope="session")
def ckpt_b(request: pytest.FixtureRequest) -> Any:
    """Checkpoint B from ``--ckpt-b``, the reference side (skips the test when not given)."""
    settings = request.config.stash[settings_key]
    return _configured(request, OPT_B, settings.ckpt_b, "B", settings.step_b)


@pytest.fixture(scope="session")
def ckpt(request: pytest.FixtureRequest) -> Callable[[str], Any]:
    """Open a named checkpoint from ``--ckpt NAME=PATH`` or the ``ckpt_paths`` ini key.

    Example::

        def test_nnx_matches_linen(ckpt, ckpt_parity):
            ckpt_parity(ckpt("nnx"), ckpt("linen"))
    """
    def get(name: str) -> Any:
        __tracebackhide__ = True
        return _named(request.config, name)

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
        kw = {**base, **kwargs}
        if "storage_options" not in kwargs and not any(isinstance(x, str) and "://" in x for x in (a, b)):
            kw.pop("storage_options", None)  # the run's --ckpt-storage-option: for URLs only
        return assert_ckpt_parity(a, b, **kw)

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
    return CkptPair(name_a, name_b, _named(request.config, name_a), _named(request.config, name_b))


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Any:
    """Comparisons made while a test runs carry its node id."""
    stats = item.config.stash.get(stats_key, None)
    if stats is not None:
        stats.current_test = item.nodeid
    try:
        return (yield)
    finally:
        if stats is not None:
            stats.current_test = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    stats = item.config.stash.get(stats_key, None)
    if stats is not None and call.when == "call":
        stats.settle(item.nodeid, rep.passed or hasattr(rep, "wasxfail"))
    excinfo = call.excinfo
    if rep.failed and excinfo is not None and not hasattr(rep, "wasxfail"):
        from pytest_ckptparity.errors import CkptParityError, CkptParityUsageError

        verdict = isinstance(excinfo.value, CkptParityError) and getattr(excinfo.value, "report", None) is not None
        if verdict or isinstance(excinfo.value, CkptParityUsageError):
            from pytest_ckptparity._failure import failure_payload, failure_repr

            payload = failure_payload(item, excinfo)
            rep.ckptparity_failure = payload  # plain data: crosses to the xdist controller with the report
            rep.longrepr = failure_repr(payload)
    if call.when == "call" and stats is not None and _writes_pytest_html(item.config):
        _attach_html_extra(item, rep, stats)
    return rep


def _writes_pytest_html(config: pytest.Config) -> bool:
    """pytest-html is installed and this run writes its report (`--html`)."""
    return config.pluginmanager.hasplugin("html") and bool(getattr(config.option, "htmlpath", None))


def _attach_html_extra(item: pytest.Item, rep: pytest.TestReport, stats: RunStats) -> None:
    """With pytest-html: a generated item's comparisons, or a test's failing ones, as a small
    coloured table in its row of the HTML report (plain data, so it crosses xdist too)."""
    from pytest_ckptparity._items import CkptParityItem

    generated = isinstance(item, CkptParityItem)
    mine: list[dict[str, Any]] = []
    for r in reversed(stats.records):  # this test's records are the last ones: no scan of the whole run
        if r.get("test") != item.nodeid:
            break
        mine.append(r)
    records = [r for r in reversed(mine) if generated or not (r.get("passed") or r.get("expected_failure"))]
    if records:
        import pytest_html

        from pytest_ckptparity.drift_page import item_fragment

        rep.extras = [*getattr(rep, "extras", []), pytest_html.extras.html(item_fragment(records))]


@pytest.hookimpl(wrapper=True)
def pytest_report_from_serializable(config: pytest.Config, data: dict[str, Any]) -> Any:
    """On the xdist controller: rebuild the parity failure display from the worker's data."""
    rep = yield
    payload = getattr(rep, "ckptparity_failure", None)
    if payload:
        from pytest_ckptparity._failure import failure_repr

        rep.longrepr = failure_repr(payload)
    return rep


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    stats = config.stash.get(stats_key, None)
    if stats is None:
        return
    if _is_worker(config):
        import socket

        config.workeroutput[WORKER_KEY] = {**stats.to_dict(), "host": socket.gethostname()}  # type: ignore[attr-defined]
        return
    path = config.stash[settings_key].report_path
    if path:
        from pytest_ckptparity.report import json_document

        document = {**json_document(stats.records, tool="pytest", totals=stats.totals()), **stats.step_document()}
        Path(path).write_text(json.dumps(document, indent=1, sort_keys=True))
    _write_html_report(config, stats)


def _write_html_report(config: pytest.Config, stats: RunStats) -> None:
    """--ckpt-html: the drift page from the run's merged records (the JSON report's document)."""
    path = config.getoption("ckpt_html", None)
    if path:
        from pytest_ckptparity.drift_page import write_page
        from pytest_ckptparity.report import json_document

        write_page(json_document(stats.records, tool="pytest", totals=stats.totals()), path)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    stats = config.stash.get(stats_key, None)
    if stats is None or _is_worker(config) or not stats.comparisons:
        return
    from pytest_ckptparity.report import summary_lines

    tr = terminalreporter
    tr.write_sep("=", GROUP)
    for line, failing in summary_lines(stats.totals()):
        tr.write_line(line, red=failing)
    for line, failing in stats.step_summary_lines():  # --ckpt-steps: the first step a leaf leaves tolerance
        tr.write_line(line, red=failing)
    report_path = config.stash[settings_key].report_path
    if report_path:
        tr.write_line(f"JSON report: {report_path}")
    if config.getoption("ckpt_html", None):
        tr.write_line(f"HTML report: {config.getoption('ckpt_html')}")
