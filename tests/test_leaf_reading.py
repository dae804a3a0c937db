"""Leaves that are easy to get subtly wrong: nested strings, lists in plain trees, a damaged
string store. Written by orbax, compared against the same tree in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pytest_ckptparity import CkptParityUsageError, assert_ckpt_parity, compare_checkpoints
from pytest_ckptparity import examples as ex


def _tree(name: str = "run-7") -> dict:
    return {
        "meta": {"name": name, "tags": ["a", "b"]},
        "w": [np.ones((2, 3), np.float32), {"k": np.arange(4, dtype=np.int32)}],
    }


def test_nested_strings_and_lists_of_a_plain_tree(tmp_path):
    path = ex.save(tmp_path / "c", _tree())
    report = assert_ckpt_parity(path, _tree())
    assert [r.path for r in report.results] == ["meta/name", "meta/tags/0", "meta/tags/1", "w/0", "w/1/k"]
    assert_ckpt_parity(_tree(), path)
    report = compare_checkpoints(path, _tree("run-8"))
    (bad,) = report.mismatches
    assert bad.path == "meta/name" and (bad.stats.worst_a, bad.stats.worst_b) == ("run-7", "run-8")
    other = _tree()
    other["w"][1]["k"] = np.array([0, 1, 2, 9], np.int32)
    (bad,) = compare_checkpoints(path, other).mismatches
    assert bad.path == "w/1/k" and bad.stats.worst_index == (3,) and (bad.stats.worst_a, bad.stats.worst_b) == (3, 9)


def test_a_string_missing_from_the_string_store_is_a_damaged_checkpoint(tmp_path, copy_ckpt):
    path = ex.save(tmp_path / "c", _tree())
    damaged = copy_ckpt(path, "damaged")
    store = damaged / "_strings.json"
    strings = json.loads(store.read_text())
    del strings["meta.tags.1"]  # damage a copy, as a truncated write would
    store.write_text(json.dumps(strings))
    with pytest.raises(CkptParityUsageError) as info:
        assert_ckpt_parity(damaged, _tree())
    assert str(info.value) == "A: string leaf 'meta.tags.1' listed in _METADATA is missing from _strings.json; the checkpoint is damaged."
    assert info.value.path == damaged
