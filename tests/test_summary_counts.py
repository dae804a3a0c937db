"""The run summary counts distinct leaves, not rows: a leaf split over per-layer items that
drifted in two layers is one mismatched leaf. Real pytest runs, with and without xdist."""

from __future__ import annotations

import json

import pytest

from pytest_ckptparity import examples as ex

XDIST = [pytest.param([], id="no-xdist"), pytest.param(["-n", "2"], id="n2")]


@pytest.fixture(scope="module")
def per_layer_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The same NNX model twice, one array per layer, the second with wi_0 drifted in layers 0 and 1."""
    root = tmp_path_factory.mktemp("summary")
    p = ex.tiny_params(0)
    drifted = ex.tiny_params(0)
    kernel = drifted["decoder"]["layers"]["mlp"]["wi_0"]["kernel"]  # (emb, layer, mlp)
    kernel[2, 0, 4] += 1.0
    kernel[3, 1, 5] += 0.5
    return {
        "same": ex.save(root / "same", ex.nnx_state(ex.unstack(p, "int_keys"))),
        "drift": ex.save(root / "drift", ex.nnx_state(ex.unstack(drifted, "int_keys"))),
    }


@pytest.mark.parametrize("xdist", XDIST)
def test_a_leaf_drifted_in_two_layer_items_counts_once(pytester, per_layer_pair, tmp_path, xdist):
    report = tmp_path / "parity.json"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--ckpt-a={per_layer_pair['same']}", f"--ckpt-b={per_layer_pair['drift']}",
        "--ckpt-include=params", f"--ckpt-report={report}", "-rf", *xdist,
    )
    assert result.ret == 1
    result.stdout.fnmatch_lines_random([
        "FAILED ckpt-parity::params/decoder/layers[[]0[]]*",
        "FAILED ckpt-parity::params/decoder/layers[[]1[]]*",
        "*checkpoint parity failed: 1 of 9 leaves differ: params/decoder/layers/mlp/wi_0/kernel [[]layer 0[]] (values)*",
        "*checkpoint parity failed: 1 of 9 leaves differ: params/decoder/layers/mlp/wi_0/kernel [[]layer 1[]] (values)*",
        # Two failing rows, one leaf: 12 leaves, 1 mismatched.
        "comparisons: 4 (2 passed, 2 failed)", "leaves: 12 compared (11 match, 1 values differ)",
        "worst leaf: params/decoder/layers/mlp/wi_0/kernel (values) in *",
        "*2 failed, 2 passed*",
    ])
    totals = json.loads(report.read_text())["totals"]
    assert (totals["leaves_compared"], totals["leaves_mismatched"], totals["comparisons"]) == (12, 1, 4)
