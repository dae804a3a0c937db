"""Leaves that are easy to get subtly wrong: nested strings, lists in plain trees, a damaged
string store. Written by orbax, compared against the same tree in memory."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pytest_ckptparity import CkptParityError, CkptParityUsageError, assert_ckpt_parity, compare_checkpoints
from pytest_ckptparity import examples as ex


def _tree(name: str = "run-7") -> dict:
    return {"params": {
        "meta": {"name": name, "tags": ["a", "b"]},
        "w": [np.ones((2, 3), np.float32), {"k": np.arange(4, dtype=np.int32)}],
    }}


def test_nested_strings_and_lists_of_a_plain_tree(tmp_path):
    path = ex.save(tmp_path / "c", _tree())
    report = assert_ckpt_parity(path, _tree())
    assert [r.path for r in report.results] == ["params/meta/name", "params/meta/tags/0", "params/meta/tags/1", "params/w/0", "params/w/1/k"]
    assert_ckpt_parity(_tree(), path)
    report = compare_checkpoints(path, _tree("run-8"))
    (bad,) = report.mismatches
    assert bad.path == "params/meta/name" and (bad.stats.worst_a, bad.stats.worst_b) == ("run-7", "run-8")
    other = _tree()
    other["params"]["w"][1]["k"] = np.array([0, 1, 2, 9], np.int32)
    (bad,) = compare_checkpoints(path, other).mismatches
    assert bad.path == "params/w/1/k" and bad.stats.worst_index == (3,) and (bad.stats.worst_a, bad.stats.worst_b) == (3, 9)


def test_a_string_missing_from_the_string_store_is_a_damaged_checkpoint(tmp_path, copy_ckpt):
    path = ex.save(tmp_path / "c", _tree())
    damaged = copy_ckpt(path, "damaged")
    store = damaged / "_strings.json"
    strings = json.loads(store.read_text())
    del strings["params.meta.tags.1"]  # damage a copy, as a truncated write would
    store.write_text(json.dumps(strings))
    with pytest.raises(CkptParityUsageError) as info:
        assert_ckpt_parity(damaged, _tree())
    assert str(info.value) == "A: string leaf 'params.meta.tags.1' listed in _METADATA is missing from _strings.json; the checkpoint is damaged."
    assert os.fspath(info.value.path) == str(damaged)


def test_truncated_chunks_name_the_array_and_the_item_folder(tmp_path, copy_ckpt):
    w = np.arange(1 << 16, dtype=np.float32)
    path = ex.save(tmp_path / "c", {"params": {"w": w}}, step=0)
    damaged = copy_ckpt(path, "damaged")
    item = damaged / "0" / "items"
    # The chunk data file (the b-tree nodes are small files beside it): cut short, as an
    # interrupted copy or a full disk leaves it.
    (data,) = [f for f in item.rglob("*") if f.is_file() and f.parent.name == "d" and f.stat().st_size > w.nbytes // 2]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CkptParityUsageError) as info:
        assert_ckpt_parity(damaged, {"params": {"w": w}})
    message = str(info.value)
    assert message.startswith(f"A: could not read array 'params.w' from '{item}' (")
    assert message.endswith("its data is truncated or corrupt: re-save the checkpoint or pick another step.")
    assert os.fspath(info.value.path) == str(item)


def test_a_top_level_leaf_named_like_a_stack_is_compared(tmp_path):
    tree = {"params": {"w": np.ones(3, np.float32)}, "step": np.int32(2), "dense_layers": np.arange(6, dtype=np.float32).reshape(2, 3)}
    path = ex.save(tmp_path / "c", tree)
    report = assert_ckpt_parity(path, tree)
    assert {r.path for r in report.results} == {"params/w", "step", "dense_layers"}
    other = dict(tree, dense_layers=tree["dense_layers"] + 1)
    assert [r.path for r in compare_checkpoints(path, other).mismatches] == ["dense_layers"]


def test_one_sided_leaves_and_notes_in_the_report(tmp_path):
    import jax

    a = {"step": np.int32(7), "only_a": np.zeros((2,), np.float32)}
    b = {"step": np.uint32(8), "only_b": np.zeros((3,), np.int8)}
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(a, b, names=("old", "new"))
    rows = [line.strip() for line in str(info.value).splitlines() if line.startswith("  ")]
    assert "only_a  [only in old] float32 (2,) vs -: present in old only" in rows
    assert "only_b  [only in new] - vs int8 (3,): present in new only" in rows
    (step,) = [r for r in rows if r.startswith("step")]
    assert step.endswith("worst at index (): old=7 new=8; exact [int32 vs uint32 compared by value]")
    # A typed PRNG key saved by orbax against its raw key data in memory: the note survives
    # from the one side that has it.
    path = ex.save(tmp_path / "keys", {"k": jax.random.key(3)})
    report = assert_ckpt_parity(path, {"k": np.asarray(jax.random.key_data(jax.random.key(3)))})
    assert report.results[0].notes == ("PRNG key data (threefry2x32)",)


def test_a_structure_only_pass_says_so():
    from pytest_ckptparity.report import summary_line

    a = {"w": np.zeros(3, np.float32)}
    report = assert_ckpt_parity(a, {"w": np.ones(3, np.float32)}, compare_values=False)
    assert report.values_compared is False and report.bytes_read == 0
    assert summary_line(report) == "checkpoint parity: 1 leaf matches in structure, shape and dtype (A vs B)"
    assert summary_line(assert_ckpt_parity(a, a)) == "checkpoint parity: 1 leaf matches (A vs B); every value identical"
