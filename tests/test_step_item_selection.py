"""Which step and which item a CheckpointManager root opens: only committed steps, never a
guess between several items. Each test fails if the rule is relaxed by one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pytest_ckptparity import CkptParityUsageError, assert_ckpt_parity, compare_checkpoints, open_checkpoint
from pytest_ckptparity import examples as ex


def _w(value: float) -> dict:
    return {"params": {"w": np.full((3, 4), value, np.float32)}}


@pytest.fixture
def root_with_uncommitted_step(tmp_path: Path) -> Path:
    """Steps 1 (w = 1) and 5 (w = 5) saved by orbax; step 5 then loses its commit marker.

    A writer that saves straight into the step folder (no temporary folder renamed at the
    end) leaves exactly this while it is still writing: a normally named step folder with
    metadata and items but no `commit_success.txt`. Deleting the marker from a finished
    save is the only way to freeze that moment for a test.
    """
    root = tmp_path / "run"
    ex.save(root, _w(1.0), step=1)
    ex.save(root, _w(5.0), step=5)
    marker = root / "5" / "commit_success.txt"
    assert marker.is_file()  # orbax wrote it: the test below really removes a marker
    marker.unlink()
    return root


def test_a_step_without_commit_marker_is_not_read(root_with_uncommitted_step):
    root = root_with_uncommitted_step
    ckpt = open_checkpoint(root)
    assert ckpt.step == 1 and ckpt.step_dir.name == "1"
    assert ckpt.uncommitted_newer == (5,)
    # Values prove which step was read: step 1 holds 1.0, the unfinished step 5 holds 5.0.
    assert_ckpt_parity(root, _w(1.0))
    report = compare_checkpoints(root, _w(5.0))
    (bad,) = report.mismatches
    assert bad.path == "params/w" and (bad.stats.worst_a, bad.stats.worst_b) == (1.0, 5.0)
    assert bad.stats.n_mismatch == 12


def test_asking_for_an_uncommitted_step_lists_the_committed_ones(root_with_uncommitted_step):
    root = root_with_uncommitted_step
    with pytest.raises(CkptParityUsageError) as info:
        assert_ckpt_parity(root, _w(5.0), step=5)
    assert str(info.value) == f"A: step 5 is not a committed step of '{root}' (committed steps: 1); pass one of those."
    # The step folder itself is refused too, naming what is missing.
    with pytest.raises(CkptParityUsageError, match=r"is an unfinished orbax checkpoint \(no commit_success.txt\)"):
        assert_ckpt_parity(root / "5", _w(5.0))


def test_a_root_whose_only_step_is_uncommitted_is_refused(tmp_path):
    root = tmp_path / "run"
    ex.save(root, _w(5.0), step=5)
    (root / "5" / "commit_success.txt").unlink()  # see root_with_uncommitted_step
    with pytest.raises(CkptParityUsageError) as info:
        assert_ckpt_parity(root, _w(5.0))
    assert str(info.value) == f"A: '{root}' holds no committed step (only unfinished ones: 5); wait for a save to finish."


@pytest.fixture
def two_items(tmp_path: Path) -> Path:
    """A CheckpointManager step with two items, `ema` (w = 2) and `model` (w = 3)."""
    import orbax.checkpoint as ocp

    root = tmp_path / "two_items"
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True)
    handlers = {"ema": ocp.PyTreeCheckpointHandler(), "model": ocp.PyTreeCheckpointHandler()}
    with ocp.CheckpointManager(root, options=options, item_handlers=handlers) as mgr:
        mgr.save(3, args=ocp.args.Composite(ema=ocp.args.PyTreeSave(_w(2.0)), model=ocp.args.PyTreeSave(_w(3.0))))
        mgr.wait_until_finished()
    return root


@pytest.mark.parametrize("where", ["root", "step"])
def test_several_items_are_an_error_never_a_pick(two_items, where):
    target = two_items if where == "root" else two_items / "3"
    step_dir = two_items / "3"
    for reference in (_w(2.0), _w(3.0)):  # neither item may be compared silently
        with pytest.raises(CkptParityUsageError) as info:
            compare_checkpoints(target, reference)
        assert str(info.value) == (
            f"A: step folder '{step_dir}' holds several items (ema, model); point at the one to compare, "
            f"e.g. '{step_dir / 'ema'}'."
        )


def test_pointing_at_one_item_compares_that_item(two_items):
    assert_ckpt_parity(two_items / "3" / "model", _w(3.0))
    assert_ckpt_parity(two_items / "3" / "ema", _w(2.0))
    report = compare_checkpoints(two_items / "3" / "model", _w(2.0))
    assert [(r.path, r.stats.worst_a, r.stats.worst_b) for r in report.mismatches] == [("params/w", 3.0, 2.0)]
