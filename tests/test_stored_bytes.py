"""Stored chunk bytes compared before decoding: equal bytes settle a chunk, anything else is
decoded and compared as values.

Every checkpoint here is written by orbax. Decodes are counted by tensorstore itself (its
`chunk_cache/reads` metric); reading stored bytes through the key-value store decodes nothing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from pytest_ckptparity import Comparison
from pytest_ckptparity import examples as ex
from pytest_ckptparity.diff import CompareOptions, scoped_paths

SHAPES = dict(layers=4, emb=8, heads=2, head_dim=4, mlp=16, vocab=32)
STORAGE = {  # every way orbax stores arrays: OCDBT or one file per chunk, zarr v2 or v3
    "ocdbt-zarr2": dict(ocdbt=True, zarr3=False),
    "ocdbt-zarr3": dict(ocdbt=True, zarr3=True),
    "files-zarr2": dict(ocdbt=False, zarr3=False),
    "files-zarr3": dict(ocdbt=False, zarr3=True),
}
CHUNK = 256  # bytes: several chunks per array, so one change leaves most chunks equal


def chunk_decodes() -> int:
    import tensorstore as ts

    metrics = ts.experimental_collect_matching_metrics("/tensorstore/cache/chunk_cache/reads")
    return sum(v["value"] for m in metrics for v in m["values"])


def stored_chunks(comparison: Comparison) -> int:
    """Chunks holding the compared leaves, both sides (a scalar is one chunk)."""
    total = 0
    paths, _ = scoped_paths(*comparison.views, comparison.options)
    for view in comparison.views:
        infos = view.checkpoint.leaves()
        for leaf in (view.leaves[p] for p in paths):
            for raw in leaf.raw_paths:
                info = infos[raw]
                if info.dtype != "str":
                    chunk = info.chunk_shape or info.shape
                    total += math.prod(math.ceil(d / c) for d, c in zip(info.shape, chunk))
    return total


def figures(report: Any) -> list[tuple]:
    """What a verdict says about each leaf: kind, element count, mismatches, worst."""
    out = []
    for r in report.results:
        s = r.stats
        out.append((r.path, r.kind, r.layer_range, s and (s.n_total, s.n_mismatch, s.n_nonfinite, s.max_abs, s.max_rel, s.worst_index, s.mismatched_layers)))
    return out


def run(a: str, b: str, **options: Any) -> tuple[Any, int]:
    """The report and the chunks tensorstore decoded to make it."""
    comparison = Comparison(a, b, options=CompareOptions(**options))
    before = chunk_decodes()
    report = comparison.run()
    return report, chunk_decodes() - before


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """The same model written twice by orbax, in each storage; chunked so arrays hold several chunks."""
    root = tmp_path_factory.mktemp("stored")
    p = ex.tiny_params(0, **SHAPES)
    out = {}
    for name, kw in STORAGE.items():
        out[name] = tuple(ex.save(root / f"{name}-{side}", ex.linen_train_state(p), step=0, chunk_byte_size=CHUNK, **kw) for side in "ab")
    return out


@pytest.mark.parametrize("storage", list(STORAGE))
def test_a_pair_written_twice_is_settled_from_stored_bytes_alone(pairs, storage):
    a, b = pairs[storage]
    by_bytes, decoded = run(a, b)
    by_values, decoded_values = run(a, b, stored_bytes=False)
    assert by_bytes.passed and by_values.passed
    assert decoded == 0  # every chunk of every leaf, scalars included, equal as stored
    assert decoded_values == stored_chunks(Comparison(a, b)) > 2 * 39
    assert figures(by_bytes) == figures(by_values)
    assert all(r.stats.n_total == math.prod(r.shape_a) for r in by_bytes.results)
    assert by_bytes.bytes_read == by_values.bytes_read  # the data covered, in decoded bytes


@pytest.mark.parametrize("storage", list(STORAGE))
def test_one_changed_element_is_decoded_and_reported(pairs, storage, edited):
    a, _ = pairs[storage]

    def change(tree: dict) -> None:
        tree["params"]["params"]["decoder"]["layers"]["mlp"]["wi_1"]["kernel"][5, 2, 9] += 0.5  # (emb, layer, mlp)

    changed = edited(a, change, step=0, chunk_byte_size=CHUNK, **STORAGE[storage])
    by_bytes, decoded = run(changed, a)
    by_values, _ = run(changed, a, stored_bytes=False)
    (bad,) = by_bytes.mismatches
    assert bad.path == "params/decoder/layers/mlp/wi_1/kernel"
    assert bad.stats.worst_index == (2, 5, 9) and bad.stats.mismatched_layers == (2,) and bad.stats.n_mismatch == 1
    assert bad.stats.max_abs == pytest.approx(0.5)
    assert decoded == 2  # the changed chunk, on each side; every other chunk settled from bytes
    assert figures(by_bytes) == figures(by_values)


def test_different_bytes_with_equal_values_still_pass(tmp_path):
    """-0.0 and 0.0 are stored differently and are equal: bytes that differ are decoded."""
    w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    w[3, 3] = 0.0
    flipped = w.copy()
    flipped[3, 3] = -0.0
    a = ex.save(tmp_path / "a", {"w": w}, step=0)
    b = ex.save(tmp_path / "b", {"w": flipped}, step=0)
    report, decoded = run(a, b)
    assert report.passed and report.results[0].stats.n_total == 64
    assert decoded == 2


def test_equal_nan_false_compares_values(tmp_path):
    """A NaN never equals itself under equal_nan=False, which equal bytes cannot show."""
    w = np.ones((4, 4), np.float32)
    w[1, 2] = np.nan
    a = ex.save(tmp_path / "a", {"w": w}, step=0)
    b = ex.save(tmp_path / "b", {"w": w}, step=0)
    assert run(a, b)[0].passed
    report, decoded = run(a, b, equal_nan=False)
    (bad,) = report.mismatches
    assert bad.stats.worst_index == (1, 2) and bad.stats.n_mismatch == 1 and decoded == 2


def test_leaves_stored_differently_fall_back_to_values(tmp_path, pairs):
    """Another chunk grid, a stack against per-layer arrays, a cast, a tree in memory: values."""
    p = ex.tiny_params(0, **SHAPES)
    a, _ = pairs["ocdbt-zarr2"]
    one_chunk = ex.save(tmp_path / "one_chunk", ex.linen_train_state(p), step=0)
    per_layer = ex.save(tmp_path / "per_layer", ex.linen_train_state(ex.unstack(p, "layers_N")), step=0, chunk_byte_size=CHUNK)
    decode = ex.save(tmp_path / "decode", ex.decode_params(p), step=0, chunk_byte_size=CHUNK)
    mlp = ["params/decoder/layers/mlp/**"]
    for other, extra in ((one_chunk, {}), (per_layer, {}), (decode, {"dtype_policy": "cast"})):
        extra = dict(extra, include=mlp)
        comparison = Comparison(a, other, options=CompareOptions(**extra))
        va, vb = comparison.views
        paths, _ = scoped_paths(va, vb, comparison.options)
        assert len(paths) == 3 and all(va.leaves[p].chunk_shape != vb.leaves[p].chunk_shape or va.leaves[p].dtype != vb.leaves[p].dtype
                                       or vb.leaves[p].storage.per_layer for p in paths)
        report, decoded = run(a, other, **extra)
        assert report.passed, report.mismatches
        assert decoded == stored_chunks(comparison)
        assert figures(report) == figures(run(a, other, stored_bytes=False, **extra)[0])
    from conftest import restore_tree

    in_memory = restore_tree(a)
    comparison = Comparison(a, in_memory)
    before = chunk_decodes()
    assert comparison.run().passed
    assert chunk_decodes() - before == stored_chunks(Comparison(a, a)) // 2


def test_a_recomputed_model_reads_values_at_once_after_its_first_differing_blocks(tmp_path, monkeypatch):
    """Blocks already issued as stored bytes are read as values as soon as a leaf's bytes
    differ (and for every leaf not begun once the model is seen to be recomputed), instead
    of each being decoded alone when its turn comes: only the first differing block of the
    first few leaves is settled from bytes, and the verdict is the one values give."""
    from pytest_ckptparity import read_plan

    p = ex.tiny_params(0, **SHAPES)
    noisy = ex._map(p, lambda x: (x * (1 + 1e-7 * np.sign(x))).astype(x.dtype) if x.dtype.kind == "f" else x)
    a = ex.save(tmp_path / "a", ex.linen_train_state(p), step=0, chunk_byte_size=CHUNK)
    b = ex.save(tmp_path / "b", ex.linen_train_state(noisy), step=0, chunk_byte_size=CHUNK)
    settled = []
    real = read_plan._settle_stored

    def settle(va: Any, vb: Any, job: Any, reads: Any, opts: Any) -> bool:
        differed = real(va, vb, job, reads, opts)
        settled.append((job.path, differed))
        return differed

    monkeypatch.setattr(read_plan, "_settle_stored", settle)
    budget = 16 * CHUNK  # many small blocks of each leaf in flight at once
    report, decoded = run(a, b, read_budget=budget, rtol=1e-5)
    assert report.passed and report.headroom()[0] > 0  # not bit-identical
    differing = [path for path, differed in settled if differed]
    # a differing leaf is settled from bytes once, then read as values; after a few, no leaf is
    assert 1 <= len(differing) <= read_plan.STORED_MISSES_BEFORE_VALUES
    assert len(set(differing)) == len(differing), f"a leaf was settled from bytes twice: {settled}"
    last = max(i for i, (_, differed) in enumerate(settled) if differed)
    assert len(differing) < read_plan.STORED_MISSES_BEFORE_VALUES or last == len(settled) - 1, settled
    assert decoded <= stored_chunks(Comparison(a, b))  # no chunk decoded twice (equal ones not at all)
    assert figures(report) == figures(run(a, b, read_budget=budget, rtol=1e-5, stored_bytes=False)[0])
