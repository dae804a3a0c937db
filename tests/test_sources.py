"""Each source kind opens lazily and gives paths, shapes and dtypes before any data read."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pytest_ckptparity import assert_ckpt_parity, compare_checkpoints, open_checkpoint
from pytest_ckptparity import examples as ex
from pytest_ckptparity.sources import InMemoryCheckpoint, OrbaxCheckpoint


@pytest.mark.parametrize("suffix", ["", "/0", "/0/items"])
def test_manager_root_step_and_item_folders_open_the_same_item(samples, suffix):
    ckpt = open_checkpoint(samples["maxtext_nnx_scan"] + suffix)
    assert str(ckpt.item_dir).endswith("maxtext_nnx_scan/0/items")
    info = ckpt.leaves()[("params", "params", "decoder", "layers", "mlp", "wi_0", "kernel")]
    assert (info.shape, info.dtype) == ((16, 2, 32), "float32")
    assert ckpt.custom_metadata["scan_layers"] is True


def test_latest_committed_step_and_step_argument(tmp_path):
    root = tmp_path / "run"
    ex.save(root, {"w": np.full(3, 1.0, np.float32)}, step=1)
    ex.save(root, {"w": np.full(3, 2.0, np.float32)}, step=5)
    (root / "9.orbax-checkpoint-tmp-123").mkdir()  # an unfinished save is never picked
    assert open_checkpoint(root).step_dir.name == "5"
    assert open_checkpoint(root, step=1).step_dir.name == "1"
    assert compare_checkpoints(root, {"w": np.full(3, 2.0, np.float32)}).passed
    report = compare_checkpoints(root, {"w": np.full(3, 2.0, np.float32)}, step=1)
    assert report.mismatches[0].stats.worst_a == 1.0


@pytest.mark.parametrize("ocdbt,zarr3", [(True, False), (True, True), (False, False), (False, True)])
def test_storage_options_and_dtypes(tmp_path, ocdbt, zarr3):
    tree = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3), "bf16": jnp.arange(4, dtype=jnp.bfloat16),
        "f16": np.ones(2, np.float16), "i8": np.array([-3, 4], np.int8), "u32": np.array([1, 2], np.uint32),
        "bool": np.array([True, False]), "scalar": 3.5, "text": "hello", "nested": [np.zeros(2, np.float32), {"k": np.ones(1, np.float32)}],
    }
    path = ex.save(tmp_path / "c", tree, ocdbt=ocdbt, zarr3=zarr3)
    ckpt = open_checkpoint(path)
    dtypes = {"/".join(k): v.dtype for k, v in ckpt.leaves().items()}
    assert dtypes == {"bf16": "bfloat16", "bool": "bool", "f16": "float16", "f32": "float32", "i8": "int8", "nested/0": "float32",
                      "nested/1/k": "float32", "scalar": "float64", "text": "str", "u32": "uint32"}
    assert_ckpt_parity(path, tree)
    assert_ckpt_parity(tree, path)


def test_metadata_reads_no_array_data(samples, monkeypatch):
    ckpt = open_checkpoint(samples["maxtext_nnx_scan"])
    monkeypatch.setattr(OrbaxCheckpoint, "read", lambda *a, **k: pytest.fail("array data was read"))
    report = assert_ckpt_parity(ckpt, samples["maxtext_nnx_noscan"], compare_values=False)
    assert report.bytes_read == 0 and len(report.results) == 39


def test_reads_a_slice_only(samples):
    ckpt = open_checkpoint(samples["maxtext_nnx_scan"])
    path = ("params", "params", "decoder", "layers", "mlp", "wi_0", "kernel")
    pending = ckpt.read(path, (slice(0, 4), slice(1, 2), slice(None)))
    assert pending.nbytes == 4 * 1 * 32 * 4 and pending.result().shape == (4, 1, 32)


def test_in_memory_train_state_nnx_state_module_and_arrays(variants):
    params = ex.tiny_params(0)
    linen = ex.linen_train_state(params)
    assert_ckpt_parity(linen, variants["linen_scan"])
    assert_ckpt_parity(ex.nnx_state(ex.unstack(params, "int_keys")), variants["linen_scan"])
    assert_ckpt_parity(variants["nnx_wrapped"], ex.nnx_state(params, wrapped=False))
    assert_ckpt_parity({"params": {"params": jax.tree_util.tree_map(jnp.asarray, params)}}, variants["linen_scan"], include="params")


def test_nnx_module_and_typed_prng_keys():
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 4, rngs=rngs)
            self.rngs = rngs

    a, b = Tiny(nnx.Rngs(0)), Tiny(nnx.Rngs(0))
    report = assert_ckpt_parity(a, b, ignore_rngs=False)
    key = next(r for r in report.results if r.path.endswith("key"))
    assert key.dtype_a == "uint32" and key.notes and "PRNG key data" in key.notes[0]
    c = Tiny(nnx.Rngs(1))
    report = compare_checkpoints(a, c, ignore_rngs=False)
    assert {"rngs/rngs/default/key", "params/lin/kernel"} <= {r.path for r in report.mismatches}


def test_typed_keys_in_memory_equal_their_saved_key_data(tmp_path):
    tree = {"k": jax.random.key(3), "w": np.ones(2, np.float32)}
    path = ex.save(tmp_path / "keys", tree)
    assert_ckpt_parity(tree, path)
    assert isinstance(open_checkpoint(tree), InMemoryCheckpoint)


def test_bfloat16_numpy_arrays():
    x = np.arange(5).astype(ml_dtypes.bfloat16)
    assert_ckpt_parity({"x": x}, {"x": jnp.asarray(x)})
