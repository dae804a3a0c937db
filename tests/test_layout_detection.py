"""Detection edge cases: a decode checkpoint without an embedder, and training-state keys
that rule the decode layout out."""

from __future__ import annotations

import pytest

from pytest_ckptparity import assert_ckpt_parity
from pytest_ckptparity import examples as ex
from pytest_ckptparity.api import Comparison


def test_a_decode_checkpoint_without_token_embedder_is_detected(tmp_path, variants):
    p = ex.tiny_params(0)
    del p["token_embedder"]  # tied or external embeddings: only the decoder is saved
    path = ex.save(tmp_path / "decode", ex.decode_params(p), step=0)
    view = Comparison(path, path).views[0]
    assert view.describe() == "parameter-only decode checkpoint, scanned on axis 1"
    assert "params/decoder/layers/mlp/wi_0/kernel" in view.leaves
    report = assert_ckpt_parity(path, variants["linen_scan"], include="params/decoder/**", dtype_policy="cast", atol=0, rtol=0)
    assert len(report.results) == 11


@pytest.mark.parametrize("extra", ["params", "model", "opt_state", "step", "optimizer"])
def test_training_state_keys_rule_out_the_decode_layout(tmp_path, extra):
    import numpy as np

    tree = {"decoder": {"w": np.ones(2, np.float32)}, extra: {"x": np.zeros(1, np.float32)}}
    path = ex.save(tmp_path / extra, tree)
    label = Comparison(path, path).views[0].describe()
    assert not label.startswith("parameter-only decode checkpoint"), label
