"""How data is read: every stored chunk decoded once, in any layout pairing and any split,
and never more decoded bytes held than the read budget allows (unless one chunk is larger).

Chunk decodes are counted by tensorstore itself (its `chunk_cache/reads` metric), so these
tests see what the storage layer did, not what the plugin believes it asked for.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Optional

import numpy as np
import pytest

from pytest_ckptparity import Comparison, compare_checkpoints
from pytest_ckptparity import read_plan as plan_mod
from pytest_ckptparity import examples as ex
from pytest_ckptparity.diff import CompareOptions
from pytest_ckptparity.normalize import NormalizedView
from pytest_ckptparity.sources import InMemoryCheckpoint, Pending

SHAPES = dict(layers=8, emb=4, heads=1, head_dim=4, mlp=4, vocab=8)


def chunk_decodes() -> int:
    """How many chunks tensorstore has read from storage in this process so far."""
    import tensorstore as ts

    metrics = ts.experimental_collect_matching_metrics("/tensorstore/cache/chunk_cache/reads")
    return sum(v["value"] for m in metrics for v in m["values"])


def stored_chunks(view: NormalizedView) -> int:
    """Chunks holding the view's compared leaves, from each array's chunk grid."""
    infos = view.checkpoint.leaves()
    total = 0
    for leaf in view.leaves.values():
        for raw in leaf.raw_paths:
            info = infos[raw]
            if info.dtype != "str":
                chunk = info.chunk_shape or info.shape
                total += math.prod(math.ceil(d / c) for d, c in zip(info.shape, chunk))
    return total


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One model written stacked (one chunk per array, or chunks of 2-4 layers) and per layer."""
    root = tmp_path_factory.mktemp("reading")
    p = ex.tiny_params(0, **SHAPES)
    return {
        "stacked": ex.save(root / "stacked", ex.linen_train_state(p), step=0),
        "stacked_chunked": ex.save(root / "stacked_chunked", ex.linen_train_state(p), step=0, chunk_byte_size=128),
        "per_layer": ex.save(root / "per_layer", ex.linen_train_state(ex.unstack(p, "layers_N")), step=0),
        "nnx_per_layer": ex.save(root / "nnx_per_layer", ex.nnx_state(ex.unstack(p, "int_keys")), zarr3=True),
    }


PAIRS = [
    ("stacked", "per_layer"), ("stacked_chunked", "per_layer"), ("stacked_chunked", "stacked"),
    ("stacked_chunked", "nnx_per_layer"), ("per_layer", "stacked_chunked"),
]


def planned_decodes(comparison: Comparison) -> tuple[int, int]:
    """(chunk decodes the read plan expects, chunks stored) over every compared leaf."""
    va, vb = comparison.views
    planned = stored = 0
    for path, la in va.leaves.items():
        lb = vb.leaves[path]
        itemsize = max(np.dtype(la.dtype).itemsize, np.dtype(lb.dtype).itemsize) if la.dtype != "str" else 1
        if la.shape == ():  # a scalar: one chunk a side, no chunk grid in its metadata
            planned, stored = planned + 2, stored + 2
        elif la.dtype != "str":
            _, p, s = plan_mod._plan_blocks([slice(0, d) for d in la.shape], la, lb, itemsize, comparison.options.read_budget)
            planned, stored = planned + p, stored + s
    return planned, stored


@pytest.mark.parametrize("budget", [64, 4 << 10, 256 << 20], ids=["tiny-budget", "small-budget", "default-budget"])
@pytest.mark.parametrize("a,b", PAIRS)
def test_each_stored_chunk_is_decoded_once(layouts, a, b, budget):
    # Values only: leaves stored alike would otherwise be settled from their stored bytes.
    comparison = Comparison(layouts[a], layouts[b], options=CompareOptions(read_budget=budget, stored_bytes=False))
    expected = sum(stored_chunks(v) for v in comparison.views)
    planned, stored = planned_decodes(comparison)
    assert stored == expected
    before = chunk_decodes()
    report = comparison.run()
    assert report.passed, report.mismatches
    # tensorstore decodes exactly what the plan says: each chunk once while the two sides'
    # common block fits in the budget; below that (64 bytes) memory wins and some chunks
    # are decoded again, never more than a few times.
    assert chunk_decodes() - before == planned
    if budget >= 4 << 10:
        assert planned == expected
    else:
        assert expected <= planned <= 4 * expected


@pytest.mark.parametrize("a,b", PAIRS)
def test_layer_items_together_decode_each_chunk_once(layouts, a, b):
    comparison = Comparison(layouts[a], layouts[b], options=CompareOptions(stored_bytes=False))
    parts = comparison.split("layer")
    expected = sum(stored_chunks(v) for v in comparison.views)
    before = chunk_decodes()
    for _, selection in parts:
        assert comparison.run(selection).passed
    assert chunk_decodes() - before == expected


def test_layer_items_follow_the_chunks_along_the_layer_axis(layouts):
    names = [name for name, _ in Comparison(layouts["stacked_chunked"], layouts["per_layer"]).split("layer")]
    # mlp kernels are stored in chunks of 4 layers, attention out in chunks of 2, norms whole.
    assert "params/decoder/layers/mlp/wi_0/kernel[0:4]" in names and "params/decoder/layers/mlp/wi_0/kernel[4:8]" in names
    assert "params/decoder/layers/self_attention/out/kernel[6:8]" in names
    assert "params/decoder/layers/pre_self_attention_layer_norm/scale" in names
    assert not [n for n in names if n.startswith("params/decoder/layers[")]
    # Both sides one array per layer: one item per layer, holding every module of it.
    per_layer = [name for name, _ in Comparison(layouts["per_layer"], layouts["nnx_per_layer"]).split("layer")]
    assert [n for n in per_layer if n.startswith("params/decoder/layers")] == [f"params/decoder/layers[{i}]" for i in range(8)]


def test_a_difference_in_a_chunked_stack_names_its_layer_and_index(layouts, edited):
    def plant(tree: dict) -> None:
        tree["params"]["params"]["decoder"]["layers"]["mlp"]["wo"]["kernel"][1, 5, 2] += 1.0  # (mlp, layer, emb)

    changed = edited(layouts["stacked_chunked"], plant, step=0, chunk_byte_size=128)
    report = compare_checkpoints(changed, layouts["per_layer"], read_budget=64)
    (bad,) = report.mismatches
    assert bad.path == "params/decoder/layers/mlp/wo/kernel"
    assert bad.stats.worst_index == (5, 1, 2) and bad.stats.mismatched_layers == (5,) and bad.stats.n_mismatch == 1


class _Tracked(InMemoryCheckpoint):
    """Hands out fresh copies and watches how many decoded bytes are alive when a read starts."""

    def __init__(self, tree: Any, log: list[tuple[int, int]], name: str) -> None:
        super().__init__(tree, name=name)
        self.log = log
        self.alive = [0]  # shared between the two sides

    def read(self, path: Any, index: Optional[tuple] = None) -> Pending:
        value = self._leaves[path]
        block = np.array(value[index] if index else value)
        self.log.append((self.alive[0], block.nbytes))
        self.alive[0] += block.nbytes
        weakref.finalize(block, self._release, block.nbytes)
        return Pending(lambda: block, block.nbytes)

    def _release(self, n: int) -> None:
        self.alive[0] -= n


def test_decoded_bytes_held_stay_within_the_read_budget():
    rng = np.random.default_rng(0)
    # Uneven sizes (1-4 KiB, blocks of at most budget/8 = 4 KiB per side), so a rule that
    # admitted a read while under the budget, rather than only when it fits, would overshoot.
    tree = {f"w{i:02d}": rng.standard_normal((int(rng.integers(8, 33)), 32)).astype(np.float32) for i in range(12)}
    tree["big"] = rng.standard_normal((256, 64)).astype(np.float32)  # 64 KiB: read in 16 blocks
    budget = 32 << 10
    log: list[tuple[int, int]] = []
    a, b = _Tracked(tree, log, "A"), _Tracked(tree, log, "B")
    b.alive = a.alive
    report = compare_checkpoints(a, b, read_budget=budget)
    assert report.passed and len(report.results) == 13
    assert len(log) > 2 * 13  # "big" was read in several blocks
    # Reads of a pair start together: the pair's second read sees its first as alive.
    for (alive_a, n_a), (alive_b, n_b) in zip(log[::2], log[1::2]):
        assert alive_a + n_a + n_b <= budget
        assert alive_b == alive_a + n_a
    assert max(alive for alive, _ in log) > 0  # readahead happened: reads overlapped


@pytest.fixture(scope="module")
def meshes(two_meshes: dict[str, str]) -> dict[str, str]:
    """Rows vs columns; `cols_planted` differs in the first and the last slab (conftest.py's MESH_WRITER)."""
    return {"rows": two_meshes["rows"], "cols": two_meshes["cols"], "cols_planted": two_meshes["planted_ends"]}


class _ReadLog:
    """Records the decoded size of every array read the comparison starts (both sides)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from pytest_ckptparity.sources import OrbaxCheckpoint

        self.sizes: list[int] = []
        original = OrbaxCheckpoint.read

        def read(ckpt: OrbaxCheckpoint, path: Any, index: Optional[tuple] = None) -> Pending:
            pending = original(ckpt, path, index)
            self.sizes.append(pending.nbytes)
            return pending

        monkeypatch.setattr(OrbaxCheckpoint, "read", read)


def test_grids_on_different_axes_read_in_budget_sized_slabs(meshes, monkeypatch):
    a_info = Comparison(meshes["rows"], meshes["cols"]).views
    assert a_info[0].leaves["params/w"].chunk_shape == (8, 48) and a_info[1].leaves["params/w"].chunk_shape == (64, 6)
    budget = 8 << 10  # both sides' common block (the whole 12 KiB array, twice) does not fit
    chunk = 8 * 48 * 4  # the largest stored chunk: 1.5 KiB
    log = _ReadLog(monkeypatch)
    comparison = Comparison(meshes["rows"], meshes["cols"], options=CompareOptions(read_budget=budget))
    planned, stored = planned_decodes(comparison)
    before = chunk_decodes()
    report = comparison.run()
    assert report.passed
    (w,) = report.results
    assert w.stats.n_total == 64 * 48  # every element compared
    assert w.bytes_read == 2 * 64 * 48 * 4  # and read once as values, in several slabs
    assert len(log.sizes) > 2 and max(log.sizes) <= max(budget // plan_mod.BLOCK_SHARE, chunk)
    # Memory wins: slabs of at most the largest chunk (8 x 48 elements), shaped 16 x 24 so
    # each cuts two of A's row chunks and four of B's column chunks: every A chunk is decoded
    # twice and every B chunk four times, 16 + 32 (slabs of one A chunk would take 8 + 64).
    assert stored == 16 and chunk_decodes() - before == planned == 48


def test_differences_in_the_first_and_last_slab_are_found(meshes, monkeypatch):
    log = _ReadLog(monkeypatch)
    report = compare_checkpoints(meshes["rows"], meshes["cols_planted"], read_budget=8 << 10)
    (w,) = report.mismatches
    assert len(log.sizes) > 2  # read in slabs
    assert w.stats.n_total == 64 * 48 and w.stats.n_mismatch == 2
    assert set(w.stats.first_indices) == {(0, 0), (63, 47)} and w.stats.max_abs == pytest.approx(1.0)


def test_grids_on_different_axes_are_read_whole_when_the_budget_holds_them(meshes):
    comparison = Comparison(meshes["rows"], meshes["cols"])  # default budget: 12 KiB a side fits
    planned, stored = planned_decodes(comparison)
    before = chunk_decodes()
    assert comparison.run().passed
    assert chunk_decodes() - before == planned == stored == 16
