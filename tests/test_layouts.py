"""The save formats of a Linen -> NNX migration, written by the real libraries, each against
a Linen scanned, a Linen unscanned and an NNX `layers/N` checkpoint of the same values; a
planted element in any of them is found at its canonical path, layer and index; a layer
stack never matches a plain array or a stack on another axis by luck."""

from __future__ import annotations

import itertools
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_ckptparity import CkptParityError, assert_ckpt_parity, compare_checkpoints
from pytest_ckptparity import examples as ex
from pytest_ckptparity.api import Comparison
from pytest_ckptparity.cli import main as cli_main

REFERENCES = ["linen_scan", "linen_noscan", "nnx_wrapped"]  # the `variants` fixture's names

# name -> (writer of the same model from stacked params into `path`, label the header shows)
FORMATS = {
    "converter_scan": (lambda p, path: ex.save(path, ex.nnx_converter_state(p), step=7), "NNX state with value wrappers on some subtrees"),
    "converter_intkeys": (lambda p, path: ex.save(path, ex.nnx_converter_state(ex.unstack(p, "int_keys"))), "NNX state with value wrappers on some subtrees"),
    # A decoder model saved as flax documents it is exactly MaxText's decode export format.
    "flax_state": (lambda p, path: ex.save_nnx_model(path, ex.nnx_module(ex.unstack(p, "int_keys"))), "parameter-only decode checkpoint"),
    "flax_pure_dict": (lambda p, path: ex.save_nnx_model(path, ex.nnx_module(ex.unstack(p, "layers_N")), pure=True), "parameter-only decode checkpoint"),
    "flax_state_scan": (lambda p, path: ex.save_nnx_model(path, ex.nnx_module(p)), "parameter-only decode checkpoint"),
    "older_params_step": (lambda p, path: ex.save(path, ex.nnx_older_state(p), step=7), "NNX state, older layout (params with step or optimizer)"),
    "older_params_optimizer": (lambda p, path: ex.save(path, ex.nnx_older_state(ex.unstack(p, "int_keys"), with_optimizer=True)), "NNX state, older layout (params with step or optimizer)"),
}
# What each format holds besides the parameters, so the comparison scope is the honest one.
SCOPE = {"older_params_step": ["params", "step"]}
PARAMS_ONLY = {"flax_state", "flax_pure_dict", "flax_state_scan"}


@pytest.fixture(scope="session")
def formats(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    p = ex.tiny_params(0)
    return {name: write(p, str(root / name)) for name, (write, _) in FORMATS.items()}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_is_detected_and_named(formats, fmt):
    view = Comparison(formats[fmt], formats[fmt]).views[0]
    assert view.describe().startswith(FORMATS[fmt][1])
    assert "params/decoder/layers/mlp/wi_0/kernel" in view.leaves
    assert not any(p.endswith("/value") for p in view.leaves), "a wrapper survived"


@pytest.mark.parametrize("fmt,ref", list(itertools.product(sorted(FORMATS), REFERENCES)))
def test_each_format_equals_every_reference_in_both_orders(formats, variants, fmt, ref):
    include = SCOPE.get(fmt)
    for a, b in ((formats[fmt], variants[ref]), (variants[ref], formats[fmt])):
        report = assert_ckpt_parity(a, b, include=include, atol=0, rtol=0)
        n_params = len([r for r in report.results if r.path.startswith("params/")])
        assert n_params == 12, [r.path for r in report.results]
        if fmt in PARAMS_ONLY:  # a parameter-only side: the other side's optimizer is left out, and said so
            assert len(report.results) == 12
            assert any("holds parameters only: opt_state and step of" in n for n in report.notes)
        elif include is None:  # the whole training state: params, Adam moments, counts, step
            assert len(report.results) == 39


@pytest.mark.parametrize("pure,label", [(False, "NNX model state (module attributes at the top, value wrappers)"), (True, "model parameters (module attributes at the top)")])
def test_the_flax_documentation_model_saved_as_documented(tmp_path, pure, label):
    """`StandardCheckpointer().save(path, nnx.state(model))` of flax's own two-layer example."""
    from flax import nnx

    class TwoLayerMLP(nnx.Module):
        def __init__(self, dim: int, rngs: nnx.Rngs) -> None:
            self.linear1 = nnx.Linear(dim, dim, rngs=rngs, use_bias=False)
            self.linear2 = nnx.Linear(dim, dim, rngs=rngs, use_bias=False)

    model = TwoLayerMLP(4, rngs=nnx.Rngs(0))
    path = ex.save_nnx_model(tmp_path / "mlp", model, pure=pure)
    kernels = {"linear1": {"kernel": np.array(model.linear1.kernel.value)}, "linear2": {"kernel": np.array(model.linear2.kernel.value)}}
    report = assert_ckpt_parity(path, model, atol=0, rtol=0)
    assert report.layouts[0].startswith(label) and [r.path for r in report.results] == ["params/linear1/kernel", "params/linear2/kernel"]
    for tree in (nnx.state(model), nnx.to_pure_dict(nnx.state(model)), {"params": kernels}):
        assert_ckpt_parity(tree, path, atol=0, rtol=0)
    kernels["linear2"]["kernel"][1, 2] += 1.0
    with pytest.raises(CkptParityError, match=r"params/linear2/kernel  \[values\].*worst at index \(1, 2\)"):
        assert_ckpt_parity(path, {"params": kernels})


def test_mixed_wrappers_keep_the_optimizer_moments_in_place(formats, variants):
    """The converter wraps model/ but not optimizer/: moments land on Linen's canonical paths."""
    report = assert_ckpt_parity(formats["converter_scan"], variants["linen_scan"], atol=0, rtol=0)
    paths = {r.path for r in report.results}
    assert "opt_state/0/mu/decoder/layers/mlp/wi_0/kernel" in paths and "step" in paths
    assert not any(r.kind in ("only in A", "only in B") for r in report.results)


def test_live_module_its_state_pure_dict_and_linen_params_all_match_the_flax_save(formats):
    from flax import nnx

    p = ex.tiny_params(0)
    module = ex.nnx_module(ex.unstack(p, "int_keys"))
    state = nnx.state(module)
    live = [module, state, nnx.to_pure_dict(state), {"params": p}, {"params": {"params": p}}]
    for saved in ("flax_state", "flax_pure_dict", "flax_state_scan"):
        for tree in live:
            report = assert_ckpt_parity(tree, formats[saved], atol=0, rtol=0)
            assert len(report.results) == 12
            assert_ckpt_parity(formats[saved], tree, atol=0, rtol=0)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_planted_element_is_found_at_its_canonical_place(tmp_path, variants, fmt):
    p = ex.tiny_params(0)
    p["decoder"]["layers"]["mlp"]["wi_0"]["kernel"][3, 1, 5] += 4.0  # emb 3, layer 1, mlp 5
    changed = FORMATS[fmt][0](p, str(tmp_path / fmt))
    for ref in REFERENCES:
        for a, b in ((changed, variants[ref]), (variants[ref], changed)):
            with pytest.raises(CkptParityError) as info:
                assert_ckpt_parity(a, b, include="params")
            (bad,) = info.value.report.mismatches
            assert bad.path == "params/decoder/layers/mlp/wi_0/kernel"
            assert bad.stats.n_mismatch == 1 and bad.stats.worst_index == (1, 3, 5) and bad.stats.mismatched_layers == (1,)
            assert "params/decoder/layers/mlp/wi_0/kernel [layer 1]" in str(info.value)
            assert "worst at [layer 1] index (3, 5)" in str(info.value)


# --------------------------------------------------------------------------------------
# A layer stack that is not one
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def axis0(tmp_path_factory):
    """NNX weights stacked on axis 0 ((L, emb, mlp)), as `nnx.vmap` stacks them."""
    return ex.save(tmp_path_factory.mktemp("axis0") / "nnx_axis0", ex.nnx_state(ex.restack(ex.tiny_params(0), 0)))


def test_a_stack_on_another_axis_is_a_layout_mismatch_naming_both_shapes(axis0, variants):
    for a, b, odd in ((axis0, variants["linen_scan"], "A"), (variants["linen_scan"], axis0, "B")):
        report = compare_checkpoints(a, b, include="params")
        assert not report.passed
        kinds = {r.path: r.kind for r in report.mismatches}
        # Every stacked weight differs; leaves outside the stack still match.
        assert kinds["params/decoder/layers/mlp/wi_0/kernel"] == "layout" and len(kinds) == 9
        # out/kernel is (heads=2, L=2, head_dim, emb): the same shape on either axis, so its
        # values decide, and the row says its stack is read on a doubtful axis.
        out = next(r for r in report.mismatches if r.path == "params/decoder/layers/self_attention/out/kernel")
        assert out.kind == "values" and any(f"the leaves of {odd}'s stack params/decoder/layers disagree" in n for n in out.notes)
        assert set(kinds.values()) == {"layout", "values"} and list(kinds.values()).count("values") == 1
        text = "\n".join(report.mismatches[0].notes)
        stored = {"A": (2, 16, 32), "B": (16, 2, 32)} if odd == "A" else {"A": (16, 2, 32), "B": (2, 16, 32)}
        assert f"A stores {stored['A'][1] if odd == 'A' else 2} layers stacked on axis 1 of float32 {stored['A']}" in text
        assert f"B stores {2 if odd == 'A' else 16} layers stacked on axis 1 of float32 {stored['B']}" in text
        fix = "scan_axis=(0, 1) if A stacks its layers on axis 0" if odd == "A" else "scan_axis=(1, 0) if B stacks its layers on axis 0"
        assert fix in text
        # Stating the axis makes them the same model, in both orders.
        axes = (0, 1) if odd == "A" else (1, 0)
        assert_ckpt_parity(a, b, scan_axis=axes, atol=0, rtol=0)


def test_the_verdict_of_a_stacked_leaf_does_not_depend_on_its_neighbours(tmp_path):
    """A stack holding one weight only: nothing else to disagree with, still a layout mismatch."""
    p = ex.tiny_params(0)
    one = {"decoder": {"layers": {"mlp": {"wi_0": {"kernel": p["decoder"]["layers"]["mlp"]["wi_0"]["kernel"]}}}}}
    moved = ex.restack(one, 0)
    a = ex.save(tmp_path / "axis0", ex.nnx_state(moved, rngs=False))
    for x, y in ((a, {"params": one}), ({"params": one}, a)):
        report = compare_checkpoints(x, y, include="params")
        (bad,) = report.mismatches
        assert bad.kind == "layout" and "stacked on axis 1 of float32 (2, 16, 32)" in " ".join(bad.notes)


def test_a_layered_leaf_never_matches_a_plain_one(tmp_path):
    """Same canonical shape, same values: a stack against a plain array of another name."""
    stacked = np.arange(2 * 3 * 4, dtype=np.float32).reshape(3, 2, 4)
    a = {"params": {"decoder": {"layers": {"w": stacked}}}}
    b = {"params": {"decoder": {"layers": {"w": np.ascontiguousarray(np.moveaxis(stacked, 1, 0))}}}}
    b_plain = ex.save(tmp_path / "plain", b, step=1, custom_metadata={"scan_layers": False})
    for x, y in ((a, b_plain), (b_plain, a)):
        report = compare_checkpoints(x, y)
        (bad,) = report.mismatches
        assert bad.kind == "layout" and bad.stats is None  # never compared by value
        assert "a plain float32 (2, 3, 4) (no layer axis)" in " ".join(bad.notes)


# --------------------------------------------------------------------------------------
# Training vs decode, and trees the tool does not understand
# --------------------------------------------------------------------------------------


def test_training_against_its_decode_checkpoint_compares_the_parameters(samples, capsys):
    train, decode = samples["maxtext_nnx_scan"], samples["maxtext_decode_scan"]
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(train, decode)
    text = str(info.value)
    first = text.splitlines()[0]
    assert first.startswith("checkpoint parity failed: 12 of 12 leaves differ") and "dtype_policy='cast' compares the values" in first
    assert "B holds parameters only: opt_state and step of A left out." in text
    assert "only in" not in text
    report = assert_ckpt_parity(train, decode, dtype_policy="cast")
    assert len(report.results) == 12
    assert cli_main([train, decode, "--dtype-policy", "cast", "--color", "no"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint parity: 12 leaves match" in out and "B holds parameters only" in out


def test_an_unrecognised_tree_says_why_and_what_to_do():
    a = {"optimizer": {"mystery": np.zeros(3, np.float32)}, "extra": np.ones(2, np.float32)}
    report = compare_checkpoints(a, {"params": {"w": np.zeros(3, np.float32)}})
    assert report.layouts[0].startswith("generic tree")
    reason = report.notes[0]
    assert reason.startswith("A: layout not recognised (top-level keys: extra, optimizer; group keys among them: optimizer")
    assert "format_a/format_b" in reason and "rename=" in reason and "register_layout" in reason
    assert any("the two layouts probably differ" in n for n in report.notes)


# --------------------------------------------------------------------------------------
# Property: every writer against every other
# --------------------------------------------------------------------------------------


@st.composite
def models(draw):
    """A `decoder/layers` stack (axis 1) of 1-3 float32 weights, 1-3 layers, plus plain leaves."""
    n_layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    layers = {}
    for i in range(draw(st.integers(1, 3))):
        per_layer = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
        layers[f"w{i}"] = {"kernel": rng.standard_normal(per_layer[:1] + (n_layers,) + per_layer[1:]).astype(np.float32)}
    return {"decoder": {"layers": layers, "norm": {"scale": rng.standard_normal(3).astype(np.float32)}}, "embed": {"embedding": rng.standard_normal((4, 2)).astype(np.float32)}}


def _in_memory_writers():
    """Every layout, as the live objects users hand the helper (the normalizer is shared with
    files; the file round trip of each format is tested above with orbax)."""
    from flax import nnx

    return {
        "linen_scan": lambda p: ex.linen_train_state(p),
        "linen_noscan": lambda p: ex.linen_train_state(ex.unstack(p, "layers_N")),
        "nnx_wrapped_intkeys": lambda p: ex.nnx_state(ex.unstack(p, "int_keys"), rngs=False),
        "nnx_pure_scan": lambda p: ex.nnx_state(p, wrapped=False, rngs=False),
        "converter": lambda p: ex.nnx_converter_state(p),
        "converter_intkeys": lambda p: ex.nnx_converter_state(ex.unstack(p, "int_keys")),
        "older_params_optimizer": lambda p: ex.nnx_older_state(ex.unstack(p, "layers_N"), with_optimizer=True),
        "module": lambda p: ex.nnx_module(ex.unstack(p, "int_keys")),
        "module_state": lambda p: nnx.state(ex.nnx_module(p)),
        "module_pure": lambda p: nnx.to_pure_dict(nnx.state(ex.nnx_module(ex.unstack(p, "layers_N")))),
    }


WRITER_NAMES = sorted(["linen_scan", "linen_noscan", "nnx_wrapped_intkeys", "nnx_pure_scan", "converter", "converter_intkeys", "older_params_optimizer", "module", "module_state", "module_pure"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=models(), pair=st.sampled_from(list(itertools.combinations(WRITER_NAMES, 2))), data=st.data())
def test_every_layout_pair_passes_and_a_change_lands_at_the_same_place(model, pair, data):
    writers = _in_memory_writers()
    a, b = (writers[name](model) for name in pair)
    assert_ckpt_parity(a, b, include="params", atol=0, rtol=0)
    assert_ckpt_parity(b, a, include="params", atol=0, rtol=0)

    name = data.draw(st.sampled_from(sorted(model["decoder"]["layers"])))
    x = model["decoder"]["layers"][name]["kernel"]
    index = tuple(data.draw(st.integers(0, d - 1)) for d in x.shape)
    changed = {**model, "decoder": {**model["decoder"], "layers": {**model["decoder"]["layers"], name: {"kernel": x.copy()}}}}
    changed["decoder"]["layers"][name]["kernel"][index] += 8.0
    holder = data.draw(st.sampled_from(pair))  # whichever side of the pair holds the change
    other = pair[1] if holder == pair[0] else pair[0]
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(writers[holder](changed), writers[other](model), include="params")
    (bad,) = info.value.report.mismatches
    layer, rest = index[1], index[:1] + index[2:]
    assert bad.path == f"params/decoder/layers/{name}/kernel"
    assert bad.stats.worst_index == (layer, *rest) and bad.stats.mismatched_layers == (layer,)


def test_property_writers_round_trip_through_orbax_too(tmp_path):
    """One model, every in-memory writer saved with orbax: the file forms agree with each other."""
    p = ex.tiny_params(3)
    writers = _in_memory_writers()
    saved = {}
    for name in WRITER_NAMES:
        tree = writers[name](p)
        if name == "module":
            saved[name] = ex.save_nnx_model(tmp_path / name, tree)
        else:
            saved[name] = ex.save(tmp_path / name, tree)
    names = sorted(saved)
    for x, y in zip(names, names[1:] + names[:1]):
        assert_ckpt_parity(saved[x], saved[y], include="params", atol=0, rtol=0)


def test_the_scan_axis_is_stated_on_the_command_line_and_in_pytest(axis0, variants, capsys, pytester):
    assert cli_main([axis0, variants["linen_scan"], "--include", "params", "--color", "no"]) == 1
    assert "pass scan_axis=(0, 1) if A stacks its layers on axis 0" in capsys.readouterr().out
    assert cli_main([axis0, variants["linen_scan"], "--scan-axis", "0,1", "--color", "no", "--atol", "0", "--rtol", "0"]) == 0
    assert "checkpoint parity: 39 leaves match" in capsys.readouterr().out
    assert cli_main([axis0, variants["linen_scan"], "--scan-axis", "zero"]) == 2
    assert "--scan-axis must be an axis for both sides or two axes 'A,B'" in capsys.readouterr().err

    base = ("-p", "no:cacheprovider", f"--ckpt-a={axis0}", f"--ckpt-b={variants['linen_scan']}", "--ckpt-include=params")
    failing = pytester.runpytest_subprocess(*base)
    assert failing.ret == 1
    failing.stdout.fnmatch_lines(["*[[]layout[]]*"])
    passing = pytester.runpytest_subprocess(*base, "--ckpt-scan-axis=0,1")
    assert passing.ret == 0
    bad = pytester.runpytest_subprocess(*base, "--ckpt-scan-axis=0,1,2")
    assert bad.ret == 4 and "--ckpt-scan-axis must be an axis for both sides or two axes 'A,B'" in bad.stderr.str()
