"""Shared fixtures: the real MaxText samples and variants written with flax + orbax.

Variants are written once per test process (each xdist worker writes its own copy in its
own temp dir), from one set of weights, in every layout the normalizer knows.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

DATA = Path(__file__).parent / "tests" / "data"
SAMPLES = ("maxtext_nnx_scan", "maxtext_nnx_noscan", "maxtext_decode_scan", "maxtext_decode_unroll")

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def samples() -> dict[str, str]:
    """Paths of the MaxText-written sample checkpoints (CheckpointManager roots)."""
    return {name: str(DATA / name) for name in SAMPLES}


@pytest.fixture(scope="session")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One model (seed 0) written in every layout, with orbax, in several storage options."""
    from pytest_ckptparity import examples as ex

    root = tmp_path_factory.mktemp("variants")
    p = ex.tiny_params(0)
    return {
        "linen_scan": ex.save(root / "linen_scan", ex.linen_train_state(p), step=7, custom_metadata={"scan_layers": True}),
        "linen_noscan": ex.save(root / "linen_noscan", ex.linen_train_state(ex.unstack(p, "layers_N")), step=7),
        "nnx_wrapped": ex.save(root / "nnx_wrapped", ex.nnx_state(ex.unstack(p, "int_keys"))),
        "nnx_wrapped_scan": ex.save(root / "nnx_wrapped_scan", ex.nnx_state(p), zarr3=True),
        "nnx_pure": ex.save(root / "nnx_pure", ex.nnx_state(ex.unstack(p, "layers_N"), wrapped=False), ocdbt=False),
        "nnx_pure_intkeys": ex.save(root / "nnx_pure_intkeys", ex.nnx_state(ex.unstack(p, "int_keys"), wrapped=False), ocdbt=False, zarr3=True),
        "maxtext": ex.save(root / "maxtext", ex.maxtext_linen_compatible(p), step=7, zarr3=True),
        "decode_scan": ex.save(root / "decode_scan", ex.decode_params(p), step=0),
        "decode_unroll": ex.save(root / "decode_unroll", ex.decode_params(ex.unstack(p, "layers_N")), step=0),
    }


def restore_tree(path: str) -> Any:
    """Restore an orbax checkpoint item as nested dicts/lists of numpy arrays."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from pytest_ckptparity.sources import locate_item_folder

    item, _ = locate_item_folder(path)
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.restore(str(item))

    def to_numpy(x: Any) -> Any:
        if hasattr(x, "dtype") and "key<" in str(x.dtype):
            return np.asarray(jax.random.key_data(x))
        return np.array(x) if hasattr(x, "dtype") else x

    return jax.tree_util.tree_map(to_numpy, tree)


@pytest.fixture
def edited(tmp_path: Path) -> Callable[..., str]:
    """Restore a checkpoint with orbax, let `edit(tree)` change it, save it as a new one."""
    from pytest_ckptparity import examples as ex

    def make(src: str, edit: Callable[[Any], Any], name: str = "edited", **save_kw: Any) -> str:
        tree = restore_tree(src)
        tree = edit(tree) or tree
        return ex.save(tmp_path / name, tree, **save_kw)

    return make


@pytest.fixture
def copy_ckpt(tmp_path: Path) -> Callable[[str, str], Path]:
    """Copy a checkpoint folder so a test may damage it."""

    def make(src: str, name: str = "copy") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return make


@pytest.fixture(scope="session")
def demo_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The demo's checkpoints: Linen, the same model in NNX, and NNX with layer 1 drifted."""
    from pytest_ckptparity.examples import write_examples

    return write_examples(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def two_steps(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CheckpointManager root with committed steps 1 and 5 and an unfinished step 9."""
    import numpy as np

    from pytest_ckptparity import examples as ex

    root = tmp_path_factory.mktemp("steps") / "run"
    ex.save(root, {"params": {"w": np.full(3, 1.0, np.float32), "n": np.arange(3)}}, step=1)
    ex.save(root, {"params": {"w": np.full(3, 2.0, np.float32), "n": np.arange(3)}}, step=5)
    (root / "9.orbax-checkpoint-tmp-123").mkdir()
    return str(root)


# A sharded over 8 devices by rows, B by columns (orbax, 8 fake CPU devices in a child
# process, so this process's jax keeps its own device count): the two chunk grids cut the
# array on different axes, so their common block is the whole array and a budget smaller
# than it forces slabs that cut B's chunks. Two planted variants of B: a difference in the
# first and the last slab (`planted_ends`), one in the second slab, B's last column chunk
# (`planted_mid`).
MESH_WRITER = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pytest_ckptparity import examples as ex

root = sys.argv[1]
mesh = Mesh(np.array(jax.devices()), ("x",))
w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
ends, mid = w.copy(), w.copy()
ends[0, 0] += 1.0     # in the first slab
ends[63, 47] -= 1.0   # in the last slab
mid[9, 40] += 1.0     # in the second slab, the last column chunk of B
for name, value, spec in (("rows", w, P("x", None)), ("cols", w, P(None, "x")),
                          ("planted_ends", ends, P(None, "x")), ("planted_mid", mid, P(None, "x"))):
    ex.save(os.path.join(root, name), {"w": jax.device_put(value, NamedSharding(mesh, spec))}, step=0)
"""


@pytest.fixture(scope="session")
def two_meshes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One 64x48 float32 array written from two meshes (see MESH_WRITER), once per run."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("meshes")
    subprocess.run([sys.executable, "-c", MESH_WRITER, str(root)], check=True, capture_output=True, timeout=300)
    return {name: str(root / name) for name in ("rows", "cols", "planted_ends", "planted_mid")}


# A MaxText-like Linen TrainState (layers stacked on axis 1) written from an (fsdp=4,
# tensor=2) mesh (`a`) and from an 8-way tensor mesh (`b`): the mlp kernels' chunk grids
# then cut rows on one side and columns on the other. `b_planted` is `b` with one element
# of params' stacked wi_0 changed: layer 2, row 5, column 40 (stored at [5, 2, 40]);
# `b_noisy` is `b` with every float a little off (within float32's default tolerance);
# `a_zarr3` and `b_planted_zarr3` are the same written as zarr3 with sharding, chunks of 4 KiB.
STACK_MESH_WRITER = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pytest_ckptparity import examples as ex

root = sys.argv[1]
AXES = {"wi_0": ("fsdp", None, "tensor"), "wi_1": ("fsdp", None, "tensor"), "wo": ("tensor", None, "fsdp"),
        "query": ("fsdp", None, "tensor", None), "key": ("fsdp", None, "tensor", None),
        "value": ("fsdp", None, "tensor", None), "out": ("tensor", None, None, "fsdp")}
params = ex.tiny_params(0, layers=3, emb=64, heads=8, head_dim=4, mlp=128, vocab=64)
planted = ex._map(params, lambda x: x.copy())
planted["decoder"]["layers"]["mlp"]["wi_0"]["kernel"][5, 2, 40] += 1.0
rng = np.random.default_rng(1)  # a recomputed model: every float a little off, within float32's rtol
noisy = ex._map(params, lambda x: (x * (1 + rng.uniform(-1e-7, 1e-7, x.shape))).astype(x.dtype))
for name, tree, shape in (("a", params, (4, 2)), ("b", params, (1, 8)), ("b_planted", planted, (1, 8)), ("b_noisy", noisy, (1, 8))):
    mesh = Mesh(np.array(jax.devices()).reshape(shape), ("fsdp", "tensor"))
    def place(path, x):
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        x = np.asarray(x)
        axes = next((AXES[n] for n in reversed(names) if n in AXES), ())
        return jax.device_put(x, NamedSharding(mesh, P(*axes) if len(axes) == x.ndim else P()))
    state = jax.tree_util.tree_map_with_path(place, ex.linen_train_state(tree))
    ex.save(os.path.join(root, name), state, step=0)
    if name in ("a", "b_planted"):  # zarr3 as MaxText writes it: sharded, and chunks of at most 4 KiB in each shard
        ex.save(os.path.join(root, name + "_zarr3"), state, step=0, zarr3=True, chunk_byte_size=4096)
"""


@pytest.fixture(scope="session")
def stack_meshes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A layer-stacked TrainState written from two meshes (see STACK_MESH_WRITER), once per run."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("stack_meshes")
    subprocess.run([sys.executable, "-c", STACK_MESH_WRITER, str(root)], check=True, capture_output=True, timeout=300)
    return {name: str(root / name) for name in ("a", "b", "b_planted", "b_noisy", "a_zarr3", "b_planted_zarr3")}
