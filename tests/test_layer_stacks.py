"""Layer stacks beyond the two-layer demo: families of 10+ layers, stacks not named `layers`,
a scan axis recorded in the checkpoint, and the RNG stack axis. Every pair is written with
flax + orbax; each test checks the verdict and where the report says a change is."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pytest_ckptparity import CkptParityError, assert_ckpt_parity, compare_checkpoints
from pytest_ckptparity import examples as ex
from pytest_ckptparity.api import Comparison

SMALL = dict(emb=4, heads=1, head_dim=4, mlp=6, vocab=8)


def _mismatch_lines(err: CkptParityError) -> dict[str, str]:
    """Report rows by located path (path plus `[layer N]`)."""
    rows = {}
    for line in str(err).splitlines():
        if line.startswith("  ") and "  [" in line:
            located, rest = line.strip().split("  [", 1)
            rows[located] = rest
    return rows


# --------------------------------------------------------------------------------------
# Families of 10 or more layers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twelve_layers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("twelve")
    p = ex.tiny_params(0, layers=12, **SMALL)
    drifted = ex.tiny_params(0, layers=12, **SMALL)
    drifted["decoder"]["layers"]["mlp"]["wi_0"]["kernel"][1, 10, 2] += 1.0  # (emb, layer, mlp)
    drifted["decoder"]["layers"]["mlp"]["wo"]["kernel"][5, 11, 3] -= 2.0  # (mlp, layer, emb)
    return {
        "stacked": ex.save(root / "stacked", ex.linen_train_state(p), step=0),
        "layers_N": ex.save(root / "layers_N", ex.linen_train_state(ex.unstack(p, "layers_N")), step=0),
        "int_keys": ex.save(root / "int_keys", ex.nnx_state(ex.unstack(p, "int_keys"))),
        "layers_N_drift": ex.save(root / "layers_N_drift", ex.linen_train_state(ex.unstack(drifted, "layers_N")), step=0),
        "int_keys_drift": ex.save(root / "int_keys_drift", ex.nnx_state(ex.unstack(drifted, "int_keys"))),
    }


@pytest.mark.parametrize("unstacked", ["layers_N", "int_keys"])
def test_families_of_twelve_layers_match_a_stack_of_twelve(twelve_layers, unstacked):
    for a, b in ((twelve_layers[unstacked], twelve_layers["stacked"]), (twelve_layers["stacked"], twelve_layers[unstacked])):
        report = assert_ckpt_parity(a, b)
        assert len(report.results) == 39 and not [r.path for r in report.results if "layers_" in r.path]
        kernel = next(r for r in report.results if r.path == "params/decoder/layers/mlp/wi_0/kernel")
        assert kernel.layers == 12 and kernel.shape_a == kernel.shape_b == (12, 4, 6)
    view = Comparison(twelve_layers[unstacked], twelve_layers[unstacked]).views[0]
    assert view.leaves["params/decoder/layers/mlp/wi_0/kernel"].storage.per_layer[10][-2:] in (("wi_0", "kernel"), ("kernel", "value"))
    raw = "/".join(view.leaves["params/decoder/layers/mlp/wi_0/kernel"].storage.per_layer[10])
    assert ("layers_10/" in raw) if unstacked == "layers_N" else ("layers/10/" in raw)


@pytest.mark.parametrize("drifted", ["layers_N_drift", "int_keys_drift"])
def test_a_change_in_layer_10_or_11_is_found_there(twelve_layers, drifted):
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(twelve_layers["stacked"], twelve_layers[drifted], include="params")
    bad = {r.path: r for r in info.value.report.mismatches}
    assert set(bad) == {"params/decoder/layers/mlp/wi_0/kernel", "params/decoder/layers/mlp/wo/kernel"}
    wi, wo = bad["params/decoder/layers/mlp/wi_0/kernel"], bad["params/decoder/layers/mlp/wo/kernel"]
    assert wi.stats.mismatched_layers == (10,) and wi.stats.worst_index == (10, 1, 2) and wi.stats.n_mismatch == 1
    assert wo.stats.mismatched_layers == (11,) and wo.stats.worst_index == (11, 5, 3) and wo.stats.n_mismatch == 1
    rows = _mismatch_lines(info.value)
    assert set(rows) == {"params/decoder/layers/mlp/wi_0/kernel [layer 10]", "params/decoder/layers/mlp/wo/kernel [layer 11]"}
    assert "worst at [layer 10] index (1, 2)" in rows["params/decoder/layers/mlp/wi_0/kernel [layer 10]"]
    assert "worst at [layer 11] index (5, 3)" in rows["params/decoder/layers/mlp/wo/kernel [layer 11]"]


# --------------------------------------------------------------------------------------
# Stacks with other names
# --------------------------------------------------------------------------------------

STACKS = {"dense_layers": 2, "moe_layers": 3, "layers_remainder": 5}  # name -> layer count


def _named_stacks(seed: int = 0) -> dict[str, Any]:
    """A decoder with three stacks (weights stacked on axis 1, as MaxText scans them)."""
    rng = np.random.default_rng(seed)
    decoder: dict[str, Any] = {"decoder_norm": {"scale": np.ones(4, np.float32)}}
    for name, n in STACKS.items():
        decoder[name] = {
            "mlp": {"wi": {"kernel": rng.standard_normal((4, n, 6)).astype(np.float32)}},
            "norm": {"scale": rng.standard_normal((4, n)).astype(np.float32)},
        }
    return {"decoder": decoder}


def _tree_map(tree: Any, fn: Any) -> Any:
    return {k: _tree_map(v, fn) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def _unstack_named(params: dict[str, Any], style: str) -> dict[str, Any]:
    decoder = dict(params["decoder"])
    for name, n in STACKS.items():
        stacked = decoder.pop(name)
        per_layer = [_tree_map(stacked, lambda x, i=i: np.take(x, i, axis=1)) for i in range(n)]
        if style == "layers_N":
            decoder.update({f"{name}_{i}": layer for i, layer in enumerate(per_layer)})
        else:
            decoder[name] = {str(i): layer for i, layer in enumerate(per_layer)}
    return {"decoder": decoder}


@pytest.fixture(scope="module")
def named_stacks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("named_stacks")
    p = _named_stacks()
    drifted = _named_stacks()
    drifted["decoder"]["dense_layers"]["mlp"]["wi"]["kernel"][0, 1, 0] += 1.0
    drifted["decoder"]["moe_layers"]["mlp"]["wi"]["kernel"][3, 2, 5] += 1.0
    drifted["decoder"]["layers_remainder"]["norm"]["scale"][2, 4] += 1.0
    return {
        "stacked": ex.save(root / "stacked", {"params": {"params": p}}, step=0),
        "layers_N": ex.save(root / "layers_N", {"params": {"params": _unstack_named(p, "layers_N")}}, step=0),
        "int_keys": ex.save(root / "int_keys", {"params": {"params": _unstack_named(p, "int_keys")}}, step=0),
        "layers_N_drift": ex.save(root / "layers_N_drift", {"params": {"params": _unstack_named(drifted, "layers_N")}}, step=0),
    }


@pytest.mark.parametrize("unstacked", ["layers_N", "int_keys"])
def test_stacks_not_named_layers_match_stacked_and_unstacked(named_stacks, unstacked):
    report = assert_ckpt_parity(named_stacks["stacked"], named_stacks[unstacked])
    layered = {r.path: r.layers for r in report.results if r.layers is not None}
    assert layered == {
        f"params/decoder/{name}/{leaf}": n for name, n in STACKS.items() for leaf in ("mlp/wi/kernel", "norm/scale")
    }
    assert len(report.results) == 7  # six stacked leaves and decoder_norm
    assert_ckpt_parity(named_stacks[unstacked], named_stacks["stacked"])


def test_a_change_in_a_named_stack_is_located(named_stacks):
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(named_stacks["stacked"], named_stacks["layers_N_drift"])
    rows = _mismatch_lines(info.value)
    assert set(rows) == {
        "params/decoder/dense_layers/mlp/wi/kernel [layer 1]",
        "params/decoder/moe_layers/mlp/wi/kernel [layer 2]",
        "params/decoder/layers_remainder/norm/scale [layer 4]",
    }
    assert "worst at [layer 2] index (3, 5)" in rows["params/decoder/moe_layers/mlp/wi/kernel [layer 2]"]
    assert "worst at [layer 4] index (2,)" in rows["params/decoder/layers_remainder/norm/scale [layer 4]"]
    assert "worst at [layer 1] index (0, 0)" in rows["params/decoder/dense_layers/mlp/wi/kernel [layer 1]"]


# --------------------------------------------------------------------------------------
# A scan axis recorded in the checkpoint
# --------------------------------------------------------------------------------------


def _axis0_params(seed: int = 0) -> dict[str, Any]:
    """Three layers stacked on axis 0 (shape (layers, emb, mlp)), as with param_scan_axis=0."""
    rng = np.random.default_rng(seed)
    return {"decoder": {"layers": {"mlp": {"wi": {"kernel": rng.standard_normal((3, 4, 6)).astype(np.float32)}}}}}


def _unstack_axis0(params: dict[str, Any]) -> dict[str, Any]:
    kernel = params["decoder"]["layers"]["mlp"]["wi"]["kernel"]
    return {"decoder": {f"layers_{i}": {"mlp": {"wi": {"kernel": kernel[i]}}} for i in range(kernel.shape[0])}}


def test_a_recorded_param_scan_axis_is_honoured(tmp_path):
    p = _axis0_params()
    recorded = ex.save(tmp_path / "recorded", {"params": {"params": p}}, step=0, custom_metadata={"param_scan_axis": 0})
    unrecorded = ex.save(tmp_path / "unrecorded", {"params": {"params": p}}, step=0)
    unstacked = ex.save(tmp_path / "unstacked", {"params": {"params": _unstack_axis0(p)}}, step=0)

    report = assert_ckpt_parity(recorded, unstacked)
    (leaf,) = report.results
    assert leaf.path == "params/decoder/layers/mlp/wi/kernel" and leaf.layers == 3 and leaf.shape_a == (3, 4, 6)
    assert report.layouts[0] == "Linen TrainState, scanned on axis 0"
    # Without the record the MaxText default (axis 1) applies: emb (4) would be the layers.
    with pytest.raises(CkptParityError, match=r"params/decoder/layers/mlp/wi/kernel  \[\w+\] float32 \(4, 3, 6\) vs float32 \(3, 4, 6\)"):
        assert_ckpt_parity(unrecorded, unstacked)
    # An explicit scan_axis still wins over the record.
    assert not compare_checkpoints(recorded, unstacked, scan_axis=1).passed

    drifted = _axis0_params()
    drifted["decoder"]["layers"]["mlp"]["wi"]["kernel"][2, 1, 4] += 1.0
    changed = ex.save(tmp_path / "changed", {"params": {"params": _unstack_axis0(drifted)}}, step=0)
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(recorded, changed)
    (bad,) = info.value.report.mismatches
    assert bad.stats.worst_index == (2, 1, 4) and bad.stats.mismatched_layers == (2,)
    assert "params/decoder/layers/mlp/wi/kernel [layer 2]" in str(info.value)
    assert "worst at [layer 2] index (1, 4)" in str(info.value)


# --------------------------------------------------------------------------------------
# The NNX RNG stack axis
# --------------------------------------------------------------------------------------

RNG_LAYERS = 3


def _nnx_with_layer_rngs(*, stacked: bool, counts: tuple[int, ...], key_seeds: tuple[int, ...]) -> Any:
    """An NNX state whose scanned layers each hold a dropout stream (key and count).

    nnx.scan stacks non-Param state such as RNG keys and counts on axis 0, while weights are
    stacked on axis 1 here (MaxText's param_scan_axis).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((4, RNG_LAYERS, 6)).astype(np.float32)
    keys = [jax.random.key(s) for s in key_seeds]
    if stacked:
        layers: Any = {
            "mlp": {"wi": {"kernel": nnx.Param(jnp.asarray(kernel))}},
            "rngs": {"dropout": {"key": nnx.RngKey(jnp.stack(keys)), "count": nnx.RngCount(jnp.asarray(counts, jnp.uint32))}},
        }
    else:
        layers = {
            i: {
                "mlp": {"wi": {"kernel": nnx.Param(jnp.asarray(kernel[:, i]))}},
                "rngs": {"dropout": {"key": nnx.RngKey(keys[i]), "count": nnx.RngCount(jnp.asarray(counts[i], jnp.uint32))}},
            }
            for i in range(RNG_LAYERS)
        }
    return nnx.State({"model": {"decoder": {"layers": layers}}})


def test_rng_state_stacks_on_axis_0_and_is_reported_by_layer(tmp_path):
    same = dict(counts=(0, 1, 2), key_seeds=(10, 11, 12))
    stacked = ex.save(tmp_path / "stacked", _nnx_with_layer_rngs(stacked=True, **same))
    unstacked = ex.save(tmp_path / "unstacked", _nnx_with_layer_rngs(stacked=False, **same))
    report = assert_ckpt_parity(stacked, unstacked, ignore_rngs=False)
    rng_leaves = {r.path: (r.layers, r.shape_a) for r in report.results if r.path.startswith("rngs/")}
    assert rng_leaves == {
        "rngs/decoder/layers/rngs/dropout/count": (3, (3,)),
        "rngs/decoder/layers/rngs/dropout/key": (3, (3, 2)),
    }

    drifted = ex.save(tmp_path / "drifted", _nnx_with_layer_rngs(stacked=False, counts=(0, 1, 7), key_seeds=(10, 99, 12)))
    assert_ckpt_parity(stacked, drifted)  # RNG state is ignored by default
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(stacked, drifted, ignore_rngs=False)
    rows = _mismatch_lines(info.value)
    assert set(rows) == {"rngs/decoder/layers/rngs/dropout/count [layer 2]", "rngs/decoder/layers/rngs/dropout/key [layer 1]"}
    assert "worst at [layer 2]: A=2 B=7" in rows["rngs/decoder/layers/rngs/dropout/count [layer 2]"]
    count = next(r for r in info.value.report.mismatches if r.path.endswith("count"))
    assert count.stats.worst_index == (2,) and count.stats.n_mismatch == 1
