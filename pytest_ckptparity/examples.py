"""Small, real example checkpoints written with flax + orbax, in every layout we normalize.

Used by `ckptparity demo` and by the test suite. Values come from one seed, so the same model
can be written as a Linen TrainState (scanned or not), an NNX state (value-wrapped or pure
dict, layers stacked, as `layers_N` or as integer keys), a MaxText Linen-compatible NNX
state (with `nnx_aux`) or a bf16 decode checkpoint, and every pair must compare equal.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

LAYER_AXIS = 1  # MaxText param_scan_axis


def tiny_params(seed: int = 0, *, layers: int = 2, emb: int = 16, heads: int = 2, head_dim: int = 8, mlp: int = 32, vocab: int = 64) -> dict[str, Any]:
    """A llama-style decoder's weights with layers stacked on axis 1 (MaxText's scanned form)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    return {
        "decoder": {
            "decoder_norm": {"scale": np.ones((emb,), np.float32)},
            "layers": {
                "mlp": {"wi_0": {"kernel": w(emb, layers, mlp)}, "wi_1": {"kernel": w(emb, layers, mlp)}, "wo": {"kernel": w(mlp, layers, emb)}},
                "pre_self_attention_layer_norm": {"scale": w(emb, layers) + 1},
                "post_self_attention_layer_norm": {"scale": w(emb, layers) + 1},
                "self_attention": {
                    "query": {"kernel": w(emb, layers, heads, head_dim)},
                    "key": {"kernel": w(emb, layers, heads, head_dim)},
                    "value": {"kernel": w(emb, layers, heads, head_dim)},
                    "out": {"kernel": w(heads, layers, head_dim, emb)},
                },
            },
            "logits_dense": {"kernel": w(emb, vocab)},
        },
        "token_embedder": {"embedding": w(vocab, emb)},
    }


def _map(tree: Any, fn: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    return fn(tree)


def unstack(params: dict[str, Any], style: str = "layers_N", axis: int = LAYER_AXIS) -> dict[str, Any]:
    """Split `decoder/layers` into `layers_0, layers_1, ...` or `layers: {0: ..., 1: ...}`."""
    out = dict(params)
    decoder = dict(params["decoder"])
    stacked = decoder.pop("layers")
    n = next(iter(_leaves(stacked))).shape[axis]
    per_layer = [_map(stacked, lambda x, i=i: np.take(x, i, axis=axis)) for i in range(n)]
    if style == "layers_N":
        for i, p in enumerate(per_layer):
            decoder[f"layers_{i}"] = p
    elif style == "int_keys":
        decoder["layers"] = {i: p for i, p in enumerate(per_layer)}
    else:
        raise ValueError(f"style must be 'layers_N' or 'int_keys', got {style!r}")
    out["decoder"] = decoder
    return out


def _leaves(tree: Any) -> Any:
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def _adam_moments(params: dict[str, Any], seed: int) -> tuple[Any, Any]:
    """Non-trivial Adam moments (a real step-0 state has zeros, which would hide bugs).

    Derived from the weights element by element, so every layout of the same model gets the
    same moments at the same canonical positions.
    """
    mu = _map(params, lambda x: (x * np.float32(1e-3 * (seed + 1))).astype(np.float32))
    nu = _map(params, lambda x: (x * x * np.float32(1e-6)).astype(np.float32))
    return mu, nu


def linen_train_state(params: dict[str, Any], *, step: int = 7, seed: int = 0) -> Any:
    """A flax `TrainState` as MaxText's Linen trainer holds it (optax adam + schedule count)."""
    import jax.numpy as jnp
    import optax
    from flax.training import train_state

    tx = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(0.0), optax.scale_by_schedule(lambda c: -1e-3))
    state = train_state.TrainState.create(apply_fn=None, params={"params": params}, tx=tx)
    mu, nu = _adam_moments(params, seed)
    adam = state.opt_state[0]._replace(count=jnp.asarray(step, jnp.int32), mu={"params": mu}, nu={"params": nu})
    sched = state.opt_state[2]._replace(count=jnp.asarray(step, jnp.int32))
    return state.replace(step=jnp.asarray(step, jnp.int32), opt_state=(adam, state.opt_state[1], sched))


def nnx_state(params: dict[str, Any], *, step: int = 7, seed: int = 0, wrapped: bool = True, rngs: bool = True) -> Any:
    """An NNX `TrainStateNNX`-like state: `model/...`, `optimizer/step`, `optimizer/opt_state`.

    wrapped=True gives an `nnx.State` of Variables (saved as `.../value`); False its pure dict.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    mu, nu = _adam_moments(params, seed)
    model: dict[str, Any] = _map(params, lambda x: nnx.Param(jnp.asarray(x)))
    if rngs:
        model["decoder"] = dict(model["decoder"])
        model["decoder"]["rngs"] = {"dropout": {"key": nnx.RngKey(jax.random.key(seed)), "count": nnx.RngCount(jnp.asarray(3, jnp.uint32))}}
    opt = {
        0: {"count": nnx.OptState(jnp.asarray(step, jnp.int32)), "mu": _map(mu, lambda x: nnx.OptState(jnp.asarray(x))), "nu": _map(nu, lambda x: nnx.OptState(jnp.asarray(x)))},
        2: {"count": nnx.OptState(jnp.asarray(step, jnp.int32))},
    }
    state = nnx.State({"model": model, "optimizer": {"step": nnx.OptState(jnp.asarray(step, jnp.uint32)), "opt_state": opt}})
    return state if wrapped else state.to_pure_dict()


def maxtext_linen_compatible(params: dict[str, Any], *, step: int = 7, seed: int = 0) -> dict[str, Any]:
    """MaxText 0.2.5's NNX save: the Linen layout plus `nnx_aux/model/...` RNG state."""
    import jax.numpy as jnp

    state = linen_train_state(params, step=step, seed=seed)
    tree = {"params": state.params, "opt_state": state.opt_state, "step": state.step}
    tree["nnx_aux"] = {"model": {"decoder": {"rngs": {"dropout": {"count": jnp.asarray(0, jnp.uint32), "key": jnp.asarray([0, seed], jnp.uint32)}}}}}
    return tree


def restack(params: dict[str, Any], axis: int, from_axis: int = LAYER_AXIS) -> dict[str, Any]:
    """The same weights with `decoder/layers` stacked on another axis (NNX `nnx.vmap` stacks on 0)."""
    out = dict(params)
    decoder = dict(params["decoder"])
    decoder["layers"] = _map(decoder["layers"], lambda x: np.ascontiguousarray(np.moveaxis(x, from_axis, axis)))
    out["decoder"] = decoder
    return out


def nnx_converter_state(params: dict[str, Any], *, step: int = 7, seed: int = 0) -> dict[str, Any]:
    """What the Linen -> NNX converter proposed for MaxText writes: `model/...` wrapped
    (`.../value`), the optimizer plain: `optimizer/step`, `optimizer/opt_state/0/{count, mu, nu}`
    without wrappers and without a `params` level, `optimizer/opt_state/2/count`."""
    import jax.numpy as jnp
    from flax import nnx

    mu, nu = _adam_moments(params, seed)
    model = nnx.State(_map(params, lambda x: nnx.Param(jnp.asarray(x))))
    opt = {"0": {"count": np.asarray(step, np.int32), "mu": mu, "nu": nu}, "2": {"count": np.asarray(step, np.int32)}}
    return {"model": model, "optimizer": {"step": np.asarray(step, np.uint32), "opt_state": opt}}


def nnx_older_state(params: dict[str, Any], *, step: int = 7, seed: int = 0, with_optimizer: bool = False) -> dict[str, Any]:
    """Earlier NNX code: `{"params": <wrapped model>, "step"}`, or with `with_optimizer`
    `{"params": <model>, "optimizer": {"step", "opt_state"}}` (plain)."""
    import jax.numpy as jnp
    from flax import nnx

    if not with_optimizer:
        return {"params": nnx.State(_map(params, lambda x: nnx.Param(jnp.asarray(x)))), "step": np.asarray(step, np.int32)}
    mu, nu = _adam_moments(params, seed)
    opt = {"0": {"count": np.asarray(step, np.int32), "mu": mu, "nu": nu}, "2": {"count": np.asarray(step, np.int32)}}
    return {"params": params, "optimizer": {"step": np.asarray(step, np.uint32), "opt_state": opt}}


def nnx_module(params: dict[str, Any]) -> Any:
    """A real `nnx.Module` holding `params` as `nnx.Param`s: nested dicts become submodules,
    integer-keyed layers (`unstack(..., "int_keys")`) an `nnx.List` of modules."""
    import jax.numpy as jnp
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, tree: dict[Any, Any]) -> None:
            for key, value in tree.items():
                setattr(self, str(key), _as_module(value))

    def _as_module(value: Any) -> Any:
        if isinstance(value, dict) and value and all(isinstance(k, int) for k in value):
            return nnx.List([_as_module(value[i]) for i in range(len(value))])
        if isinstance(value, dict):
            return Block(value)
        return nnx.Param(jnp.asarray(value))

    return Block(params)


def save_nnx_model(path: str | os.PathLike, model: Any, *, pure: bool = False) -> str:
    """flax's documented save: `ocp.StandardCheckpointer().save(path, nnx.state(model))`
    (module attributes at the top, `.../value` leaves), or its `nnx.to_pure_dict` form."""
    import orbax.checkpoint as ocp
    from flax import nnx

    path = os.path.abspath(os.fspath(path))
    state = nnx.state(model)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, nnx.to_pure_dict(state) if pure else state)
    return path


def decode_params(params: dict[str, Any], *, wrapped: bool = True) -> dict[str, Any]:
    """A parameter-only decode checkpoint: bf16, `decoder/...` at the top, `.../value` leaves."""
    import ml_dtypes

    cast = _map(params, lambda x: x.astype(ml_dtypes.bfloat16))
    return _map(cast, lambda x: {"value": x}) if wrapped else cast


def save(
    path: str | os.PathLike, tree: Any, *, step: Optional[int] = None, ocdbt: bool = True, zarr3: bool = False,
    custom_metadata: Optional[dict] = None, chunk_byte_size: Optional[int] = None,
) -> str:
    """Write `tree` with orbax: a bare folder, or with `step` a CheckpointManager root.

    `chunk_byte_size` caps each stored chunk, as MaxText does with
    `checkpoint_storage_target_data_file_size_bytes`; by default orbax stores an array
    (a device's shard of it) as one chunk.
    """
    import jax
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt, use_zarr3=zarr3)
    save_args = None
    if chunk_byte_size is not None:
        save_args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=chunk_byte_size), tree)
    item = ocp.args.PyTreeSave(tree, save_args=save_args)
    if step is None:
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(path, args=item)
        return path
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True)
    with ocp.CheckpointManager(path, options=options, item_handlers={"items": handler}) as mgr:
        mgr.save(step, args=ocp.args.Composite(items=item), custom_metadata=custom_metadata or {})
        mgr.wait_until_finished()
    return path


def write_examples(root: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """The demo pair and a drifted copy: Linen scanned, NNX with `layers/N`, NNX with a change."""
    root = os.fspath(root)
    params = tiny_params(seed)
    linen = linen_train_state(params, seed=seed)
    nnx_same = nnx_state(unstack(params, "int_keys"), seed=seed)
    drifted = tiny_params(seed)
    drifted["decoder"]["layers"]["mlp"]["wi_0"]["kernel"][3, 1, 5] += 0.5  # layer 1, index (3, 5)
    nnx_drift = nnx_state(unstack(drifted, "int_keys"), seed=seed)
    return {
        "linen": save(os.path.join(root, "linen", "checkpoints"), linen, step=7),
        "nnx": save(os.path.join(root, "nnx", "checkpoints"), nnx_same, step=7),
        "nnx_drift": save(os.path.join(root, "nnx_drift", "checkpoints"), nnx_drift, step=7),
    }


DRIFTING_LEAF = "decoder/layers/mlp/wi_0/kernel"  # under `params/` in canonical paths


def write_drifting_runs(
    root: str | os.PathLike, *, steps: int = 4, drift_from: int = 2, layer: int = 1, seed: int = 0,
) -> dict[str, str]:
    """Three training runs of one model, each a CheckpointManager root with steps 0..steps-1:

    - `linen`: a Linen TrainState, layers scanned on axis 1;
    - `nnx`: the same weights at every step as an NNX state (pure dict, layers as integer keys);
    - `nnx_drift`: `nnx`, except that from step `drift_from` on, layer `layer` of
      `decoder/layers/mlp/wi_0/kernel` drifts, a little more at every step (+0.01 per step on
      its first 4 columns). Nothing else differs, the optimizer state included.

    Every weight moves from step to step (as training does), so a step compared against the
    wrong step of the other run fails.
    """
    root = os.fspath(root)
    base = tiny_params(seed)
    paths = {name: os.path.join(root, name, "checkpoints") for name in ("linen", "nnx", "nnx_drift")}
    for step in range(steps):
        params = _map(base, lambda x, s=step: (x * np.float32(1 + 0.01 * s)).astype(np.float32))
        save(paths["linen"], linen_train_state(params, step=step, seed=seed), step=step)
        tree = nnx_state(unstack(params, "int_keys"), step=step, seed=seed, wrapped=False)
        save(paths["nnx"], tree, step=step)
        if step >= drift_from:
            mlp = tree["model"]["decoder"]["layers"][layer]["mlp"]
            kernel = np.array(mlp["wi_0"]["kernel"])
            kernel[:, :4] += np.float32(0.01 * (step - drift_from + 1))
            mlp["wi_0"] = {"kernel": kernel}
        save(paths["nnx_drift"], tree, step=step)
    return paths
