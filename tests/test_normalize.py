"""Every Linen/NNX layout compares like with like; differences land at canonical path + layer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pytest_ckptparity import CkptParityError, CkptParityUsageError, Layout, assert_ckpt_parity, compare_checkpoints, register_layout, unregister_layout
from pytest_ckptparity import examples as ex
from pytest_ckptparity.api import Comparison

TRAINING = ["linen_scan", "linen_noscan", "nnx_wrapped", "nnx_wrapped_scan", "nnx_pure", "nnx_pure_intkeys", "maxtext"]
DECODE = ["decode_scan", "decode_unroll"]


@pytest.mark.parametrize("a,b", list(itertools.combinations(TRAINING, 2)))
def test_training_layouts_equal_in_both_orders(variants, a, b):
    for x, y in ((a, b), (b, a)):
        report = assert_ckpt_parity(variants[x], variants[y])
        assert len(report.results) == 39  # params, opt_state (mu, nu, counts), step


@pytest.mark.parametrize("train", TRAINING)
@pytest.mark.parametrize("decode", DECODE)
def test_float32_training_equals_its_bf16_decode_checkpoint_under_cast(variants, train, decode):
    for x, y in ((train, decode), (decode, train)):
        report = assert_ckpt_parity(variants[x], variants[y], include="params", dtype_policy="cast", atol=0, rtol=0)
        assert len(report.results) == 12
    with pytest.raises(CkptParityError, match="dtype float32 vs bfloat16"):
        assert_ckpt_parity(variants[train], variants[decode], include="params")


def test_real_samples_pairwise(samples):
    assert_ckpt_parity(samples["maxtext_decode_scan"], samples["maxtext_decode_unroll"])
    assert_ckpt_parity(samples["maxtext_decode_unroll"], samples["maxtext_decode_scan"])
    for decode in ("maxtext_decode_scan", "maxtext_decode_unroll"):
        for x, y in ((samples["maxtext_nnx_scan"], samples[decode]), (samples[decode], samples["maxtext_nnx_scan"])):
            assert_ckpt_parity(x, y, include="params", dtype_policy="cast", atol=0, rtol=0)
    # The unscanned sample has its own random init: the verdict must say so, per layer.
    report = compare_checkpoints(samples["maxtext_nnx_scan"], samples["maxtext_nnx_noscan"], include="params/decoder/layers/**")
    assert not report.passed and all(r.stats.mismatched_layers == (0, 1) for r in report.mismatches)


@pytest.mark.parametrize("sample,label", [
    ("maxtext_nnx_scan", "MaxText Linen-compatible NNX state (with nnx_aux), scanned on axis 1"),
    ("maxtext_nnx_noscan", "MaxText Linen-compatible NNX state (with nnx_aux), layers as layers_N"),
    ("maxtext_decode_scan", "parameter-only decode checkpoint, scanned on axis 1"),
    ("maxtext_decode_unroll", "parameter-only decode checkpoint, layers as layers_N"),
])
def test_detection_of_the_samples(samples, sample, label):
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(samples[sample], {"step": np.zeros(1, np.float32), "other": np.zeros(1, np.float32)})
    assert f"A: {label}" in str(info.value)
    assert "B: generic tree (compared as it is)" in str(info.value)
    # The fallback says why and what to do, and that the layouts probably differ.
    assert "B: layout not recognised (top-level keys: other, step; group keys among them: step" in str(info.value)
    assert "format_a/format_b" in str(info.value) and "register_layout" in str(info.value)
    assert "the two layouts probably differ" in str(info.value)


@pytest.mark.parametrize("name,label", [
    ("linen_scan", "Linen TrainState, scanned on axis 1"), ("linen_noscan", "Linen TrainState, layers as layers_N"),
    ("nnx_wrapped", "NNX state with value wrappers, layers as integer keys"), ("nnx_pure", "NNX pure dict, layers as layers_N"),
    ("nnx_pure_intkeys", "NNX pure dict, layers as integer keys"),
])
def test_detection_of_variants(variants, name, label):
    assert Comparison(variants[name], variants[name]).views[0].describe() == label


def test_a_weight_named_value_survives_wrapper_stripping(samples):
    view = Comparison(samples["maxtext_decode_scan"], samples["maxtext_decode_scan"]).views[0]
    assert "params/decoder/layers/self_attention/value/kernel" in view.leaves
    assert not any(p.endswith("/value") for p in view.leaves)


PLANT = [  # (layout name, writer from stacked params)
    ("linen_scan", lambda p: ex.linen_train_state(p)),
    ("linen_noscan", lambda p: ex.linen_train_state(ex.unstack(p, "layers_N"))),
    ("nnx_wrapped", lambda p: ex.nnx_state(ex.unstack(p, "int_keys"))),
    ("nnx_pure", lambda p: ex.nnx_state(ex.unstack(p, "layers_N"), wrapped=False)),
    ("maxtext", lambda p: ex.maxtext_linen_compatible(p)),
    ("decode_unroll", lambda p: ex.decode_params(ex.unstack(p, "layers_N"))),
]


@pytest.mark.parametrize("name,write", PLANT, ids=[p[0] for p in PLANT])
def test_a_planted_change_is_found_at_its_path_layer_and_index(variants, tmp_path, name, write):
    p = ex.tiny_params(0)
    p["decoder"]["layers"]["mlp"]["wi_0"]["kernel"][3, 1, 5] += 4.0  # emb 3, layer 1, mlp 5
    changed = ex.save(tmp_path / name, write(p))
    reference = variants["decode_scan" if name.startswith("decode") else "linen_scan"]
    for a, b in ((changed, reference), (reference, changed)):
        with pytest.raises(CkptParityError) as info:
            assert_ckpt_parity(a, b, include="params")
        (bad,) = info.value.report.mismatches
        assert bad.path == "params/decoder/layers/mlp/wi_0/kernel"
        assert bad.stats.n_mismatch == 1 and bad.stats.worst_index == (1, 3, 5) and bad.stats.mismatched_layers == (1,)
        assert "params/decoder/layers/mlp/wi_0/kernel [layer 1]" in str(info.value)
        assert "worst at [layer 1] index (3, 5)" in str(info.value)


def test_a_change_in_optimizer_moments_of_the_real_sample(samples, edited):
    def edit(tree):
        tree["opt_state"][0]["mu"]["params"]["decoder"]["layers"]["mlp"]["wo"]["kernel"][7, 1, 3] = 1.0

    changed = edited(samples["maxtext_nnx_scan"], edit)
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(samples["maxtext_nnx_scan"], changed)
    (bad,) = info.value.report.mismatches
    assert bad.path == "opt_state/0/mu/decoder/layers/mlp/wo/kernel" and bad.stats.worst_index == (1, 7, 3)
    assert (bad.stats.worst_a, bad.stats.worst_b) == (0.0, 1.0)


def test_layer_axis_is_1_for_weights_not_0(variants):
    """The upstream comparator swapped axes 0 and 1 for NNX stacks: emb (16) is not a layer."""
    view = Comparison(variants["nnx_wrapped_scan"], variants["linen_noscan"]).views[0]
    leaf = view.leaves["params/decoder/layers/mlp/wi_0/kernel"]
    assert leaf.layers == 2 and leaf.layer_shape == (16, 32) and leaf.storage.axis == 1
    assert_ckpt_parity(variants["nnx_wrapped_scan"], variants["linen_noscan"])
    report = compare_checkpoints(variants["nnx_wrapped_scan"], variants["linen_noscan"], scan_axis=0)
    assert not report.passed  # forcing the wrong axis must not pass


def test_layers_N_and_integer_keys_are_the_same_thing(variants):
    """The upstream comparator reported `layers_N` vs `layers/N` as different."""
    report = assert_ckpt_parity(variants["linen_noscan"], variants["nnx_pure_intkeys"])
    assert not any("layers_" in r.path for r in report.results)


def test_rngs_ignored_by_default_compared_on_request(variants, samples):
    report = assert_ckpt_parity(variants["nnx_wrapped"], variants["maxtext"])
    assert report.ignored == 2  # both sides' RNG leaves fold onto the same two canonical paths
    report = compare_checkpoints(variants["nnx_wrapped"], variants["maxtext"], ignore_rngs=False)
    rngs = {r.path: r.kind for r in report.results if r.path.startswith("rngs/")}
    # Same seed, so the key data agree; the NNX-side count (3) differs from MaxText's (0).
    assert rngs == {"rngs/decoder/rngs/dropout/count": "values", "rngs/decoder/rngs/dropout/key": None}
    report = compare_checkpoints(samples["maxtext_nnx_scan"], samples["maxtext_nnx_noscan"], ignore_rngs=False, include="rngs")
    assert {r.kind for r in report.results} >= {"only in A"}


def test_format_override_and_unknown_layout(variants):
    view = Comparison(variants["linen_scan"], variants["linen_scan"], format_a="generic").views[0]
    assert view.describe().startswith("generic tree") and "params/params/decoder/decoder_norm/scale" in view.leaves
    with pytest.raises(CkptParityUsageError, match="unknown layout 'paxml'; known layouts: maxtext_nnx, lora"):
        assert_ckpt_parity(variants["linen_scan"], variants["linen_scan"], format_a="paxml")


def test_rename_rules_and_registered_layouts(tmp_path, variants):
    p = ex.tiny_params(0)
    paxml_like = {"lm": {"transformer": {f"x_layers_{i}": {"ffn": ex.unstack(p, "layers_N")["decoder"][f"layers_{i}"]["mlp"]} for i in range(2)}}}
    path = ex.save(tmp_path / "pax", paxml_like)
    rules = [(r"^lm/transformer/x_layers_(\d+)/ffn", r"params/decoder/layers_\1/mlp")]
    assert_ckpt_parity(path, variants["linen_scan"], rename=rules, include="params/decoder/layers/mlp/**")
    layout = Layout("paxml_test", "paxml-converted tree", detect=lambda f: "lm" in f.top, rename=tuple(rules), ignore=("params/decoder/layers/mlp/wo/**",))
    register_layout(layout)
    try:
        report = assert_ckpt_parity(path, variants["linen_scan"], include="params/decoder/layers/mlp/**")
        assert [r.path.rsplit("/", 2)[-2] for r in report.results] == ["wi_0", "wi_1"]
        assert report.layouts[0] == "paxml-converted tree, layers as layers_N"
    finally:
        unregister_layout("paxml_test")


def test_lora_adapter_tree_detected(tmp_path):
    tree = {"params": {"decoder": {"layers": {"self_attention": {"query": {"lora_a.kernel": np.ones((16, 2, 4), np.float32)}}}}}}
    path = ex.save(tmp_path / "lora", tree)
    report = assert_ckpt_parity(path, path)
    assert report.layouts[0] == "LoRA adapter tree, scanned on axis 1"
    assert report.results[0].path == "params/decoder/layers/self_attention/query/lora_a.kernel"
