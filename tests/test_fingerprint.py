"""Fingerprints: taken on real orbax checkpoints of every layout, the file format and its
checks, the verdict rule (property-tested), the CLI and the pytest surface (pytester, with
and without xdist)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pytest_ckptparity import CkptParityError, CkptParityUsageError, assert_ckpt_fingerprint, compare_checkpoints, take_fingerprint
from pytest_ckptparity.fingerprint import (
    STAT_FIELDS, Fingerprint, LeafPrint, Stats, from_json, read_fingerprint, to_json, write_fingerprint,
)
from pytest_ckptparity.fingerprint_diff import allowances, resolution

XDIST = [pytest.param([], id="no-xdist"), pytest.param(["-n", "2"], id="n2")]
PROPS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def reference_digest(canonical: np.ndarray, offset: int = 0) -> int:
    """The digest as documented, computed the slow obvious way over a canonical array (or a
    layer of one, whose first element sits at flat position `offset` of its leaf)."""
    a = np.ascontiguousarray(canonical).reshape(-1)
    if a.dtype.kind == "i":
        bits = [int(v) & (2**64 - 1) for v in a.astype(np.int64)]
    elif a.dtype.kind in "ub":
        bits = [int(v) for v in a.astype(np.uint64)]
    else:
        bits = [int(v) for v in a.view(f"<u{a.dtype.itemsize}")]
    total = 0
    for i, b in enumerate(bits):
        z = (b + (offset + i) * 0x9E3779B97F4A7C15) & (2**64 - 1)
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        total = (total + (z ^ (z >> 31))) & (2**64 - 1)
    return total


def numpy_stats(x: np.ndarray) -> dict[str, float]:
    y = np.asarray(x).astype(np.float64).reshape(-1)
    return {"count": y.size, "min": y.min(), "max": y.max(), "mean": y.mean(), "std": y.std(), "l2": float(np.sqrt((y * y).sum())), "sum_abs": np.abs(y).sum()}


# --------------------------------------------------------------------------------------
# Taking fingerprints of real checkpoints
# --------------------------------------------------------------------------------------


def test_every_layout_of_one_model_has_one_fingerprint(variants):
    prints = {name: take_fingerprint(path) for name, path in variants.items()}
    full = ["linen_scan", "linen_noscan", "nnx_wrapped", "nnx_wrapped_scan", "nnx_pure", "nnx_pure_intkeys", "maxtext"]
    ref = prints["linen_scan"]
    assert len(ref.leaves) == 39
    for name in full:
        fp = prints[name]
        assert set(fp.leaves) == set(ref.leaves), name
        for path, lp in ref.leaves.items():
            other = fp.leaves[path]
            assert (other.shape, other.digest, other.layer_digests) == (lp.shape, lp.digest, lp.layer_digests), (name, path)
            counter = path.rsplit("/", 1)[-1] in ("step", "count")  # int32 in Linen, uint32 in NNX: hashed by value
            assert other.dtype == lp.dtype or counter, (name, path)
            for s, t in zip((other.stats, *other.layer_stats), (lp.stats, *lp.layer_stats)):
                assert s.row() == pytest.approx(t.row(), rel=1e-12, abs=1e-15), (name, path)
    # bf16 decode checkpoints, scanned and unrolled: one fingerprint, and their params differ from float32's.
    ds, du = prints["decode_scan"], prints["decode_unroll"]
    assert {p: l.digest for p, l in ds.leaves.items()} == {p: l.digest for p, l in du.leaves.items()}
    assert ds.leaves["params/decoder/layers/mlp/wo/kernel"].dtype == "bfloat16"
    assert ds.leaves["params/decoder/layers/mlp/wo/kernel"].digest != ref.leaves["params/decoder/layers/mlp/wo/kernel"].digest
    layered = ref.leaves["params/decoder/layers/mlp/wi_0/kernel"]
    assert layered.layers == 2 and layered.stack == "params/decoder/layers" and len(layered.layer_stats) == 2


def test_maxtext_samples_against_fingerprints(samples, tmp_path):
    # The MaxText decode checkpoints, stacked and unrolled, hold the same bf16 weights.
    ds, du = take_fingerprint(samples["maxtext_decode_scan"]), take_fingerprint(samples["maxtext_decode_unroll"])
    assert len(ds.leaves) == 12 and {p: l.digest for p, l in ds.leaves.items()} == {p: l.digest for p, l in du.leaves.items()}
    # They are the scanned training weights cast to bf16: within bf16's tolerance of its fingerprint.
    golden = write_fingerprint(take_fingerprint(samples["maxtext_nnx_scan"]), tmp_path / "nnx_scan.json")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cast changes every bit by design: no "not bit-identical" warning
        report = compare_checkpoints(samples["maxtext_decode_unroll"], str(golden), dtype_policy="cast", include="params")
    assert report.passed and len(report.results) == 12
    cast = [r for r in report.results if r.dtype_a != r.dtype_b]
    assert cast and all(any(n.startswith("not bit-identical (compared as bfloat16: a cast changes the bits)") for n in r.notes) for r in cast)
    assert not any("not bit-identical to the fingerprint" in n for n in report.notes)
    # The unscanned sample was initialised from another seed: every weight leaf fails, per layer.
    report = compare_checkpoints(samples["maxtext_nnx_noscan"], str(golden), include="params")
    bad = {r.path: r.stats.mismatched_layers for r in report.mismatches}
    assert bad["params/decoder/layers/mlp/wi_0/kernel"] == (0, 1)
    assert "params/decoder/decoder_norm/scale" not in bad  # ones in both: identical


def test_digest_and_stats_follow_their_definition_whatever_the_chunking(tmp_path):
    from pytest_ckptparity import examples as ex

    p = ex.tiny_params(3, layers=3, emb=24, mlp=40)
    whole = ex.save(tmp_path / "whole", {"params": p}, step=1)
    chunked = ex.save(tmp_path / "chunked", {"params": p}, step=1, chunk_byte_size=1024)
    a = take_fingerprint(whole)
    b = take_fingerprint(chunked, read_budget=8 * 1024)  # many blocks, each a few chunks
    wi = p["decoder"]["layers"]["mlp"]["wi_0"]["kernel"]  # stored (emb, layers, mlp); canonical layer first
    canonical = np.moveaxis(wi, 1, 0)
    for fp in (a, b):
        lp = fp.leaves["params/decoder/layers/mlp/wi_0/kernel"]
        assert lp.digest == reference_digest(canonical)
        size = canonical[0].size
        assert lp.layer_digests == tuple(reference_digest(canonical[i], i * size) for i in range(3))
        for i in range(3):
            expected = numpy_stats(canonical[i])
            got = lp.layer_stats[i]
            for k, v in expected.items():
                assert getattr(got, k) == pytest.approx(v, rel=1e-12, abs=1e-15), (k, i)
        assert sum(lp.layer_digests) % 2**64 == lp.digest
    assert {k: v.digest for k, v in a.leaves.items()} == {k: v.digest for k, v in b.leaves.items()}
    every_byte = sum(math.prod(l.shape) * np.dtype(l.dtype).itemsize for l in a.leaves.values())
    assert a.bytes_read == b.bytes_read == every_byte  # every element read once, whatever the budget
    emb = a.leaves["params/token_embedder/embedding"]
    assert emb.digest == reference_digest(p["token_embedder"]["embedding"])


def test_bf16_fp8_integers_and_nonfinite_are_exact():
    bf = np.array([[1.5, -2.25], [3.0e38, 7.0e-3]], ml_dtypes.bfloat16)
    f8 = np.array([0.5, -448.0, 1.125], ml_dtypes.float8_e4m3fn)
    ints = np.array([-3, 7, 2**40], np.int64)
    odd = np.array([1.0, np.nan, np.inf, -np.inf, -2.0], np.float32)
    fp = take_fingerprint({"params": {"bf": bf, "f8": f8, "i": ints, "odd": odd}})
    for key, arr in (("bf", bf), ("f8", f8), ("i", ints)):
        lp = fp.leaves[f"params/{key}"]
        assert lp.digest == reference_digest(arr), key
        exact = numpy_stats(arr)
        assert lp.stats.min == exact["min"] and lp.stats.max == exact["max"] and lp.stats.sum_abs == exact["sum_abs"], key
    s = fp.leaves["params/odd"].stats
    assert (s.count, s.nan, s.posinf, s.neginf, s.min, s.max, s.mean) == (5, 1, 1, 1, -2.0, 1.0, -0.5)
    # Integers hash by value: int32 7 and int64 7 agree; -1 is sign-extended, not 0xffffffff.
    small = take_fingerprint({"params": {"a": np.array([7, -1], np.int32)}}).leaves["params/a"].digest
    assert small == take_fingerprint({"params": {"a": np.array([7, -1], np.int64)}}).leaves["params/a"].digest


# --------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------


def test_file_round_trips_and_is_diff_friendly(variants, tmp_path):
    fp = take_fingerprint(variants["linen_scan"])
    path = write_fingerprint(fp, tmp_path / "golden" / "linen.json")
    text = path.read_text()
    back = read_fingerprint(path)
    assert back.leaves == fp.leaves  # floats round-trip exactly
    assert back.step == 7 and back.layout_name == "linen" and back.tool.startswith("pytest-ckptparity ")
    data = json.loads(text)
    assert data["schema"] == 1 and data["stat_fields"] == list(STAT_FIELDS)
    assert list(data["leaves"]) == sorted(data["leaves"])
    # One leaf per block, one layer per line: a drift shows as a one-line diff.
    wi = '  "params/decoder/layers/mlp/wi_0/kernel": {'
    assert wi in text.splitlines()
    rows = [l for l in text.splitlines() if l.startswith("    [")]
    assert len(rows) == 27 * 2 and all(json.loads(l.rstrip(","))[1:4] == [0, 0, 0] for l in rows)
    assert to_json(back) == text  # writing what was read changes nothing
    assert not list(path.parent.glob(".*tmp"))  # the temp file was renamed away


def _rewrite(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _with_checksum(data: dict) -> None:
    from pytest_ckptparity.fingerprint import _checksum

    data["checksum"] = _checksum(data["leaves"])


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_text(p.read_text()[:500]), "is not a valid fingerprint file (not JSON: *); regenerate it with 'ckptparity fingerprint CKPT -o FILE' (a file of the ckpt_fingerprint fixture: pytest --ckpt-update-fingerprints)."),
    (lambda p: p.write_text("[1, 2]"), "is not a ckptparity fingerprint file (no \"format\": \"ckptparity-fingerprint\"); pass a file written by 'ckptparity fingerprint'."),
    (lambda p: _rewrite(p, lambda d: d.update(schema=9)), "was written by a newer pytest-ckptparity; upgrade it."),
    (lambda p: _rewrite(p, lambda d: d["leaves"]["step"].update(stats=[1, 0, 0, 0, 8.0, 8.0, 8.0, 0.0, 8.0, 8.0])), "was edited by hand or damaged (its checksum does not match its contents); *"),
    (lambda p: _rewrite(p, lambda d: (d["leaves"]["step"].update(shape=[3]), _with_checksum(d))), "is a damaged fingerprint file (leaf 'step': count 1 does not match the shape (3 elements)); *"),
    (lambda p: _rewrite(p, lambda d: (d["leaves"]["params/decoder/layers/mlp/wo/kernel"]["layer_digests"].reverse(), d["leaves"]["params/decoder/layers/mlp/wo/kernel"]["layer_digests"].__setitem__(0, "0" * 16), _with_checksum(d))), "is a damaged fingerprint file (leaf 'params/decoder/layers/mlp/wo/kernel': the layer digests do not add up to the leaf digest); *"),
    (lambda p: p.write_text(p.read_text().replace("[1, 0, 0, 0, 7.0,", "[1, 0, 0, 0, NaN,", 1)), "was edited by hand or damaged (its checksum does not match its contents); *"),
    (lambda p: _rewrite(p, lambda d: (d["leaves"]["step"].update(digest="xyz"), _with_checksum(d))), "is a damaged fingerprint file (leaf 'step': a digest must be 16 hex digits, got 'xyz'); *"),
])
def test_damaged_or_hand_edited_files_get_one_sentence(variants, tmp_path, damage, message):
    path = write_fingerprint(take_fingerprint(variants["linen_scan"]), tmp_path / "g.json")
    damage(path)
    with pytest.raises(CkptParityUsageError) as info:
        compare_checkpoints(variants["nnx_pure"], str(path))
    text = str(info.value)
    assert text.startswith(f"'{path}' ")
    from fnmatch import fnmatch

    assert fnmatch(text, f"'{path}' {message}"), text
    assert "\n" not in text


def test_a_7b_fingerprint_stays_well_under_a_megabyte():
    """Llama-2-7B's canonical leaves (MaxText scanned, params + Adam mu and nu), 32 layers,
    with statistics as long as float64 text gets: the size the defaults give."""
    rng = np.random.default_rng(0)
    per_layer = {"self_attention/query/kernel": (4096, 32, 128), "self_attention/key/kernel": (4096, 32, 128), "self_attention/value/kernel": (4096, 32, 128),
                 "self_attention/out/kernel": (32, 128, 4096), "mlp/wi_0/kernel": (4096, 11008), "mlp/wi_1/kernel": (4096, 11008), "mlp/wo/kernel": (11008, 4096),
                 "pre_self_attention_layer_norm/scale": (4096,), "post_self_attention_layer_norm/scale": (4096,)}
    plain = {"token_embedder/embedding": (32000, 4096), "decoder/logits_dense/kernel": (4096, 32000), "decoder/decoder_norm/scale": (4096,)}

    def stats(n: int) -> Stats:
        v = rng.standard_normal(6) * 0.02
        return Stats(n, 0, 0, 0, float(-abs(v[0])), float(abs(v[1])), float(v[2]), float(abs(v[3])), float(abs(v[4]) * 1e3), float(abs(v[5]) * 1e5))

    leaves = {}
    for group in ("params", "opt_state/0/mu", "opt_state/0/nu"):
        for name, shape in per_layer.items():
            path = f"{group}/decoder/layers/{name}"
            n = math.prod(shape)
            digests = tuple(int(x) for x in rng.integers(0, 2**63, 32))
            leaves[path] = LeafPrint(path, (32, *shape), "float32", sum(digests) % 2**64, stats(32 * n), 32, f"{group}/decoder/layers", digests, tuple(stats(n) for _ in range(32)))
        for name, shape in plain.items():
            path = f"{group}/{name}"
            leaves[path] = LeafPrint(path, shape, "float32", int(rng.integers(0, 2**63)), stats(math.prod(shape)))
    size = len(to_json(Fingerprint(leaves, layout="Linen TrainState, scanned on axis 1", layout_name="linen", location="/ckpts/llama2-7b/items", step=1000)).encode())
    assert size < 200_000, size  # about 163 KB: docs/fingerprints.md quotes it


# --------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------


def test_a_planted_change_fails_with_leaf_layer_and_statistics(variants, edited, tmp_path):
    golden = write_fingerprint(take_fingerprint(variants["linen_scan"]), tmp_path / "golden.json")
    assert_ckpt_fingerprint(variants["nnx_wrapped"], golden)  # another layout of the same model: identical

    def plant(tree):
        tree["params"]["params"]["decoder"]["layers"]["mlp"]["wo"]["kernel"][5, 1, 3] = 4.0  # layer 1

    changed = edited(variants["linen_scan"], plant, step=7)
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_fingerprint(changed, golden)
    report = info.value.report
    assert [r.path for r in report.mismatches] == ["params/decoder/layers/mlp/wo/kernel"]
    bad = report.mismatches[0]
    assert bad.kind == "statistics" and bad.stats.mismatched_layers == (1,)
    text = str(info.value)
    assert "checkpoint parity failed: 1 of 39 leaves differ: params/decoder/layers/mlp/wo/kernel [layer 1] (statistics)" in text
    assert "layer 1: max " in text and "(moved +" in text and "allowed " in text
    assert "layer 0" not in text


def test_exact_leaves_fail_on_any_change_and_tolerance_passes_noise(tmp_path):
    rng = np.random.default_rng(5)
    b = {"params": {"w": rng.standard_normal((64, 8)).astype(np.float32)}, "step": np.array(3, np.int32)}
    golden = write_fingerprint(take_fingerprint(b), tmp_path / "g.json")
    with pytest.raises(CkptParityError, match=r"step  \[statistics\] int32 \(\): leaf: min 3 -> 4 \(moved \+1, allowed 0\), max 3 -> 4"):
        assert_ckpt_fingerprint({**b, "step": np.array(4, np.int32)}, golden)
    noisy = {**b, "params": {"w": b["params"]["w"] + np.float32(0.5e-5)}}  # every element moved by atol / 2
    report = assert_ckpt_fingerprint(noisy, golden)
    assert report.passed and "not bit-identical" in report.notes[0]
    with pytest.raises(CkptParityError):  # with zero tolerance the digest decides
        assert_ckpt_fingerprint(noisy, golden, atol=0, rtol=0)


LAYERED = "params/decoder/layers/w"


@st.composite
def models(draw):
    """A random model: a layer stack (layers on axis 1, as MaxText scans) and a plain leaf."""
    layers = draw(st.integers(1, 4))
    d0, d1 = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    tree = {"params": {"decoder": {"layers": {"w": (rng.standard_normal((d0, layers, d1)) * scale).astype(dtype)}}, "dense": (rng.standard_normal(draw(st.integers(1, 40))) * scale).astype(dtype)}}
    atol = draw(st.sampled_from([0.0, 1e-6, 1e-4, 1e-2]))
    rtol = draw(st.sampled_from([0.0, 1e-6, 1e-3, 5e-2]))
    return tree, atol, rtol


def _arrays(tree):
    return {"params/dense": tree["params"]["dense"], LAYERED: tree["params"]["decoder"]["layers"]["w"]}


def _copy(tree):
    return {"params": {"decoder": {"layers": {"w": tree["params"]["decoder"]["layers"]["w"].copy()}}, "dense": tree["params"]["dense"].copy()}}


@pytest.mark.filterwarnings("ignore::pytest_ckptparity.CkptParityWarning")  # noise is meant to pass with its note
@PROPS
@given(model=models(), data=st.data())
def test_noise_within_tolerance_never_fails(model, data, tmp_path_factory):
    tree, atol, rtol = model
    golden = write_fingerprint(take_fingerprint(tree), tmp_path_factory.mktemp("fp") / "g.json")
    pattern = data.draw(st.sampled_from(["up", "down", "random", "alternating"]))
    frac = data.draw(st.sampled_from([1.0, 0.999, 0.5]))
    noisy = _copy(tree)
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    for arr in _arrays(noisy).values():
        t = atol + rtol * np.abs(arr.astype(np.float64))
        sign = {"up": 1.0, "down": -1.0, "random": rng.uniform(-1, 1, arr.shape), "alternating": np.where(np.arange(arr.size).reshape(arr.shape) % 2, 1.0, -1.0)}[pattern]
        arr[...] = (arr.astype(np.float64) + sign * frac * t).astype(arr.dtype)
    assume(compare_checkpoints(noisy, tree, atol=atol, rtol=rtol).passed)  # within tolerance after rounding to the dtype
    report = compare_checkpoints(noisy, str(golden), atol=atol, rtol=rtol)
    assert report.passed, [r.notes for r in report.mismatches]


@pytest.mark.filterwarnings("ignore::pytest_ckptparity.CkptParityWarning")  # noise is meant to pass with its note
@PROPS
@given(model=models(), data=st.data())
def test_a_single_change_above_the_resolution_is_always_caught(model, data, tmp_path_factory):
    tree, atol, rtol = model
    fp = take_fingerprint(tree)
    golden = write_fingerprint(fp, tmp_path_factory.mktemp("fp") / "g.json")
    path = data.draw(st.sampled_from(["params/dense", LAYERED]))
    changed = _copy(tree)
    arr = _arrays(changed)[path]
    index = tuple(data.draw(st.integers(0, n - 1)) for n in arr.shape)
    layer = index[1] if path == LAYERED else None
    lp = fp.leaves[path]
    unit = lp.layer_stats[layer] if layer is not None else lp.stats
    from pytest_ckptparity.diff import CompareOptions, resolve_tolerance

    tol = resolve_tolerance(path, lp.dtype, CompareOptions(atol=atol, rtol=rtol))
    kind = data.draw(st.sampled_from(["above resolution", "nan", "inf", "just above tolerance"]))
    old = float(arr[index])
    t = atol + rtol * abs(old)
    exact = atol == 0 and rtol == 0
    if kind == "nan":
        arr[index] = np.nan
    elif kind == "inf":
        arr[index] = -np.inf
    else:
        step = resolution(unit, tol) * 1.01 + 1e-9 if kind == "above resolution" else t * 1.5 + max(abs(old), 1e-30) * 1e-6
        arr[index] = old + data.draw(st.sampled_from([1.0, -1.0])) * step
    assume(float(arr[index]) != old or kind in ("nan", "inf"))
    if kind == "above resolution":  # still above it once rounded to the leaf's dtype
        assume(abs(float(arr[index]) - old) > resolution(unit, tol))
    assume(not compare_checkpoints(changed, tree, atol=atol, rtol=rtol).passed)  # above tolerance, after rounding
    report = compare_checkpoints(changed, str(golden), atol=atol, rtol=rtol)
    result = next(r for r in report.results if r.path == path)
    if kind != "just above tolerance" or exact:
        assert not report.passed and [r.path for r in report.mismatches] == [path]
        if layer is not None:
            assert result.stats.mismatched_layers == (layer,)
    else:  # between tolerance and resolution: never called identical, always named
        if result.ok:
            where = f" in layer {layer};" if layer is not None else ";"
            assert any(n.startswith(f"not bit-identical{where}") for n in result.notes), result.notes
            assert any("not bit-identical to the fingerprint" in n and path in n for n in report.notes), report.notes


def test_allowances_are_the_documented_bounds():
    b = Stats(4, 0, 0, 0, -2.0, 3.0, 0.5, 1.8027756377319946, 3.872983346207417, 7.0)
    from pytest_ckptparity._model import Tolerance

    allow = allowances(b, Tolerance(atol=0.1, rtol=0.01))
    assert allow["max"] == pytest.approx(0.1 + 0.01 * 3.0, rel=1e-5)
    assert allow["mean"] == pytest.approx((4 * 0.1 + 0.01 * 7.0) / 4, rel=1e-5)
    assert allow["l2"] == pytest.approx(math.sqrt(4 * 0.01 + 2 * 0.1 * 0.01 * 7.0 + (0.01 * 3.872983346207417) ** 2), rel=1e-5)
    assert allow["std"] == pytest.approx(allow["l2"] / 2, rel=1e-5)
    assert resolution(b, Tolerance(atol=0.1, rtol=0.01)) == pytest.approx(min(4 * allow["mean"], 5.0 + allow["max"]), rel=1e-9)


# --------------------------------------------------------------------------------------
# Command line and pytest
# --------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_ckptparity.cli", *args], capture_output=True, text=True)


def test_cli_fingerprint_and_compare_against_it(demo_ckpts, tmp_path):
    out = tmp_path / "linen.json"
    r = cli("fingerprint", demo_ckpts["linen"], "-o", str(out))
    assert r.returncode == 0 and f"{out}: fingerprint of 39 leaves (Linen TrainState, scanned on axis 1)" in r.stdout
    ok = cli(demo_ckpts["nnx"], str(out), "--color", "no")
    assert ok.returncode == 0 and "checkpoint parity: 39 leaves match" in ok.stdout
    assert "fingerprint of Linen TrainState, scanned on axis 1" in ok.stdout
    bad = cli(demo_ckpts["nnx_drift"], str(out), "--color", "no")
    assert bad.returncode == 1
    assert "params/decoder/layers/mlp/wi_0/kernel [layer 1]  [statistics]" in bad.stdout
    assert "layer 1: mean -0.00219037 -> -0.0012138 (moved +0.000977, allowed 1.03e-05)" in bad.stdout
    missing = cli(demo_ckpts["nnx"], str(tmp_path / "nope.json"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"ckptparity: error: fingerprint file '{tmp_path / 'nope.json'}' does not exist; create it with 'ckptparity fingerprint CKPT -o {tmp_path / 'nope.json'}' (a file of the ckpt_fingerprint fixture: run pytest with --ckpt-update-fingerprints)."
    wrong = cli("fingerprint", demo_ckpts["linen"], "-o", str(tmp_path / "x.txt"))
    assert wrong.returncode == 2 and "must end in .json" in wrong.stderr


def test_cli_fingerprint_takes_the_scan_axis_and_inspect_reads_the_file(tmp_path):
    """A stack on axis 0 (nnx.vmap's) with no axis recorded: `--scan-axis 0` writes a file the
    axis-1 twin matches; `inspect FILE.json` shows the file's own layer-first leaves."""
    from pytest_ckptparity import examples as ex

    params = ex.tiny_params(layers=2)
    axis0 = {k: v for k, v in params["decoder"].items() if k != "layers"}
    import jax

    axis0["layers"] = jax.tree_util.tree_map(lambda x: np.moveaxis(np.asarray(x), 1, 0), params["decoder"]["layers"])
    stacked0 = ex.save(tmp_path / "axis0", {"params": {**params, "decoder": axis0}}, step=0)
    stacked1 = ex.save(tmp_path / "axis1", {"params": params}, step=0)
    good, wrong = tmp_path / "good.json", tmp_path / "wrong.json"
    assert cli("fingerprint", stacked0, "-o", str(good), "--scan-axis", "0").returncode == 0
    assert cli("fingerprint", stacked0, "-o", str(wrong)).returncode == 0
    ok = cli(stacked1, str(good), "--color", "no")
    assert ok.returncode == 0 and "every digest equal" in ok.stdout, ok.stdout + ok.stderr
    bad = cli(stacked1, str(wrong), "--color", "no")
    assert bad.returncode == 1 and "[layout]" in bad.stdout
    pair = cli(stacked1, str(good), "--scan-axis", "1,0")
    assert pair.returncode == 2 and pair.stderr.strip() == (
        f"ckptparity: error: B: '{good}' is a fingerprint file, whose layer stacks were laid out layer first when it was taken; "
        "give the scan axis of the checkpoint side only (scan_axis=N), or take the fingerprint again with its own.")
    two = cli("fingerprint", stacked0, "-o", str(good), "--scan-axis", "0,1")
    assert two.returncode == 2 and two.stderr.strip() == "ckptparity: error: --scan-axis must be one axis (a fingerprint reads one checkpoint), e.g. --scan-axis 0; got '0,1'."
    word = cli("fingerprint", stacked0, "-o", str(good), "--scan-axis", "x")
    assert word.returncode == 2 and word.stderr.strip().endswith("got 'x'.")
    shown = cli("inspect", str(good))
    assert shown.returncode == 0, shown.stderr
    assert "layout: fingerprint of " in shown.stdout
    assert re.search(r"params/decoder/layers/mlp/wi_0/kernel +float32 +\(2, 16, 32\)  2 layers x \(16, 32\)", shown.stdout)


def test_a_misspelt_include_glob_is_an_error_not_a_narrower_fingerprint(demo_ckpts, tmp_path):
    """`--include params/** --include opt_stat/**` must not write a file that quietly leaves
    the optimizer state out; nothing is written for a typo."""
    out = tmp_path / "scoped.json"
    typo = cli("fingerprint", demo_ckpts["linen"], "-o", str(out), "--include", "params/**", "--include", "opt_stat/**")
    assert typo.returncode == 2 and not out.exists()
    assert typo.stderr.strip().startswith("ckptparity: error: include glob 'opt_stat/**' matches no leaf of '")
    assert "the top-level groups are: opt_state, params, step." in typo.stderr
    nothing = cli("fingerprint", demo_ckpts["linen"], "-o", str(out), "--include", "params/**", "--exclude", "params/**")
    assert nothing.returncode == 2 and "a fingerprint of nothing would check nothing" in nothing.stderr and not out.exists()
    gone = cli("inspect", str(tmp_path / "nope"))
    assert gone.stderr.strip().startswith(f"ckptparity: error: checkpoint path '{tmp_path / 'nope'}' does not exist")


def test_rng_state_against_a_fingerprint_taken_without_it_fails_and_says_why(demo_ckpts, tmp_path):
    out = tmp_path / "nnx.json"
    assert cli("fingerprint", demo_ckpts["nnx"], "-o", str(out)).returncode == 0
    plain = cli(demo_ckpts["nnx"], str(out), "--color", "no")
    assert plain.returncode == 0 and "RNG state" in plain.stdout  # left out on both sides by default
    asked = cli(demo_ckpts["nnx"], str(out), "--compare-rngs", "--color", "no")
    assert asked.returncode == 1 and "[only in A]" in asked.stdout  # never a pass for leaves compared with nothing
    assert ("B, a fingerprint, was taken without RNG state ('ckptparity fingerprint --compare-rngs' takes it): "
            "the RNG leaves of A have nothing to be compared with") in asked.stdout
    with_rngs = tmp_path / "nnx-rngs.json"
    assert cli("fingerprint", demo_ckpts["nnx"], "-o", str(with_rngs), "--compare-rngs").returncode == 0
    both = cli(demo_ckpts["nnx"], str(with_rngs), "--compare-rngs", "--color", "no")
    assert both.returncode == 0 and "was taken without RNG state" not in both.stdout


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", *args)


USER_TESTS = """
    import pytest

    CKPTS = {ckpts!r}

    def test_linen(ckpt_fingerprint):
        ckpt_fingerprint(CKPTS["linen"])

    @pytest.mark.parametrize("name", ["nnx", "linen"])
    def test_layouts(ckpt_fingerprint, name):
        ckpt_fingerprint(CKPTS[name], name="model")
        ckpt_fingerprint(CKPTS[name], include="params")
"""


@pytest.mark.parametrize("xdist", XDIST)
def test_update_writes_then_runs_pass_then_a_drift_fails(pytester, demo_ckpts, xdist):
    pytester.makepyfile(test_golden=USER_TESTS.format(ckpts=dict(demo_ckpts)))
    first = run(pytester, *xdist)
    assert first.ret == 1
    first.stdout.fnmatch_lines_random([
        "*fingerprint file '*__fingerprints__/test_golden/test_linen.json' does not exist; run pytest with --ckpt-update-fingerprints to create it.*",
        "*3 failed*",
        "3 fingerprint files missing (their tests failed; run pytest with --ckpt-update-fingerprints to create them):",
    ])
    assert "Traceback" not in first.stdout.str() and "checked" not in first.stdout.str()
    update = run(pytester, "--ckpt-update-fingerprints", *xdist)
    assert update.ret == 0
    update.stdout.fnmatch_lines_random(["5 fingerprint files written, 0 unchanged, 0 unused deleted", "*3 passed*"])
    folder = pytester.path / "__fingerprints__" / "test_golden"
    assert sorted(p.name for p in folder.iterdir()) == ["test_layouts[linen].1.json", "test_layouts[linen].model.json", "test_layouts[nnx].1.json", "test_layouts[nnx].model.json", "test_linen.json"]
    assert read_fingerprint(folder / "test_linen.json").leaves == read_fingerprint(folder / "test_layouts[linen].model.json").leaves
    again = run(pytester, "--ckpt-update-fingerprints", *xdist)
    again.stdout.fnmatch_lines_random(["0 fingerprint files written, 5 unchanged, 0 unused deleted"])
    check = run(pytester, *xdist)
    assert check.ret == 0
    check.stdout.fnmatch_lines_random(["5 fingerprint files checked, none unused", "*3 passed*"])
    # The nnx golden files now face a drifted checkpoint.
    pytester.makepyfile(test_golden=USER_TESTS.format(ckpts={**demo_ckpts, "nnx": demo_ckpts["nnx_drift"]}))
    drift = run(pytester, *xdist)
    assert drift.ret == 1
    drift.stdout.fnmatch_lines_random([
        "FAILED test_golden.py::test_layouts[[]nnx[]] - pytest_ckptparity.CkptParityError*",
        "checkpoint parity failed: 1 of 39 leaves differ: params/decoder/layers/mlp/wi_0/kernel [[]layer 1[]] (statistics)",
        "* layer 1: mean -0.00219037 -> -0.0012138 (moved +0.000977, allowed 1.03e-05)*",
        "*1 failed, 2 passed*",
    ])


@pytest.mark.parametrize("xdist", XDIST)
def test_unused_files_are_reported_only_when_their_module_ran_whole(pytester, demo_ckpts, xdist):
    pytester.makepyfile(test_golden=USER_TESTS.format(ckpts=dict(demo_ckpts)))
    assert run(pytester, "--ckpt-update-fingerprints", *xdist).ret == 0
    folder = pytester.path / "__fingerprints__" / "test_golden"
    (folder / "test_removed.json").write_text((folder / "test_linen.json").read_text())
    gone = pytester.path / "__fingerprints__" / "test_gone"  # the folder of a module deleted since
    gone.mkdir()
    (gone / "test_a.json").write_text((folder / "test_linen.json").read_text())
    kept = pytester.path / "__fingerprints__" / "test_notebook"  # a module that is not a .py file
    kept.mkdir()
    (kept / "test_b.json").write_text((folder / "test_linen.json").read_text())
    (pytester.path / "test_notebook.ipynb").write_text("{}")
    full = run(pytester, *xdist)
    assert full.ret == 0
    full.stdout.fnmatch_lines_random([
        "2 fingerprint files unused (no test uses them; delete them or run with --ckpt-update-fingerprints):",
        f"  unused: {folder / 'test_removed.json'}",
        f"  unused: {gone / 'test_a.json'}",
    ])
    assert "test_notebook" not in full.stdout.str()
    selected = run(pytester, "-k", "linen", *xdist)  # a gone module's files are unused whatever is selected
    assert selected.ret == 0
    selected.stdout.fnmatch_lines_random(["1 fingerprint file unused (*", f"  unused: {gone / 'test_a.json'}"])
    assert "test_removed" not in selected.stdout.str()
    cleanup = run(pytester, "--ckpt-update-fingerprints", *xdist)
    cleanup.stdout.fnmatch_lines_random(["0 fingerprint files written, 5 unchanged, 2 unused deleted", f"  deleted: {folder / 'test_removed.json'}",
                                         f"  deleted: {gone / 'test_a.json'}"])
    assert not (folder / "test_removed.json").exists() and not gone.exists()
    assert (kept / "test_b.json").exists()
    clean = run(pytester, *xdist)
    clean.stdout.fnmatch_lines_random(["5 fingerprint files checked, none unused"])


def test_a_damaged_golden_file_fails_its_test_with_one_sentence(pytester, demo_ckpts):
    pytester.makepyfile(test_golden=USER_TESTS.format(ckpts=dict(demo_ckpts)))
    assert run(pytester, "--ckpt-update-fingerprints", "-k", "test_linen").ret == 0
    golden = pytester.path / "__fingerprints__" / "test_golden" / "test_linen.json"
    golden.write_text(golden.read_text().replace('"dtype": "int32"', '"dtype": "int64"', 1))
    result = run(pytester, "-k", "test_linen")
    assert result.ret == 1
    result.stdout.fnmatch_lines([f"*'{golden}' was edited by hand or damaged (its checksum does not match its contents); regenerate it with 'ckptparity fingerprint CKPT -o FILE' (a file of the ckpt_fingerprint fixture: pytest --ckpt-update-fingerprints)*"])
    assert "Traceback" not in result.stdout.str()


def test_generated_items_accept_a_fingerprint_as_b(pytester, demo_ckpts, tmp_path):
    golden = write_fingerprint(take_fingerprint(demo_ckpts["nnx"]), tmp_path / "nnx.json")
    ok = run(pytester, f"--ckpt-a={demo_ckpts['linen']}", f"--ckpt-b={golden}", "-n", "2")
    assert ok.ret == 0
    ok.stdout.fnmatch_lines_random(["leaves: 39 compared (39 match)"])
    bad = run(pytester, f"--ckpt-a={demo_ckpts['nnx_drift']}", f"--ckpt-b={golden}")
    assert bad.ret == 1
    bad.stdout.fnmatch_lines_random(["FAILED ckpt-parity::params/decoder/layers[[]1[]]*"])
    # The optimizer state's drift is below its statistics' resolution: its item passes and
    # warns, and the warning names the item, not a line of pytest's own.
    bad.stdout.fnmatch_lines(["*= warnings summary =*", "  ckpt-parity::opt_state/0/mu/decoder/layers[[]1[]]:0: CkptParityWarning: 1 leaf is not bit-identical to the fingerprint*"])
    assert "_pytest" not in bad.stdout.str().split("warnings summary")[1]


def test_a_scoped_fingerprint_checks_only_its_scope_and_says_so(variants, tmp_path):
    golden = write_fingerprint(take_fingerprint(variants["linen_scan"], include="params"), tmp_path / "params.json")
    report = compare_checkpoints(variants["nnx_pure"], str(golden))
    assert report.passed and len(report.results) == 12
    assert "B, a fingerprint, was taken with include=['params']: 27 leaves of A outside it are left out" in report.notes
    with pytest.raises(CkptParityUsageError, match="include glob 'nothing/.*' matches no leaf of .*; the top-level groups are: opt_state, params, step"):
        take_fingerprint(variants["linen_scan"], include="nothing/**")
    with pytest.raises(CkptParityUsageError, match="no leaf of .* is in scope"):
        take_fingerprint(variants["linen_scan"], include="params/**", exclude="params/**")


def test_a_fingerprint_url_is_refused_in_one_sentence_never_mangled(samples, capsys):
    from pytest_ckptparity.cli import main

    assert main([samples["maxtext_nnx_scan"], "gs://bucket/golden/x.json"]) == 2
    err = capsys.readouterr().err
    assert "fingerprint file 'gs://bucket/golden/x.json' is a URL; fingerprint files are read from local disk" in err
    assert "gs:/bucket" not in err


def test_a_change_the_statistics_cannot_see_is_named_and_warned(tmp_path):
    """Between tolerance and resolution a change passes on statistics, but is never silent:
    the header names the leaf and layer, and a CkptParityWarning says it (so
    `-W error::pytest_ckptparity.CkptParityWarning` makes it fail)."""
    from pytest_ckptparity import CkptParityWarning

    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 3, 64)).astype(np.float32)  # layers on axis 1, as MaxText scans
    tree = {"params": {"decoder": {"layers": {"w": w}}}}
    golden = write_fingerprint(take_fingerprint(tree), tmp_path / "g.json")
    changed = {"params": {"decoder": {"layers": {"w": w.copy()}}}}
    changed["params"]["decoder"]["layers"]["w"][5, 1, 7] += 1e-3  # 100x atol, far below the resolution
    assert not compare_checkpoints(changed, tree).passed
    with pytest.warns(CkptParityWarning, match=r"1 leaf is not bit-identical to the fingerprint .*params/decoder/layers/w in layer 1"):
        report = compare_checkpoints(changed, str(golden))
    assert report.passed
    (leaf,) = report.results
    assert leaf.notes[0].startswith("not bit-identical in layer 1;")
    with pytest.raises(CkptParityError, match="layer 1"):
        assert_ckpt_fingerprint(changed, golden, atol=0, rtol=0)


def test_equal_nan_false_fails_a_nan_even_with_an_equal_digest(tmp_path):
    """equal_nan=False means a NaN never matches, as in a comparison; the digest alone would
    call a NaN against the same NaN identical."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    w[1, 2] = np.nan
    tree = {"params": {"w": w}}
    golden = write_fingerprint(take_fingerprint(tree), tmp_path / "g.json")
    assert compare_checkpoints(tree, str(golden)).passed
    assert not compare_checkpoints(tree, tree, equal_nan=False).passed  # what a comparison says
    report = compare_checkpoints(tree, str(golden), equal_nan=False)
    assert not report.passed
    assert [r.path for r in report.mismatches] == ["params/w"]
    assert any("with equal_nan=False a NaN never matches" in n for n in report.mismatches[0].notes)


def test_warnings_as_errors_make_an_unseen_change_fail_in_pytest(pytester, tmp_path):
    """The documented strict switch: `-W error::pytest_ckptparity.CkptParityWarning`."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 2, 64)).astype(np.float32)
    golden = write_fingerprint(take_fingerprint({"params": {"decoder": {"layers": {"w": w}}}}), tmp_path / "g.json")
    np.save(tmp_path / "w.npy", w)
    pytester.makepyfile(f"""
        import numpy as np
        from pytest_ckptparity import assert_ckpt_fingerprint

        def test_changed():
            w = np.load({str(tmp_path / 'w.npy')!r})
            w[3, 1, 9] += 1e-3
            assert_ckpt_fingerprint({{"params": {{"decoder": {{"layers": {{"w": w}}}}}}}}, {str(golden)!r})
    """)
    default = pytester.runpytest("-p", "no:cacheprovider")
    default.assert_outcomes(passed=1, warnings=1)
    default.stdout.fnmatch_lines(["*CkptParityWarning: 1 leaf is not bit-identical to the fingerprint*params/decoder/layers/w in layer 1*"])
    strict = pytester.runpytest("-p", "no:cacheprovider", "-W", "error::pytest_ckptparity.CkptParityWarning")
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines(["*CkptParityWarning: 1 leaf is not bit-identical*in layer 1*"])


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_a_complex_leaf_is_refused_by_name_never_half_fingerprinted(dtype):
    """Statistics of a complex leaf's real part would miss any change to its imaginary part."""
    tree = {"params": {"c": np.array([1 + 2j, 3 - 4j], dtype), "w": np.ones(3, np.float32)}}
    with pytest.raises(CkptParityUsageError, match=r"leaf 'params/c' is complex.*exclude='params/c'"):
        take_fingerprint(tree)
    assert "params/c" not in take_fingerprint(tree, exclude="params/c").leaves


def test_the_not_bit_identical_warning_points_at_the_callers_line(tmp_path):
    """pytest's warnings summary shows where a warning came from: the user's line, not ours."""
    from pytest_ckptparity import CkptParityWarning

    w = np.random.default_rng(5).standard_normal((64, 2, 64)).astype(np.float32)
    golden = write_fingerprint(take_fingerprint({"params": {"decoder": {"layers": {"w": w}}}}), tmp_path / "g.json")
    w2 = w.copy()
    w2[1, 0, 3] += 1e-3
    with pytest.warns(CkptParityWarning) as caught:
        assert_ckpt_fingerprint({"params": {"decoder": {"layers": {"w": w2}}}}, golden)
    assert [Path(r.filename).name for r in caught] == ["test_fingerprint.py"]


def test_against_a_fingerprint_the_text_never_claims_identical_values(tmp_path):
    """A fingerprint has no elements: the first line and the run summary say what was judged."""
    from pytest_ckptparity.report import comparison_record, render, run_totals, summary_lines

    w = np.random.default_rng(6).standard_normal((64, 2, 64)).astype(np.float32)
    tree = {"params": {"decoder": {"layers": {"w": w}}, "b": np.ones(4, np.float32)}}
    golden = str(write_fingerprint(take_fingerprint(tree), tmp_path / "g.json"))
    same = compare_checkpoints(tree, golden)
    assert same.statistics_only and same.to_dict()["statistics_only"] is True
    assert render(same, color=False).splitlines()[0].endswith("every digest equal (bit-identical to the fingerprint)")
    w2 = w.copy()
    w2[3, 1, 0] += 1e-3
    with pytest.warns(Warning):
        near = compare_checkpoints({"params": {"decoder": {"layers": {"w": w2}}, "b": tree["params"]["b"]}}, golden)
    first = render(near, color=False).splitlines()[0]
    assert near.passed and first.endswith("statistics within tolerance, 1 leaf not bit-identical") and "identical" not in first.replace("bit-identical", "")
    lines = [text for text, _ in summary_lines(run_totals([comparison_record(same), comparison_record(near)]))]
    assert not any(line.startswith("headroom: 0") for line in lines), lines
    assert "fingerprints: 1 matching leaf is not bit-identical to the fingerprint (statistics within tolerance; a fingerprint has no per-element headroom)" in lines
    lines = [text for text, _ in summary_lines(run_totals([comparison_record(same)]))]
    assert "fingerprints: every matching leaf is bit-identical to its fingerprint (every digest equal)" in lines


def test_fingerprint_files_get_the_usual_permissions(tmp_path):
    """Golden files live in shared folders and repositories: not the 0600 of a temp file."""
    path = write_fingerprint(take_fingerprint({"params": {"w": np.ones(3, np.float32)}}), tmp_path / "g.json")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
