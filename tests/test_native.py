"""The native kernels against their numpy paths: the same digests exactly, the same counts,
statistics equal to rounding, on every dtype the C loops take, strided pieces, NaN and inf;
and whole fingerprints of a real checkpoint that agree with the library on and off."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_ckptparity import _native, zarr_rows
from pytest_ckptparity import fingerprint as fp

NATIVE_DTYPES = [np.float32, np.float64, ml_dtypes.bfloat16, np.float16]


def test_the_native_library_is_built_here():
    """CI installs a C compiler: without this, every test below would compare numpy with itself."""
    assert _native.library() is not None, _native.status()
    assert _native.status().startswith("native kernels: yes")


def _both(x: np.ndarray, base: int, strides: tuple[int, ...]) -> tuple[fp._Acc, fp._Acc]:
    kind = _native.FINGERPRINT_KINDS[np.dtype(x.dtype).name]
    native = fp._native_piece_acc(_native.library(), kind, x, base, strides, fp._Acc())
    numpy = fp._numpy_piece_acc(x, base, strides, fp._Acc())
    return native, numpy


def _assert_same(native: fp._Acc, numpy: fp._Acc) -> None:
    assert native.digest == numpy.digest
    assert (native.nan, native.posinf, native.neginf, native.n) == (numpy.nan, numpy.posinf, numpy.neginf, numpy.n)
    if numpy.n:
        assert (native.min, native.max) == (numpy.min, numpy.max)  # exact: no arithmetic
        scale = max(numpy.sumsq, 1e-300)
        for name in ("sumsq", "sum_abs"):
            assert math.isclose(getattr(native, name), getattr(numpy, name), rel_tol=1e-12), name
        assert math.isclose(native.mean, numpy.mean, rel_tol=1e-12, abs_tol=1e-12 * math.sqrt(scale / numpy.n))
        assert math.isclose(native.m2, numpy.m2, rel_tol=1e-9, abs_tol=1e-12 * scale)


def _leaf_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return fp._strides(shape)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(NATIVE_DTYPES),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple),
    seed=st.integers(0, 2**16),
    specials=st.integers(0, 3),
    view=st.sampled_from(["whole", "layer", "sliced", "stepped", "moved"]),
    base=st.integers(0, 2**40),
)
def test_native_fingerprint_piece_equals_numpy(dtype, shape, seed, specials, view, base):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 1e3])).astype(dtype)
    flat = x.reshape(-1)
    for i in rng.integers(0, flat.size, specials):
        flat[i] = rng.choice([np.nan, np.inf, -np.inf])
    strides = _leaf_strides(shape)
    if view == "layer" and x.ndim > 1:  # one layer of a layered leaf, as _fold_block takes it
        x, strides = x[shape[0] - 1], strides[1:]
    elif view == "sliced":
        x = x[(slice(0, max(1, shape[0] // 2)),)]
    elif view == "stepped" and x.shape[-1] > 1:
        x, strides = x[..., ::2], strides[:-1] + (strides[-1] * 2,)
    elif view == "moved" and x.ndim > 1:  # a stack stored on axis 1, seen layer first: strided
        x = np.moveaxis(x, 1, 0)
        strides = (strides[1], strides[0]) + strides[2:]
    _assert_same(*_both(x, base, strides))


@pytest.mark.parametrize("dtype", NATIVE_DTYPES)
def test_native_edge_pieces(dtype):
    for x in (np.full((4, 5), np.nan, dtype), np.array(1.5, dtype), np.full((3, 3), 0.1, dtype),
              np.array([np.inf, -np.inf, 2.0, -7.0], dtype)):
        _assert_same(*_both(x, 3, _leaf_strides(x.shape)))


def test_a_changed_element_changes_the_native_digest_at_every_position():
    x = np.random.default_rng(1).standard_normal((3, 17)).astype(np.float32)
    digest = _both(x, 0, (17, 1))[0].digest
    for i in range(x.size):
        y = x.copy()
        y.reshape(-1)[i] = np.nextafter(y.reshape(-1)[i], np.float32(np.inf))
        assert _both(y, 0, (17, 1))[0].digest != digest, i


def test_native_and_numpy_fingerprints_of_a_real_checkpoint_agree(demo_ckpts, tmp_path):
    """Through the CLI, once with the library and once with CKPTPARITY_NATIVE=0: the same
    digest for every leaf and layer, and each file checks the other's checkpoint."""
    ckpt = str(demo_ckpts["linen"])
    files = {}
    for mode in ("1", "0"):
        out = tmp_path / f"native{mode}.json"
        env = {**os.environ, "CKPTPARITY_NATIVE": mode}
        run = subprocess.run([sys.executable, "-m", "pytest_ckptparity", "fingerprint", ckpt, "-o", str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        files[mode] = fp.read_fingerprint(str(out))
    native, numpy = files["1"], files["0"]
    assert native.leaves.keys() == numpy.leaves.keys()
    for path, leaf in native.leaves.items():
        other = numpy.leaves[path]
        assert (leaf.digest, leaf.layer_digests) == (other.digest, other.layer_digests), path
        assert leaf.stats.count == other.stats.count and leaf.stats.min == other.stats.min, path
    env = {**os.environ, "CKPTPARITY_NATIVE": "0"}
    check = subprocess.run([sys.executable, "-m", "pytest_ckptparity", ckpt, str(tmp_path / "native1.json"), "--color", "no"], env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "every digest equal" in check.stdout


def test_version_names_the_kernels():
    run = subprocess.run([sys.executable, "-m", "pytest_ckptparity", "--version"], capture_output=True, text=True, timeout=120)
    assert "native kernels: yes" in run.stdout
    off = subprocess.run([sys.executable, "-m", "pytest_ckptparity", "--version"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CKPTPARITY_NATIVE": "0"})
    assert "native kernels: off" in off.stdout


def test_scalar_leaves_take_the_native_kernel_too(tmp_path, monkeypatch):
    """A learning rate, a step or a scale stored as a 0-d array: orbax hands it back as a
    numpy scalar. Fingerprinted natively and with numpy, in memory and through the CLI."""
    from pytest_ckptparity import examples as ex
    from pytest_ckptparity.api import take_fingerprint

    tree = {"params": {"w": np.arange(24, dtype=np.float32).reshape(4, 6)},
            "hyper": {"lr": np.array(1e-3, np.float32), "decay": np.array(0.5, np.float64),
                      "scale": np.array(2.0, ml_dtypes.bfloat16), "half": np.array(0.25, np.float16), "step": np.array(7, np.int32)}}
    ckpt = tmp_path / "run"
    ex.save(ckpt, tree, step=0)
    native = take_fingerprint(str(ckpt))
    monkeypatch.setenv("CKPTPARITY_NATIVE", "0")
    numpy = take_fingerprint(str(ckpt))
    assert set(native.leaves) == set(numpy.leaves) >= {"hyper/lr", "hyper/decay", "hyper/scale", "hyper/half", "hyper/step"}
    for path in native.leaves:
        assert native.leaves[path].digest == numpy.leaves[path].digest, path
        assert native.leaves[path].stats == numpy.leaves[path].stats, path  # one element: no summation order
    assert native.leaves["hyper/lr"].stats.max == float(np.float32(1e-3))
    monkeypatch.delenv("CKPTPARITY_NATIVE")
    out = tmp_path / "run.json"
    for argv in (["fingerprint", str(ckpt), "-o", str(out)], [str(ckpt), str(out), "--color", "no"]):
        run = subprocess.run([sys.executable, "-m", "pytest_ckptparity", *argv], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
    assert "every digest equal" in run.stdout


def test_a_library_older_than_its_sources_is_not_used(tmp_path):
    """After a `git pull` without reinstalling (or a failed rebuild) the library beside the
    package was built from other code: it must not be loaded."""
    lib, sources = tmp_path / "_ckptkernel.so", tmp_path / "native"
    sources.mkdir()
    (sources / "fingerprint.c").write_text("/* old */")
    lib.write_bytes(b"")
    os.utime(sources / "fingerprint.c", (1_000, 1_000))
    os.utime(lib, (2_000, 2_000))
    assert not _native._stale(lib, sources)
    os.utime(sources / "fingerprint.c", (3_000, 3_000))
    assert _native._stale(lib, sources)
    assert not _native._stale(lib, tmp_path / "no-sources-here")  # a wheel install ships no sources


def test_a_library_of_another_calling_convention_is_not_loaded(tmp_path):
    src = tmp_path / "old.c"
    src.write_text("int ckpt_kernel_abi(void) { return 1; }\nint ckpt_fingerprint_piece(void) { return 0; }\n")
    lib = tmp_path / "old.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True, timeout=120)
    assert _native._load(lib) is None
    src.write_text("int nothing(void) { return 0; }\n")  # a library with no version at all
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True, timeout=120)
    assert _native._load(lib) is None
    assert _native._load(_native._path()) is not None  # this install's own library


@pytest.mark.parametrize("value,expected", [("0", "native kernels: off (CKPTPARITY_NATIVE=0)"), ("off", "native kernels: off (CKPTPARITY_NATIVE=0)"),
                                            ("1", "native kernels: yes"), ("", "native kernels: yes")])
def test_the_switch_reads_yes_and_no(value, expected):
    run = subprocess.run([sys.executable, "-m", "pytest_ckptparity", "--version"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CKPTPARITY_NATIVE": value})
    assert run.stdout.strip().endswith(f"({expected}; {zarr_rows.status()})")
    assert len(run.stdout.strip().splitlines()) == 1


def test_a_misspelt_switch_is_one_sentence(demo_ckpts):
    run = subprocess.run([sys.executable, "-m", "pytest_ckptparity", demo_ckpts["linen"], demo_ckpts["nnx"]], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "CKPTPARITY_NATIVE": "flase"})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == "ckptparity: error: CKPTPARITY_NATIVE must be 1 (use the C kernels when built) or 0 (numpy kernels), got 'flase'."
