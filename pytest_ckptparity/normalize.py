"""Layout detection and the rules that map every Linen/NNX layout onto one canonical form.

The canonical form has top-level groups `params`, `opt_state`, `step`, `rngs` (anything else
keeps its own name). One general rule set does the mapping, whatever layout wrote the tree:

1. user rename rules (regular expressions over the raw '/'-joined path), then detection,
   then the detected layout's own rename rules;
2. `value` wrappers are stripped per Variable: a trailing `value` key goes when it is the only
   child of its node (an NNX Variable saved as is), so any mix of wrapped and plain subtrees
   works and a weight really named `value` beside other keys survives;
3. a tree with none of the group keys at its top (`nnx.state(model)` saved as flax documents
   it, a pure dict, a decode checkpoint) holds module attributes: it is read as `params/...`;
   group rules: `params/params/X`, `params/X`, `model/X` -> `params/X`; NNX-only state
   (`nnx_aux/model/X`, any path through an `rngs` key) -> `rngs/X`; `optimizer/step` ->
   `step`; `optimizer/opt_state/i/...` -> `opt_state/i/...`; a `params` level right under
   an optimizer field (`mu/params/X`) is dropped;
4. layer rules: a stacked tensor (`layers`, `dense_layers`, ... on the scan axis), a
   `layers_N` family and a `layers/N` family all become one *layered* leaf whose canonical
   array has the layer on axis 0. Each leaf is decided on its own (never by its neighbours),
   and a layered leaf never matches a plain one (the diff reports a `layout` mismatch).
   Nothing is copied: reads are mapped onto the stored arrays.

Layouts (`Layout`) only name what was detected and may add rename/ignore rules; users can
register their own with `register_layout`. This module imports neither pytest nor orbax.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from pytest_ckptparity._model import ArrayInfo
from pytest_ckptparity._paths import KeyPath, any_match, path_str
from pytest_ckptparity.errors import CkptParityUsageError
from pytest_ckptparity.sources import Checkpoint, Pending

DEFAULT_SCAN_AXIS = 1  # MaxText's param_scan_axis: weights are stacked on axis 1
NON_PARAM_SCAN_AXIS = 0  # scanned NNX non-Param state (RNG counts and keys) stacks on axis 0

_STACK_NAME = re.compile(r"^[A-Za-z_]*layers(?:_[a-z]+)*$")
_FAMILY_MEMBER = re.compile(r"^(?P<stack>[A-Za-z_]*layers(?:_[a-z]+)*)_(?P<index>\d+)$")
_OPT_FIELDS_WITH_PARAMS_LEVEL = re.compile(r"^(mu|nu|trace|ema|.*moment.*|acc.*|v|m)$")
# Top-level keys that name a group of a training state. A tree with none of them at its top
# holds module attributes (a model's parameters), whatever wrote it.
GROUP_KEYS = frozenset({"params", "model", "opt_state", "optimizer", "step", "nnx_aux"})
WRAPPER_KEY = "value"


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeFacts:
    """What detection may look at: raw paths, their metadata, the checkpoint's custom metadata."""

    paths: tuple[KeyPath, ...]
    infos: Mapping[KeyPath, ArrayInfo]
    custom_metadata: Mapping[str, Any]

    @property
    def wrapped(self) -> bool:
        """Every leaf is an NNX Variable saved as is (`.../value`)."""
        return bool(self.paths) and all(p and p[-1] == WRAPPER_KEY for p in self.paths)

    def wrapped_under(self, head: str) -> Optional[bool]:
        """Whether the leaves under top-level `head` are wrapped: True, False, or None (a mix)."""
        under = [p for p in self.paths if p[:1] == (head,)]
        flags = {p[-1] == WRAPPER_KEY for p in under}
        return None if len(flags) != 1 else flags.pop()

    @property
    def top(self) -> frozenset[str]:
        return frozenset(p[0] for p in self.paths if p)

    @property
    def module_root(self) -> bool:
        """No group key at the top: the tree is a model's own attributes (`dense1/kernel`)."""
        return bool(self.top) and not (self.top & GROUP_KEYS) and all(self.paths)

    def has_prefix(self, *prefix: str) -> bool:
        n = len(prefix)
        return any(p[:n] == prefix for p in self.paths)


@dataclass(frozen=True)
class Layout:
    """A named checkpoint layout: how to recognise it and any extra rules it needs.

    `detect(facts)` decides from metadata alone. `rename` holds (regex, replacement) pairs
    applied with `re.sub` to the raw '/'-joined path before the general rules; `ignore`
    holds globs over canonical paths that are left out of the comparison (on both sides).
    """

    name: str
    label: str
    detect: Callable[[TreeFacts], bool] = lambda facts: False
    rename: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    canonical: bool = True  # False: no wrapper, group or layer rules (the tree as it is)


def _is_decode(f: TreeFacts) -> bool:
    return f.module_root and bool(f.top & {"decoder", "token_embedder"})


def _is_older_nnx(f: TreeFacts) -> bool:
    """`{"params": <wrapped model>, "step"}` or `{"params": <model>, "optimizer": {...}}`."""
    if "params" not in f.top or f.has_prefix("params", "params") or f.top & {"model", "opt_state", "nnx_aux"}:
        return False
    return "optimizer" in f.top or (f.wrapped_under("params") is True and "step" in f.top)


def _is_nnx(wrapped: bool) -> Callable[[TreeFacts], bool]:
    """`model/...` (and `optimizer/...`, if any) all wrapped, or all plain."""
    return lambda f: "model" in f.top and f.wrapped_under("model") is wrapped and (
        "optimizer" not in f.top or f.wrapped_under("optimizer") is wrapped)


BUILTIN_LAYOUTS: tuple[Layout, ...] = (
    Layout("maxtext_nnx", "MaxText Linen-compatible NNX state (with nnx_aux)", lambda f: "nnx_aux" in f.top),
    Layout("lora", "LoRA adapter tree", lambda f: any("lora" in k for p in f.paths for k in p) and not f.has_prefix("model")),
    Layout("nnx_params", "NNX state, older layout (params with step or optimizer)", _is_older_nnx),
    Layout("linen", "Linen TrainState", lambda f: f.has_prefix("params", "params") or ("params" in f.top and bool(f.top & {"opt_state", "step"}))),
    Layout("nnx_wrapped", "NNX state with value wrappers", _is_nnx(True)),
    Layout("nnx_pure", "NNX pure dict", _is_nnx(False)),
    Layout("nnx_mixed", "NNX state with value wrappers on some subtrees", lambda f: "model" in f.top),
    Layout("decode", "parameter-only decode checkpoint", _is_decode),
    Layout("nnx_module", "NNX model state (module attributes at the top, value wrappers)", lambda f: f.module_root and f.wrapped),
    Layout("module", "model parameters (module attributes at the top)", lambda f: f.module_root),
    Layout("params", "parameter tree", lambda f: "params" in f.top and not (f.top & (GROUP_KEYS - {"params"}))),
    Layout("generic", "generic tree (compared as it is)", lambda f: True, canonical=False),
)

_registry: list[Layout] = []


def register_layout(layout: Layout) -> Layout:
    """Add a layout; user layouts are tried before the built-in ones, newest first."""
    global _registry
    _registry = [layout] + [l for l in _registry if l.name != layout.name]
    return layout


def unregister_layout(name: str) -> None:
    global _registry
    _registry = [l for l in _registry if l.name != name]


def known_layouts() -> list[Layout]:
    return list(_registry) + list(BUILTIN_LAYOUTS)


def _resolve_layout(forced: Union[str, Layout, None], facts: TreeFacts, side: str) -> Layout:
    if isinstance(forced, Layout):
        return forced
    layouts = known_layouts()
    if forced:
        for layout in layouts:
            if layout.name == forced:
                return layout
        names = ", ".join(l.name for l in layouts)
        raise CkptParityUsageError(f"{side}: unknown layout '{forced}'; known layouts: {names} (or register one with register_layout).")
    for layout in layouts:
        if layout.detect(facts):
            return layout
    return BUILTIN_LAYOUTS[-1]


def _generic_reason(facts: TreeFacts, side: str) -> str:
    """Why no layout matched, and the ways out, for the report header."""
    top = ", ".join(sorted(facts.top)[:8]) + (", ..." if len(facts.top) > 8 else "") if facts.top else "none"
    groups = ", ".join(sorted(facts.top & GROUP_KEYS)) or "none"
    return (
        f"{side}: layout not recognised (top-level keys: {top}; group keys among them: {groups}, in no known "
        f"arrangement), so its paths are compared as they are; name a layout with format_a/format_b, map paths "
        f"with rename=[(pattern, replacement)], or register_layout(...)."
    )


# --------------------------------------------------------------------------------------
# Canonical leaves
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Storage:
    """Where a canonical leaf's data lives on its side."""

    raw: Optional[KeyPath] = None  # a plain or stacked array
    axis: Optional[int] = None  # stacked: the layer axis of `raw`
    per_layer: tuple[KeyPath, ...] = ()  # a family: one raw array per layer, in order
    family_style: str = ""  # "layers_N" or "layers/N"


@dataclass(frozen=True)
class LogicalLeaf:
    """One canonical leaf. A layered leaf's canonical array is (layers, *per-layer shape)."""

    path: str
    group: str
    shape: tuple[int, ...]
    dtype: str
    storage: Storage
    layers: Optional[int] = None
    chunk_shape: Optional[tuple[int, ...]] = None  # in canonical coordinates
    note: str = ""
    stack: str = ""  # layered leaves: the canonical path of their stack, e.g. params/decoder/layers
    stored: str = ""  # how the side stores it, for layout mismatches: "stacked on axis 1 of (16, 2, 32)"
    stack_agrees: bool = True  # False when the leaves of its stack disagree on the layer count

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.layers is not None else self.shape

    @property
    def raw_paths(self) -> tuple[KeyPath, ...]:
        return self.storage.per_layer or ((self.storage.raw,) if self.storage.raw else ())


@dataclass
class NormalizedView:
    """A checkpoint seen through the canonical form."""

    checkpoint: Checkpoint
    layout: Layout
    leaves: dict[str, LogicalLeaf]
    ignored: dict[str, LogicalLeaf] = field(default_factory=dict)
    layer_forms: tuple[str, ...] = ()
    display_name: str = ""  # the side's name in reports; defaults to the checkpoint's own
    notes: tuple[str, ...] = ()  # sentences for the report header (why generic, odd stacks)

    @property
    def name(self) -> str:
        return self.display_name or self.checkpoint.name

    def describe(self) -> str:
        parts = [self.layout.label]
        parts.extend(self.layer_forms)
        return ", ".join(parts)

    def read(self, leaf: LogicalLeaf, index: Optional[tuple[slice, ...]] = None) -> Pending:
        """Start reading `leaf[index]` in canonical coordinates (layer first when layered).

        The result is an array, or for a leaf stored one array per layer, the list of those
        layers' arrays (indexing either by layer gives the same thing).
        """
        st = leaf.storage
        if leaf.layers is None:
            return self.checkpoint.read(st.raw, index)
        index = index or tuple(slice(None) for _ in leaf.shape)
        layer_sel, rest = index[0], tuple(index[1:])
        if st.per_layer:
            # A list of per-layer arrays, not one stacked array: stacking would copy the block.
            pendings = [self.checkpoint.read(st.per_layer[i], rest) for i in range(*layer_sel.indices(leaf.layers))]
            return Pending(lambda: [p.result() for p in pendings], sum(p.nbytes for p in pendings))
        axis = st.axis
        stored_index = rest[:axis] + (layer_sel,) + rest[axis:]
        pending = self.checkpoint.read(st.raw, stored_index)

        def get() -> Any:
            import numpy as np

            return np.moveaxis(pending.result(), axis, 0)

        return Pending(get, pending.nbytes)


# --------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------


def _apply_renames(path: KeyPath, rules: Sequence[tuple[str, str]]) -> KeyPath:
    if not rules:
        return path
    text = path_str(path)
    for pattern, replacement in rules:
        text = re.sub(pattern, replacement, text)
    return tuple(k for k in text.split("/") if k != "")


def _opt_state(rest: KeyPath) -> KeyPath:
    """`<i>/<field>/params/X` -> `<i>/<field>/X`: Linen keeps a params level NNX does not."""
    if len(rest) >= 3 and rest[2] == "params" and _OPT_FIELDS_WITH_PARAMS_LEVEL.match(rest[1]):
        rest = rest[:2] + rest[3:]
    return ("opt_state",) + rest


def canonical_path(path: KeyPath) -> KeyPath:
    """Map one raw path (wrappers already stripped) onto the canonical groups."""
    if not path:
        return path
    head, rest = path[0], path[1:]
    if head == "nnx_aux":
        return ("rngs",) + (rest[1:] if rest[:1] == ("model",) else rest)
    if head in ("params", "model"):
        if head == "params" and rest[:1] == ("params",):
            rest = rest[1:]
        return (("rngs",) if "rngs" in rest else ("params",)) + rest
    if head == "optimizer":
        if rest[:1] == ("step",):
            return ("step",) + rest[1:]
        if rest[:1] == ("opt_state",):
            return _opt_state(rest[1:])
        return path
    if head == "opt_state":
        return _opt_state(rest)
    return path


def _layer_key(path: KeyPath) -> Optional[tuple[int, str, Optional[int], str]]:
    """Find the first layer-stack key: (position, stack name, layer index or None, style)."""
    for pos, key in enumerate(path[:-1] if len(path) > 1 else path):
        m = _FAMILY_MEMBER.match(key)
        if m:
            return pos, m.group("stack"), int(m.group("index")), "layers_N"
        if _STACK_NAME.match(key):
            nxt = path[pos + 1] if pos + 1 < len(path) else None
            if nxt is not None and nxt.isdigit():
                return pos, key, int(nxt), "layers/N"
            return pos, key, None, "stacked"
    return None


def _scan_axis(group: str, scan_axis: Optional[int], custom: Mapping[str, Any]) -> int:
    if group == "rngs":
        return NON_PARAM_SCAN_AXIS
    if scan_axis is not None:
        return scan_axis
    meta_axis = custom.get("param_scan_axis", custom.get("scan_axis"))
    return int(meta_axis) if isinstance(meta_axis, int) else DEFAULT_SCAN_AXIS


def _canonical_chunk(info: ArrayInfo, axis: Optional[int]) -> Optional[tuple[int, ...]]:
    if info.chunk_shape is None or axis is None:
        return info.chunk_shape
    c = list(info.chunk_shape)
    return (c.pop(axis),) + tuple(c)


def strip_wrappers(paths: Iterable[KeyPath]) -> dict[KeyPath, KeyPath]:
    """Drop a trailing `value` key where it is its node's only child: an NNX Variable saved as
    is. Decided per Variable, so wrapped and plain subtrees can mix in one tree (the converter
    wraps `model/` but not the optimizer), and a weight named `value` beside others survives."""
    paths = list(paths)
    children: dict[KeyPath, set[str]] = defaultdict(set)
    for p in paths:
        if len(p) >= 2:
            children[p[:-1]].add(p[-1])
    return {p: p[:-1] if len(p) >= 2 and p[-1] == WRAPPER_KEY and len(children[p[:-1]]) == 1 else p for p in paths}


def _stored(info: ArrayInfo, axis: Optional[int] = None) -> str:
    if axis is None:
        return f"a plain {info.dtype} {tuple(info.shape)} (no layer axis)"
    return f"{info.shape[axis]} layers stacked on axis {axis} of {info.dtype} {tuple(info.shape)}"


def normalize(
    ckpt: Checkpoint,
    *,
    layout: Union[str, Layout, None] = None,
    rename: Sequence[tuple[str, str]] = (),
    ignore: Sequence[str] = (),
    ignore_rngs: bool = True,
    scan_axis: Optional[int] = None,
) -> NormalizedView:
    """Detect `ckpt`'s layout and build its canonical view, from metadata alone."""
    infos = ckpt.leaves()
    # User renames come first, so a renamed tree is detected and normalized like any other.
    user_renamed = {raw: _apply_renames(raw, rename) for raw in infos}
    facts = TreeFacts(tuple(user_renamed.values()), {user_renamed[r]: i for r, i in infos.items()}, ckpt.custom_metadata)
    chosen = _resolve_layout(layout, facts, ckpt.name)
    renamed = {raw: _apply_renames(p, chosen.rename) for raw, p in user_renamed.items()}
    if not chosen.canonical:
        leaves = {path_str(p): LogicalLeaf(path_str(p), p[0] if p else "", infos[raw].shape, infos[raw].dtype, Storage(raw=raw), chunk_shape=infos[raw].chunk_shape, note=infos[raw].note, stored=_stored(infos[raw])) for raw, p in renamed.items()}
        kept = {p: l for p, l in sorted(leaves.items()) if not any_match(p, tuple(chosen.ignore) + tuple(ignore))}
        notes = (_generic_reason(facts, ckpt.name),) if layout is None and chosen is BUILTIN_LAYOUTS[-1] else ()
        return NormalizedView(ckpt, chosen, kept, {p: l for p, l in leaves.items() if p not in kept}, notes=notes)
    unwrapped = strip_wrappers(renamed.values())
    # Decided on the tree as the layout sees it: a group-less tree is a model's attributes.
    module_root = TreeFacts(tuple(renamed.values()), {}, {}).module_root
    scanned_allowed = ckpt.custom_metadata.get("scan_layers", True) is not False

    plain: dict[str, tuple[KeyPath, ArrayInfo, str]] = {}
    families: dict[str, dict[int, tuple[KeyPath, ArrayInfo]]] = defaultdict(dict)
    family_meta: dict[str, tuple[str, str]] = {}
    forms: set[str] = set()
    stack_of: dict[str, str] = {}
    leaves: dict[str, LogicalLeaf] = {}
    stack_counts: dict[tuple[str, int], set[int]] = defaultdict(set)
    stacked_dims: list[int] = []  # ndim of every leaf of a stacked layer group (a given scan_axis must fit one)

    def add_plain(cpath: str, raw: KeyPath, info: ArrayInfo, group: str) -> None:
        if cpath in plain:  # two raw leaves fold onto one canonical path: keep both visible
            cpath = f"{cpath}@{path_str(raw)}"
        plain[cpath] = (raw, info, group)

    for raw, info in infos.items():
        path = unwrapped[renamed[raw]]
        if module_root:
            path = ("params",) + path
        cpath = canonical_path(path)
        group = cpath[0] if cpath else ""
        found = _layer_key(cpath)
        if found is None:
            add_plain(path_str(cpath), raw, info, group)
            continue
        pos, stack, layer, style = found
        if style == "stacked":
            # Each leaf on its own: layered when it has the scan axis. Whether a leaf is layered
            # never depends on the other leaves of its stack.
            axis = _scan_axis(group, scan_axis, ckpt.custom_metadata)
            stacked_dims.append(len(info.shape))
            if not scanned_allowed or len(info.shape) <= axis:
                add_plain(path_str(cpath), raw, info, group)
                continue
            text, stack_path = path_str(cpath), path_str(cpath[: pos + 1])
            shape = list(info.shape)
            n_layers = shape.pop(axis)
            stack_counts[(stack_path, axis)].add(n_layers)
            if group != "rngs":
                forms.add(f"scanned on axis {axis}")
            leaves[text] = LogicalLeaf(
                text, group, (n_layers, *shape), info.dtype, Storage(raw=raw, axis=axis),
                layers=n_layers, chunk_shape=_canonical_chunk(info, axis), note=info.note, stack=stack_path,
                stored=_stored(info, axis),
            )
            continue
        drop = 2 if style == "layers/N" else 1
        folded = path_str(cpath[:pos] + (stack,) + cpath[pos + drop :])
        families[folded][layer] = (raw, info)
        stack_of[folded] = path_str(cpath[:pos] + (stack,))
        family_meta[folded] = (group, style)

    if scan_axis is not None and scanned_allowed and stacked_dims and max(stacked_dims) <= scan_axis:
        raise CkptParityUsageError(
            f"{ckpt.name}: scan_axis {scan_axis} is beyond every array of the layer stacks of '{ckpt.location}' (they have at most "
            f"{max(stacked_dims)} axes, numbered from 0); MaxText's Linen checkpoints stack layers on axis 1, NNX ones on axis 0.")

    # Families: layered when layers 0..L-1 are all there with one shape and dtype.
    for cpath, members in families.items():
        group, style = family_meta[cpath]
        ordered = [members.get(i) for i in range(len(members))]
        kinds = {(m[1].shape, m[1].dtype) for m in ordered if m is not None}
        if any(m is None for m in ordered) or len(kinds) != 1:
            for raw, info in members.values():
                p = unwrapped[renamed[raw]]
                add_plain(path_str(canonical_path(("params",) + p if module_root else p)), raw, info, group)
            continue
        info0 = ordered[0][1]
        forms.add("layers as layers_N" if style == "layers_N" else "layers as integer keys")
        leaves[cpath] = LogicalLeaf(
            cpath, group, (len(ordered), *info0.shape), info0.dtype,
            Storage(per_layer=tuple(m[0] for m in ordered), family_style=style),
            layers=len(ordered),
            chunk_shape=(1, *info0.chunk_shape) if info0.chunk_shape is not None else None,
            note=info0.note, stack=stack_of[cpath],
            stored=f"{len(ordered)} layers stored apart ({style}), each {info0.dtype} {tuple(info0.shape)}",
        )

    for cpath, (raw, info, group) in plain.items():
        leaves[cpath] = LogicalLeaf(cpath, group, info.shape, info.dtype, Storage(raw=raw), chunk_shape=info.chunk_shape, note=info.note, stored=_stored(info))

    odd = sorted((stack, axis) for (stack, axis), counts in stack_counts.items() if len(counts) > 1 and not stack.startswith("rngs"))
    odd_stacks = {stack for stack, _ in odd}
    for p, leaf in leaves.items():
        if leaf.storage.axis is not None and leaf.stack in odd_stacks:
            leaves[p] = replace(leaf, stack_agrees=False)
    ignore_globs = tuple(chosen.ignore) + tuple(ignore) + (("rngs",) if ignore_rngs else ())
    kept = {p: l for p, l in sorted(leaves.items()) if not any_match(p, ignore_globs)}
    dropped = {p: l for p, l in sorted(leaves.items()) if p not in kept}
    notes: tuple[str, ...] = ()
    if odd:
        listed = ", ".join(stack for stack, _ in odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
        axes = ", ".join(sorted({str(axis) for _, axis in odd}))
        notes = (f"{ckpt.name}: the leaves of {listed} disagree on their layer count along axis {axes}; "
                 f"if layers are stacked on another axis, pass scan_axis.",)
    if not forms:
        forms.add("no layer stacks")
    return NormalizedView(ckpt, chosen, kept, dropped, tuple(sorted(f for f in forms if f)), notes=notes)


__all__: Iterable[str] = (
    "Layout", "LogicalLeaf", "NormalizedView", "TreeFacts", "BUILTIN_LAYOUTS",
    "register_layout", "unregister_layout", "known_layouts", "normalize", "canonical_path", "strip_wrappers", "GROUP_KEYS",
)
