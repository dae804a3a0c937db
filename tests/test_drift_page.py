"""The drift report: the HTML page (CLI `--html`, pytest `--ckpt-html`), the pytest-html extras,
the terminal's per-layer strip, and the page as real headless Chromium renders it."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_ckptparity import cli
from pytest_ckptparity import drift_page as dp

XDIST = [pytest.param([], id="no-xdist"), pytest.param(["-n", "2"], id="n2")]
WI0 = "params/decoder/layers/mlp/wi_0/kernel"
WO = "params/decoder/layers/mlp/wo/kernel"
STEPS = (1, 2, 3, 4)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", *args)


def figure_data(page: str, div_id: str) -> list[dict]:
    """The traces plotly is given for one figure of the page, parsed back from its script."""
    at = page.index(f'"{div_id}",')
    start = page.index("[", at)
    data, _ = json.JSONDecoder().raw_decode(page[start:])
    return data


def page_without_plotlyjs(page: str) -> str:
    """The page's own HTML: everything but the embedded plotly.js bundle, and without the
    line-break hints (`<wbr>` after `/` and `::`, tested on their own) so text reads whole."""
    head_end = page.index("</script></head>")
    return unwrapped(page[: page.index("<script", 0)] + page[head_end:])


def unwrapped(markup: str) -> str:
    return markup.replace("<wbr>", "")


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory, demo_ckpts) -> dict:
    """The CLI's page and JSON for the demo's failing pair (layer 1 of wi_0 drifted)."""
    out = tmp_path_factory.mktemp("demo-page")
    page, report = out / "report.html", out / "report.json"
    code = cli.main([demo_ckpts["linen"], demo_ckpts["nnx_drift"], "--html", str(page), "--report", str(report), "--color", "no"])
    return {"code": code, "page": page, "html": page.read_text(), "doc": json.loads(report.read_text())}


# --------------------------------------------------------------------------------------
# The page from the CLI
# --------------------------------------------------------------------------------------


def test_cli_writes_one_self_contained_page_with_heatmap_bars_and_table(demo_page):
    assert demo_page["code"] == cli.EXIT_MISMATCH
    page = demo_page["html"]
    own = page_without_plotlyjs(page)
    # Offline: plotly.js is inside the page, nothing is fetched from a network.
    assert "Plotly.newPlot" in page and len(page) > 3_000_000
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", own)
    assert "parity failed" in own and "Linen TrainState, scanned on axis 1" in own and "NNX state with value wrappers" in own
    # The mismatch table names both drifted leaves with their layer and figures.
    table = own[own.index('<table class="mismatches">'):]
    assert f"<td>{WI0} [layer 1]</td><td>values</td>" in table
    assert "opt_state/0/mu/decoder/layers/mlp/wi_0/kernel [layer 1]" in table and "1/1024 (0.0977%)" in table
    # Heatmap: one row per layered leaf of the comparison, one column per layer.
    layered = [l for l in demo_page["doc"]["comparisons"][0]["leaves"] if l["layers"]]
    (heat,) = figure_data(page, "heatmap-0")
    assert heat["type"] == "heatmap" and len(heat["z"]) == len(layered) == 27 and all(len(r) == 2 for r in heat["z"])
    row = heat["y"].index(WI0)
    assert heat["z"][row][0] is None  # layer 0 identical: no colour on a log scale (grey)
    assert heat["z"][row][1] == dp.LOG_MAX  # 4.87e4 of the allowance saturates the scale ...
    assert heat["customdata"][row][1] == ["1", "0.5", "2.52", "4.87e+04"]  # ... the hover tells the figures
    # Bars: the three leaves that drifted at all, the worst on top (last).
    (bars,) = figure_data(page, "worst-0")
    assert bars["y"] == ["opt_state/0/nu/decoder/layers/mlp/wi_0/kernel", "opt_state/0/mu/decoder/layers/mlp/wi_0/kernel", WI0]
    assert bars["customdata"][-1][4] == "MISMATCH" and bars["customdata"][0][4] == "match"


def test_the_page_is_drawn_from_the_json_document_alone(demo_page, tmp_path):
    # The same document, read back from the JSON report, gives the same figures.
    again = dp.render_page(demo_page["doc"])
    assert figure_data(again, "heatmap-0") == figure_data(demo_page["html"], "heatmap-0")
    grid = dp.layer_grid(demo_page["doc"]["comparisons"])
    assert grid[WI0][0] == (0.0, 0.0, 0.0)
    assert grid[WI0][1][0] == pytest.approx(0.5) and grid[WI0][1][2] == pytest.approx(48741.84, rel=1e-6)


def test_the_terminal_strip_names_the_worst_layer(demo_ckpts, capsys):
    assert cli.main([demo_ckpts["linen"], demo_ckpts["nnx_drift"], "--color", "no"]) == cli.EXIT_MISMATCH
    out = capsys.readouterr().out
    assert "per-layer headroom (. identical  - below 0.1 of the tolerance  + up to the tolerance  # beyond it):" in out
    assert f"  {WI0}  |.#|  layers 0-1; worst layer 1: headroom 48741.8, max abs diff 0.5" in out.splitlines()
    assert cli.main([demo_ckpts["linen"], demo_ckpts["nnx_drift"], "--color", "yes"]) == cli.EXIT_MISMATCH
    rich_out = capsys.readouterr().out
    assert "\x1b[" in rich_out and "\u2588" in rich_out and "worst layer 1: headroom 48741.8" in rich_out
    # A passing comparison has no strip.
    assert cli.main([demo_ckpts["linen"], demo_ckpts["nnx"], "--color", "no"]) == cli.EXIT_PARITY
    assert "per-layer" not in capsys.readouterr().out


def test_the_strip_stays_short_on_deep_stacks_and_out_of_exception_messages(demo_ckpts):
    from pytest_ckptparity._model import LayerDrift, LeafResult, ParityReport, ValueStats
    from pytest_ckptparity.api import compare_checkpoints
    from pytest_ckptparity.report import render_plain

    bad = compare_checkpoints(demo_ckpts["linen"], demo_ckpts["nnx_drift"])
    assert "per-layer" not in render_plain(bad)  # the helper's exception message is unchanged
    drift = tuple(LayerDrift(i, headroom=(5.0 if i == 150 else 0.5 if i % 7 == 0 else 0.0)) for i in range(200))
    deep = ParityReport(results=[LeafResult("w", "values", layers=200, stats=ValueStats(n_total=200, n_mismatch=1, max_abs=1.0, layer_drift=drift))])
    (line,) = [l for l in render_plain(deep, layer_strips=True).splitlines() if l.startswith("  w  |")]
    strip = line.split("|")[1]
    assert len(strip) == 67 and strip[50] == "#" and strip.count("#") == 1 and strip[:3] == "+.+"  # 3 layers a cell
    assert line.endswith("layers 0-199, 3 per cell; worst layer 150: headroom 5, max abs diff 0")


def test_html_option_bad_paths_are_usage_errors_before_any_read(tmp_path, capsys):
    missing = tmp_path / "nope" / "report.html"
    assert cli.main(["/does/not/exist", "/nor/this", "--html", str(missing)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err == f"ckptparity: error: --html {str(missing)!r}: the directory {str(missing.parent)!r} does not exist; create it or write the page elsewhere."
    assert cli.main(["/does/not/exist", "/nor/this", "--html", str(tmp_path)]) == cli.EXIT_USAGE
    assert "is a directory; give a file name such as" in capsys.readouterr().err


def test_a_missing_plotly_is_one_sentence_with_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly -> ImportError
    assert cli.main(["/does/not/exist", "/nor/this", "--html", str(tmp_path / "r.html")]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == "ckptparity: error: the HTML report needs plotly, which is not installed: pip install 'pytest-ckptparity[html]'"
    assert not (tmp_path / "r.html").exists()


def test_loading_the_plugin_or_the_page_module_imports_no_plotly():
    code = "import sys, pytest_ckptparity.plugin, pytest_ckptparity.drift_page; print(sorted(m for m in ('plotly', 'pytest_html', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_every_user_string_is_escaped(demo_ckpts, tmp_path):
    from pytest_ckptparity.api import compare_checkpoints
    from pytest_ckptparity.report import comparison_record, json_document

    evil = ("<script>alert(1)</script>", "b&<b>bold</b>")
    record = comparison_record(compare_checkpoints(demo_ckpts["linen"], demo_ckpts["nnx_drift"], names=evil), test='t[<img src=x onerror="alert(2)">]')
    page = dp.render_page(json_document([record], tool="test"))
    own = page_without_plotlyjs(page)
    assert "<script>alert(1)" not in page and "<img src=x" not in page and "<b>bold" not in own
    assert "&lt;script&gt;alert(1)&lt;/script&gt; vs b&amp;&lt;b&gt;bold&lt;/b&gt;" in own
    assert "t[&lt;img src=x onerror=&quot;alert(2)&quot;&gt;]" in own
    fragment = dp.item_fragment([record])
    assert "<script>" not in fragment and "&lt;script&gt;alert(1)&lt;/script&gt;" in fragment


def test_the_pytest_html_fragment_is_a_coloured_table_without_script(demo_page):
    fragment = dp.item_fragment(demo_page["doc"]["comparisons"])
    assert fragment.startswith('<div class="ckptparity-extra">') and "<script" not in fragment and len(fragment) < 40_000
    assert f'<td title="layer 1: max abs 0.5, max rel 2.52, headroom 4.87e+04" style="background:{dp.headroom_color(48741.84)};' in fragment
    assert f"<td style=\"padding-left:6px\">worst layer 1: 4.87e+04</td>" in fragment
    assert dp.headroom_color(0.0) == dp.IDENTICAL_COLOR and dp.headroom_color(1e9) == "#9b1c1c"
    assert dp.headroom_color(0.5) != dp.headroom_color(2.0)


# --------------------------------------------------------------------------------------
# Comparisons at several steps
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drift_runs(tmp_path_factory) -> dict[str, str]:
    """Two manager roots with steps 1-4: B's layer 2 of mlp/wo drifts from step 2 on, more
    each step; layer 1 of self_attention/query carries a drift well within tolerance."""
    from pytest_ckptparity import examples as ex

    root = tmp_path_factory.mktemp("runs")
    base = ex.tiny_params(0, layers=4)
    for step in STEPS:
        ex.save(root / "a", ex.linen_train_state(base, step=step), step=step)
        drifted = ex.tiny_params(0, layers=4)
        drifted["decoder"]["layers"]["self_attention"]["query"]["kernel"][:, 1] += 1e-8
        if step >= 2:
            drifted["decoder"]["layers"]["mlp"]["wo"]["kernel"][:, 2, :] += 1e-3 * (step - 1)
        ex.save(root / "b", ex.linen_train_state(drifted, step=step), step=step)
    return {"a": str(root / "a"), "b": str(root / "b")}


@pytest.fixture(scope="module")
def steps_document(drift_runs) -> dict:
    from pytest_ckptparity.api import compare_checkpoints
    from pytest_ckptparity.report import comparison_record, json_document

    records = [comparison_record(compare_checkpoints(drift_runs["a"], drift_runs["b"], step_a=s, step_b=s, names=("before", "after"))) for s in STEPS]
    return json_document(records, tool="test")


def test_cli_steps_html_names_the_same_first_step_as_the_terminal(drift_runs, tmp_path, capsys):
    page = tmp_path / "steps.html"
    assert cli.main([drift_runs["a"], drift_runs["b"], "--steps", "all", "--html", str(page), "--color", "no"]) == cli.EXIT_MISMATCH
    out = capsys.readouterr().out
    # The terminal: "first step at which each leaf leaves tolerance:" then "  step 2: <leaf [layers] (figures)>".
    lines = out.splitlines()
    said = lines[lines.index("first step at which each leaf leaves tolerance:") + 1].split("  step 2: ", 1)[1]
    assert f"first out of tolerance at step 2: {said}" in out
    assert said.startswith(f"{WO} [layer 2] (values, max abs diff ")
    own = page_without_plotlyjs(page.read_text())
    assert f"<b>First step outside tolerance: step 2</b>: {html.escape(said)}</p>" in own
    assert [t["x"] for t in figure_data(page.read_text(), "steps-0")][0] == [1, 2, 3, 4]


def test_several_steps_draw_headroom_per_step_and_name_the_first_step_outside(steps_document):
    (section,) = dp.sections(steps_document)  # one pair, read at four steps
    assert section.steps == ["1", "2", "3", "4"] and section.names == ("before", "after")
    step, drifts = dp.first_step_outside(section)
    assert step == 2 and [(d.path, d.layers) for d in drifts] == [(WO, (2,))]
    page = dp.render_page(steps_document)
    own = page_without_plotlyjs(page)
    assert f"<b>First step outside tolerance: step 2</b>: {WO} [layer 2] (values, max abs diff " in own
    # One pair read at every step: each side is named by its manager root.
    assert "<tr><th>steps</th><td>1, 2, 3, 4</td></tr>" in own and f", at {steps_document['comparisons'][0]['locations'][0].rsplit('/', 2)[0]}</td>" in own
    lines = {t["name"]: t for t in figure_data(page, "steps-0")}
    assert list(lines["params/decoder/layers/mlp/wo/kernel"]["x"]) == [1, 2, 3, 4]
    wo = lines[WO]["y"]
    assert wo[0] is None and 1 < wo[1] < wo[2] < wo[3]  # identical at step 1, then growing
    query = lines["params/decoder/layers/self_attention/query/kernel"]["y"]
    assert all(0 < h < 1 for h in query)  # drifted, within tolerance at every step
    (by_layer,) = figure_data(page, "steps-layers-0")
    assert len(by_layer["z"]) == 4 and all(len(r) == 4 for r in by_layer["z"])  # layers x steps
    assert by_layer["z"][2][0] is None and by_layer["z"][2][1] > 0 > by_layer["z"][1][0]
    # The per-layer heatmap shows the last step; the table lists the mismatches of every step.
    assert re.findall(r'"text":"(headroom by layer[^"]*?):', page) == ["headroom by layer at step 4"], re.findall(r'headroom by layer.{0,80}', page)
    table = own[own.index('<table class="mismatches">'):]
    assert table.count(f"<td>{WO} [layer 2]</td>") == 3 and "<th>step</th>" in table


# --------------------------------------------------------------------------------------
# pytest: --ckpt-html and pytest-html extras
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("xdist", XDIST)
def test_pytest_writes_the_page_from_the_merged_records(pytester, demo_ckpts, xdist):
    # NNX against NNX: both store a layer per array, so every layer is an item of its own.
    result = run(pytester, f"--ckpt-a={demo_ckpts['nnx']}", f"--ckpt-b={demo_ckpts['nnx_drift']}", "--ckpt-html=drift.html", "--ckpt-report=r.json", *xdist)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["HTML report: drift.html"])
    page = (pytester.path / "drift.html").read_text()
    doc = json.loads((pytester.path / "r.json").read_text())
    assert len(doc["comparisons"]) == 13  # one record per generated item, from every worker
    assert {tuple(l["layer_range"]) for c in doc["comparisons"] for l in c["leaves"] if l["path"] == WI0} == {(0, 1), (1, 2)}
    (heat,) = figure_data(page, "heatmap-0")
    # Items split the stacks by layer; the page puts the layers of a leaf back in one row.
    assert len(heat["z"]) == 27 and all(len(r) == 2 for r in heat["z"])
    row = heat["y"].index(WI0)
    assert heat["z"][row][0] is None and heat["z"][row][1] == dp.LOG_MAX
    own = page_without_plotlyjs(page)
    assert "ckpt-parity::params/decoder/layers[1]" in own and "parity failed" in own


def test_pytest_html_option_bad_path_is_a_usage_error(pytester, demo_ckpts):
    result = run(pytester, f"--ckpt-a={demo_ckpts['linen']}", f"--ckpt-b={demo_ckpts['nnx']}", "--ckpt-html=missing/drift.html")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--ckpt-html 'missing/drift.html': the directory 'missing' does not exist; create it or write the page elsewhere."])
    assert "Traceback" not in result.stderr.str()


USER_TESTS = """
from pytest_ckptparity import assert_ckpt_parity

def test_migration_fails():
    assert_ckpt_parity({linen!r}, {drift!r}, names=("linen", "nnx"))

def test_migration_passes():
    assert_ckpt_parity({linen!r}, {nnx!r})
"""


def pytest_html_results(page: str) -> dict[str, list[dict]]:
    """pytest-html's page keeps its results as JSON in `data-jsonblob`: test id -> its results."""
    blob = re.search(r'data-jsonblob="([^"]*)"', page).group(1)
    return json.loads(html.unescape(blob))["tests"]


@pytest.mark.parametrize("xdist", XDIST)
def test_pytest_html_report_carries_each_items_picture(pytester, demo_ckpts, xdist):
    pytest.importorskip("pytest_html")
    pytester.makepyfile(test_user=USER_TESTS.format(linen=demo_ckpts["linen"], drift=demo_ckpts["nnx_drift"], nnx=demo_ckpts["nnx"]))
    result = run(
        pytester, "test_user.py", f"--ckpt-a={demo_ckpts['nnx']}", f"--ckpt-b={demo_ckpts['nnx_drift']}", "--ckpt-generate=yes",
        "--html=report.html", "--self-contained-html", *xdist,
    )
    assert result.ret == 1
    tests = pytest_html_results((pytester.path / "report.html").read_text())
    extras = {test_id: [e for r in results for e in r.get("extras", [])] for test_id, results in tests.items()}
    generated = [t for t in extras if t.startswith("ckpt-parity::")]
    assert len(generated) == 13
    for test_id in generated:  # every generated item, pass or fail, has its picture
        (extra,) = extras[test_id]
        assert extra["format_type"] == "html" and extra["content"].startswith('<div class="ckptparity-extra">')
    failing = extras["ckpt-parity::params/decoder/layers[1]"][0]["content"]
    assert f"<td style=\"padding-right:6px\">{WI0}</td>" in failing and "worst layer 1: 4.87e+04" in failing
    assert '<table class="mismatches">' in failing and "parity failed" in failing
    passing = extras["ckpt-parity::params/decoder/layers[0]"][0]["content"]
    assert "<b style=\"color:#1a7f37\">parity</b>" in passing and "mismatches" not in passing
    # A user's failing helper call has its picture; a passing one adds nothing.
    (user,) = extras["test_user.py::test_migration_fails"]
    assert "linen vs nnx" in user["content"] and f"{WI0} [layer 1]" in unwrapped(user["content"])
    assert extras["test_user.py::test_migration_passes"] == []


def test_without_pytest_html_nothing_changes(pytester, demo_ckpts):
    result = run(pytester, f"--ckpt-a={demo_ckpts['nnx']}", f"--ckpt-b={demo_ckpts['nnx_drift']}", "-p", "no:html")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*2 failed, 11 passed*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


# --------------------------------------------------------------------------------------
# The page in a real browser
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    sys.path.insert(0, str(Path(__file__).parent))
    from browser import Chromium, find_chromium

    binary = find_chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing in CI: .ci/run installs it with apt-get install chromium")
        pytest.skip("Chromium is not installed (apt-get install chromium): the page is not opened in a browser")
    with Chromium(binary, timeout=60) as browser:
        yield browser


def test_the_page_renders_in_chromium(chromium, demo_page, steps_document, tmp_path):
    from browser import FIGURES_JS

    chromium.open(demo_page["page"])
    chromium.wait_for("document.querySelectorAll('.js-plotly-plot').length === 2 && Array.from(document.querySelectorAll('.js-plotly-plot')).every(gd => gd._fullData)")
    figures = {f["id"]: f for f in chromium.evaluate(FIGURES_JS)}
    heat = figures["heatmap-0"]
    assert heat["drawn"] >= 1 and heat["heatmap_images"] == 1
    assert heat["traces"][0]["type"] == "heatmap" and (heat["traces"][0]["rows"], heat["traces"][0]["cols"]) == (27, 2)
    assert figures["worst-0"]["bars"] == 3
    assert chromium.evaluate("document.querySelectorAll('table.mismatches tr').length") == 3  # header + 2 leaves
    assert chromium.errors == []
    shot = chromium.screenshot(tmp_path / "page.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    # The page of a run at several steps: the step lines, the step x layer map, the heatmap.
    steps_page = tmp_path / "steps.html"
    dp.write_page(steps_document, str(steps_page))
    chromium.open(steps_page)
    chromium.wait_for("document.querySelectorAll('.js-plotly-plot').length === 4 && Array.from(document.querySelectorAll('.js-plotly-plot')).every(gd => gd._fullData)")
    figures = {f["id"]: f for f in chromium.evaluate(FIGURES_JS)}
    assert set(figures) == {"steps-0", "steps-layers-0", "heatmap-0", "worst-0"}
    assert figures["steps-0"]["lines"] == len(figures["steps-0"]["traces"]) >= 2
    assert (figures["steps-layers-0"]["traces"][0]["rows"], figures["steps-layers-0"]["traces"][0]["cols"]) == (4, 4)
    # Hover works: plotly answers a hover on the drifted cell with its figures.
    chromium.evaluate("(() => { const gd = document.getElementById('heatmap-0'); Plotly.Fx.hover(gd, {xval: 2, yval: gd.data[0].y.indexOf('%s')}); })()" % WO)
    label = chromium.wait_for("document.querySelector('#heatmap-0 .hoverlayer').textContent", timeout=10)
    assert label == WO + "layer 2max abs 0.003max rel 2.55headroom 300"
    assert chromium.errors == []


def test_the_browser_check_sees_script_errors(chromium, tmp_path):
    # The "no errors" assertion above can fail: a page that throws is caught.
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>console.error('drawn badly'); notAFunction();</script></body></html>")
    chromium.open(broken)
    chromium.wait_for("document.readyState === 'complete'")
    assert any("drawn badly" in e for e in chromium.errors) and any("notAFunction is not defined" in e for e in chromium.errors)


def test_a_matrix_of_pairs_draws_one_section_per_pair(demo_ckpts):
    from pytest_ckptparity.api import compare_checkpoints
    from pytest_ckptparity.report import comparison_record, json_document

    records = [
        comparison_record(compare_checkpoints(demo_ckpts["linen"], demo_ckpts["nnx"], names=("linen", "nnx")), test="t[linen-vs-nnx]"),
        comparison_record(compare_checkpoints(demo_ckpts["linen"], demo_ckpts["nnx_drift"], names=("linen", "nnx_drift")), test="t[linen-vs-nnx_drift]"),
    ]
    page = dp.render_page(json_document(records, tool="pytest"))
    own = page_without_plotlyjs(page)
    assert [s.names for s in dp.sections(json_document(records, tool="pytest"))] == [("linen", "nnx"), ("linen", "nnx_drift")]
    assert '<h2>linen vs nnx: <span class="verdict-pass">parity</span></h2>' in own
    assert '<h2>linen vs nnx_drift: <span class="verdict-fail">parity failed</span></h2>' in own
    # The identical pair: an all-grey heatmap, no bars, no mismatch rows.
    (same,) = figure_data(page, "heatmap-0")
    assert len(same["z"]) == 27 and all(v is None for row in same["z"] for v in row)
    assert '"worst-0"' not in page and "Every compared value is identical: no leaf has drifted." in own
    section0 = own[own.index('<section id="pair-0">'):own.index('<section id="pair-1">')]
    assert "No leaf differs." in section0
    (drifted,) = figure_data(page, "heatmap-1")
    assert drifted["z"][drifted["y"].index(WI0)][1] == dp.LOG_MAX
    assert "<td>t[linen-vs-nnx_drift]</td>" in own


def test_a_step_committed_on_one_side_only_is_said_in_its_pair(steps_document):
    from pytest_ckptparity.report import json_document
    from pytest_ckptparity.trajectory import missing_step_record

    roots = tuple(loc.rsplit("/", 2)[0] for loc in steps_document["comparisons"][0]["locations"])
    sentence = "step 5 is committed in before only: after's step 5 does not exist there (after's committed steps: 1, 2, 3, 4)"
    records = [*steps_document["comparisons"], missing_step_record(5, 0, ("before", "after"), roots, sentence)]
    page = dp.render_page(json_document(records, tool="test"))
    (section,) = dp.sections(json_document(records, tool="test"))  # the same pair as its compared steps
    assert section.steps == ["1", "2", "3", "4", "5"]
    own = page_without_plotlyjs(page)
    assert f'<p class="verdict-fail">{html.escape(sentence)}</p>' in own
    assert [t["x"] for t in figure_data(page, "steps-0")][0] == [1, 2, 3, 4, 5]
    assert "headroom by layer at step 4:" in page  # the last step compared, not the missing one


@pytest.mark.parametrize("xdist", XDIST)
def test_pytest_over_steps_draws_the_step_figures(pytester, drift_runs, xdist):
    result = run(pytester, f"--ckpt-a={drift_runs['a']}", f"--ckpt-b={drift_runs['b']}", "--ckpt-steps=all", "--ckpt-html=steps.html", *xdist)
    assert result.ret == 1
    page = (pytester.path / "steps.html").read_text()
    own = page_without_plotlyjs(page)
    # Items per step and subtree, from every worker: one pair, four steps, the first drift named.
    assert "<tr><th>steps</th><td>1, 2, 3, 4</td></tr>" in own
    assert f"<b>First step outside tolerance: step 2</b>: {WO} [layer 2] (values, max abs diff " in own
    lines = {t["name"]: t["y"] for t in figure_data(page, "steps-0")}
    assert lines[WO][0] is None and 1 < lines[WO][1] < lines[WO][2] < lines[WO][3]
    (heat,) = figure_data(page, "heatmap-0")
    assert all(len(r) == 4 for r in heat["z"]) and heat["z"][heat["y"].index(WO)][2] > 0
    assert "ckpt-parity::step_2/" in own  # the mismatch table names the item of each step


def test_an_identical_pair_shows_every_row_and_layer_in_chromium(chromium, demo_ckpts, tmp_path):
    """Every cell of an identical pair is a gap: plotly must still label each row and layer
    (it infers neither from gaps alone), or the grey map says nothing about what was compared."""
    from pytest_ckptparity.api import compare_checkpoints
    from pytest_ckptparity.report import comparison_record, json_document

    record = comparison_record(compare_checkpoints(demo_ckpts["linen"], demo_ckpts["nnx"], names=("linen", "nnx")))
    page = tmp_path / "same.html"
    dp.write_page(json_document([record], tool="pytest"), str(page))
    chromium.open(page)
    chromium.wait_for("document.querySelectorAll('.js-plotly-plot').length === 1 && document.getElementById('heatmap-0')._fullData")
    rows = chromium.evaluate("Array.from(document.querySelectorAll('#heatmap-0 .yaxislayer-above .ytick text')).map(t => t.textContent)")
    layers = chromium.evaluate("Array.from(document.querySelectorAll('#heatmap-0 .xaxislayer-above .xtick text')).map(t => t.textContent)")
    assert len(rows) == 27 and WI0 in rows
    assert layers == ["0", "1"]
    assert chromium.errors == []


# --------------------------------------------------------------------------------------
# What a new user met: labels, fingerprints, wide tables, contrast, legends, headings
# --------------------------------------------------------------------------------------


def _at_1200px(chromium):
    """The module's browser, narrowed to a 1200 px window for one test (restored after)."""
    chromium.call("Emulation.setDeviceMetricsOverride", {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False})


def _restore_width(chromium):
    chromium.call("Emulation.setDeviceMetricsOverride", {"width": chromium.size[0], "height": chromium.size[1], "deviceScaleFactor": 1, "mobile": False})


def _wait_drawn(chromium, n: int) -> None:
    chromium.wait_for(f"document.querySelectorAll('.js-plotly-plot').length === {n} && "
                      "Array.from(document.querySelectorAll('.js-plotly-plot')).every(gd => gd._fullData)")


def _rgb(css: str) -> str:
    """`rgb(1, 2, 3)` -> `#010203`."""
    r, g, b = (int(v) for v in re.findall(r"\d+", css)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


LABEL_AND_LINE_JS = """
((id) => {
  const gd = document.getElementById(id);
  const lines = Array.from(gd.querySelectorAll('.shapelayer path')).map(p => p.getBoundingClientRect());
  const labels = Array.from(gd.querySelectorAll('.annotation')).filter(a => a.textContent === 'tolerance').map(a => a.querySelector('.annotation-text').getBoundingClientRect());
  const box = r => ({left: r.left, right: r.right, top: r.top, bottom: r.bottom, cx: (r.left + r.right) / 2, cy: (r.top + r.bottom) / 2});
  return {lines: lines.map(box), labels: labels.map(box)};
})
"""


@pytest.fixture(scope="module")
def one_leaf_steps_document(drift_runs) -> dict:
    """The runs of `drift_runs` compared on mlp/wo alone: one leaf drifts, at steps 2-4."""
    from pytest_ckptparity.api import compare_checkpoints
    from pytest_ckptparity.report import comparison_record, json_document

    records = [comparison_record(compare_checkpoints(drift_runs["a"], drift_runs["b"], step=s, include=WO)) for s in STEPS]
    return json_document(records, tool="test")


def test_tolerance_labels_sit_at_their_dashed_lines_and_one_leaf_has_a_legend(chromium, demo_page, one_leaf_steps_document, tmp_path):
    """On log axes plotly reads annotation positions as log10: a label given at 1 lands at 10."""
    from browser import FIGURES_JS

    chromium.open(demo_page["page"])
    _wait_drawn(chromium, 2)
    at = chromium.evaluate(LABEL_AND_LINE_JS + "('worst-0')")
    (line,), (label,) = at["lines"], at["labels"]
    assert abs(label["cx"] - line["cx"]) < 3, at  # centred on the line at 1, not a decade right of it
    assert label["bottom"] <= line["top"] + 1  # above the plot, where the line starts
    page = tmp_path / "one-leaf.html"
    dp.write_page(one_leaf_steps_document, str(page))
    chromium.open(page)
    _wait_drawn(chromium, 4)
    at = chromium.evaluate(LABEL_AND_LINE_JS + "('steps-0')")
    (line,), (label,) = at["lines"], at["labels"]
    assert 0 <= line["cy"] - label["bottom"] < 6, at  # sitting on the line at 1, not on 10
    assert label["left"] - line["left"] < 10
    # One drifted leaf: its line is still named (plotly hides a legend of one trace by default).
    figures = {f["id"]: f for f in chromium.evaluate(FIGURES_JS)}
    assert figures["steps-0"]["lines"] == 1
    assert chromium.evaluate("Array.from(document.querySelectorAll('#steps-0 .legend .traces')).map(t => t.textContent)") == [WO]
    assert chromium.errors == []


def test_against_a_fingerprint_the_page_says_statistics_only_and_shows_what_moved(demo_ckpts, tmp_path, capsys):
    from pytest_ckptparity.api import take_fingerprint
    from pytest_ckptparity.fingerprint import write_fingerprint

    golden = write_fingerprint(take_fingerprint(demo_ckpts["linen"]), tmp_path / "linen.json")
    page, report = tmp_path / "fp.html", tmp_path / "fp.json"
    assert cli.main([demo_ckpts["nnx_drift"], str(golden), "--html", str(page), "--report", str(report), "--color", "no"]) == cli.EXIT_MISMATCH
    out, err = capsys.readouterr()
    # The command says the not-bit-identical sentence once, in the report's header, not again as a warning.
    assert "2 leaves are not bit-identical to the fingerprint" in out and "not bit-identical" not in err
    (record,) = json.loads(report.read_text())["comparisons"]
    (failing,) = [l for l in record["leaves"] if not l["ok"]]
    assert failing["kind"] == "statistics" and failing["stats"]["n_mismatch"] == 0 and failing["stats"]["headroom"] == 0
    own = page_without_plotlyjs(page.read_text())
    # No "identical" next to "parity failed", no element figures that are not there, no empty charts.
    assert "parity failed" in own and "identical" not in own.lower().replace("not bit-identical", "")
    assert "<b>Compared with a fingerprint: statistics only, no per-element figures</b>" in own
    assert '"heatmap-0"' not in page.read_text() and '"worst-0"' not in page.read_text()
    # The failing row says which statistics moved, in place of 0/1024 and a grey 0.
    table = own[own.index('<table class="mismatches">'):]
    assert '<th colspan="4">statistics that moved</th>' in table and "0/1024" not in table and "background:" not in table
    assert f'<td>{WI0} [layer 1]</td><td>statistics</td>' in table
    assert '<td colspan="4" class="why">layer 1: mean ' in table and "(moved +0.000977, allowed 1.03e-05)" in table
    # The comparison's header notes: two leaves of the optimizer state are not bit-identical.
    (note,) = record["notes"]
    assert note.startswith("2 leaves are not bit-identical to the fingerprint")
    assert f'<ul class="notes"><li>{html.escape(note)}</li></ul>' in own
    # The pytest-html picture says the same.
    fragment = dp.item_fragment([record])
    assert f"39 leaves, 1 differ, {dp.STATISTICS_ONLY}" in fragment and "headroom 0" not in fragment
    assert html.escape(note) in fragment and "layer 1: mean " in fragment


def test_header_notes_show_for_every_comparison_and_a_structural_failure_is_not_identical(demo_ckpts):
    import numpy as np

    from pytest_ckptparity.api import compare_checkpoints
    from pytest_ckptparity.report import comparison_record, json_document

    noted = comparison_record(compare_checkpoints(demo_ckpts["linen"], demo_ckpts["nnx"], exclude="no_such_group/**", names=("linen", "nnx")))
    shapes = comparison_record(compare_checkpoints({"params": {"w": np.zeros(3, np.float32)}}, {"params": {"w": np.zeros(4, np.float32)}}, names=("3", "4")))
    assert noted["passed"] and noted["notes"] == ["exclude glob 'no_such_group/**' matched nothing (top-level groups: opt_state, params, step)"]
    own = page_without_plotlyjs(dp.render_page(json_document([noted, shapes], tool="test")))
    first, second = own.split('<section id="pair-1">')
    assert f'<ul class="notes"><li>{html.escape(noted["notes"][0])}</li></ul>' in first
    assert "Every compared value is identical: no leaf has drifted." in first
    # Only a shape differs: no value drifted, but the page must not call the pair identical.
    assert "identical" not in second and "parity failed" in second
    assert "No value compared element by element has drifted; the leaves below differ in structure (see their kind)." in second
    assert "<td>params/w</td><td>shape</td>" in second


def test_the_mismatch_table_of_a_pytest_run_fits_a_1200px_window(chromium, demo_ckpts, tmp_path):
    from pytest_ckptparity.api import compare_checkpoints
    from pytest_ckptparity.report import comparison_record, json_document

    long_id = "tests/integration/test_migration_matrix.py::test_linen_checkpoint_restores_into_nnx_with_parity[llama-7b-scanned-to-unrolled]"
    record = comparison_record(compare_checkpoints(demo_ckpts["linen"], demo_ckpts["nnx_drift"]), test=long_id)
    page = tmp_path / "pytest.html"
    dp.write_page(json_document([record], tool="pytest"), str(page))
    _at_1200px(chromium)
    try:
        chromium.open(page)
        _wait_drawn(chromium, 2)
        widths = chromium.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth, "
                                   "document.querySelector('table.mismatches').getBoundingClientRect().right]")
        assert widths[0] <= widths[1] <= 1200 and widths[2] <= widths[1], widths
        # Numbers and tolerances stay whole: each on one line (a range over a wrapped text has two boxes).
        lines = chromium.evaluate("""Array.from(document.querySelectorAll('table.mismatches td.num, table.mismatches span[style*="nowrap"]')).map(e => {
            const r = document.createRange(); r.selectNodeContents(e); return [e.textContent, r.getClientRects().length]; })""")
        assert {"atol=1e-05,", "rtol=1.3e-06", "4.87e+04", "1/1024 (0.0977%)"} <= {t for t, _ in lines}
        assert [t for t, n in lines if n != 1] == []
        heading = chromium.evaluate("document.querySelector('table.mismatches th:last-child').textContent")
        assert heading == "tolerance"
        assert chromium.errors == []
    finally:
        _restore_width(chromium)
    # It wraps long test ids and paths between their names.
    raw = page.read_text()
    assert "test_migration_matrix.py::<wbr>test_linen" in raw and "params/<wbr>decoder/<wbr>layers" in raw


def test_headroom_cells_have_readable_text_on_every_colour(chromium, demo_page):
    # Over the whole colour scale, black or white text reaches 4.5:1 (WCAG body text).
    for e in range(-800, 700):
        bg = dp.headroom_color(10 ** (e / 100))
        assert dp.contrast_ratio(dp.text_color(bg), bg) >= 4.5, (e, bg)
    assert dp.text_color(dp.headroom_color(48741.84)) == "#ffffff" and dp.text_color(dp.headroom_color(50)) == "#000000"
    # The page as Chromium paints it: the headroom cells' text against their background.
    chromium.open(demo_page["page"])
    _wait_drawn(chromium, 2)
    cells = chromium.evaluate("Array.from(document.querySelectorAll('table.mismatches td')).filter(td => td.style.background)"
                              ".map(td => [td.textContent, getComputedStyle(td).color, getComputedStyle(td).backgroundColor])")
    assert {t for t, _, _ in cells} == {"50", "4.87e+04"}
    for text, fg, bg in cells:
        assert dp.contrast_ratio(_rgb(fg), _rgb(bg)) >= 4.5, (text, fg, bg)
    # The pytest-html picture sets its own text colour (that report's CSS colours cells grey).
    fragment = dp.item_fragment(demo_page["doc"]["comparisons"])
    coloured = re.findall(r'<td[^>]*background:(#[0-9a-f]{6});color:(#[0-9a-f]{6})[^>]*>([^<]+)</td>', fragment)
    assert sorted(t for _, _, t in coloured) == ["4.87e+04", "50"]
    assert all(dp.contrast_ratio(fg, bg) >= 4.5 for bg, fg, _ in coloured)
    texted = re.findall(r'<td[^>]*background:[^>]*>([^<]+)</td>', fragment)
    assert len(texted) == len(coloured)  # every cell with a background and text has its colour


SAME_NAMES_TESTS = """
from pytest_ckptparity import assert_ckpt_parity

def test_linen_to_nnx():
    assert_ckpt_parity({linen!r}, {drift!r})

def test_nnx_to_nnx():
    assert_ckpt_parity({nnx!r}, {drift!r})
"""


@pytest.mark.parametrize("xdist", XDIST)
def test_sections_of_the_same_names_are_told_apart_by_their_test(pytester, demo_ckpts, xdist):
    pytester.makepyfile(test_user=SAME_NAMES_TESTS.format(linen=demo_ckpts["linen"], drift=demo_ckpts["nnx_drift"], nnx=demo_ckpts["nnx"]))
    result = run(pytester, "test_user.py", "--ckpt-html=drift.html", *xdist)
    assert result.ret == 1
    own = page_without_plotlyjs((pytester.path / "drift.html").read_text())
    headings = sorted(re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<h2>(.*?)</h2>", own))
    assert headings == ["A vs B (test_user.py::test_linen_to_nnx): parity failed", "A vs B (test_user.py::test_nnx_to_nnx): parity failed"]


def test_an_empty_html_path_is_said_to_be_empty(capsys):
    assert cli.main(["/does/not/exist", "/nor/this", "--html", ""]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == "ckptparity: error: --html '': the path is empty; give the page a file name, such as 'report.html'."
