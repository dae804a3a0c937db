"""Open a checkpoint lazily: metadata first, array data only on demand.

Two kinds of source, one interface (`Checkpoint`):

- `OrbaxCheckpoint` reads an orbax folder directly: the tree from orbax's `_METADATA` JSON,
  shapes/dtypes/chunks from each array's zarr metadata, data through tensorstore. It never
  imports jax or orbax (about 1.4 s of import here) and never opens anything for writing.
  Every file and listing goes through a `storage.Storage`, so a local folder, `gs://` and
  `s3://` take the same way.
- `InMemoryCheckpoint` wraps a live tree (dicts, lists, TrainState, nnx.State, nnx.Module,
  jax/numpy arrays). jax is imported only when the tree holds jax or flax objects.

Paths are tuples of str keys exactly as orbax names them; the normalizer maps them further.
Nothing here is loaded with pickle or msgpack: both can run code, so such files are refused.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from pytest_ckptparity._model import ArrayInfo
from pytest_ckptparity._threads import tensorstore_context
from pytest_ckptparity._paths import KeyPath, path_str
from pytest_ckptparity.errors import CkptParityUsageError
from pytest_ckptparity.storage import Storage, StorageError, explain, open_storage
from pytest_ckptparity.zarr_rows import MISSING, ChunkRows, NotStreamable, RowFormat, row_format

_TMP_MARK = ".orbax-checkpoint-tmp"
_STEP_NAME = re.compile(r"^(?:.*_)?(\d+)$")
_CODE_RUNNING_SUFFIXES = (".pkl", ".pickle", ".msgpack", ".npz", ".pt", ".pth", ".bin", ".joblib")
_ITEM_PREFERENCE = ("items", "state", "default", "params")
_EXPECTED = (
    "an orbax checkpoint folder (a CheckpointManager root, a step folder, an item folder "
    "such as <step>/items, or a folder written by PyTreeCheckpointer().save)"
)


class Pending:
    """A read in flight. `result()` gives the numpy array; `nbytes` is known up front."""

    __slots__ = ("_get", "nbytes")

    def __init__(self, get: Callable[[], Any], nbytes: int) -> None:
        self._get = get
        self.nbytes = nbytes

    def result(self) -> Any:
        return self._get()


class Checkpoint:
    """One side of a comparison: a tree of leaves with metadata, read lazily."""

    name: str = "A"
    location: str = "<tree>"
    custom_metadata: Mapping[str, Any] = {}
    step: Optional[int] = None  # the step opened in a CheckpointManager root (or step folder)
    uncommitted_newer: tuple[int, ...] = ()  # newer steps of that root that are not committed

    def leaves(self) -> dict[KeyPath, ArrayInfo]:
        """Every leaf's path and metadata, without reading array data."""
        raise NotImplementedError

    def read(self, path: KeyPath, index: Optional[tuple] = None) -> Pending:
        """Start reading one leaf, or the slice `index` of it."""
        raise NotImplementedError

    def chunk_layout(self, path: KeyPath) -> Optional["ChunkLayout"]:
        """How the leaf is stored (chunk grid and encoding), when its stored chunk bytes can be
        compared (`stored_chunk`); None means compare decoded values only."""
        return None

    def row_format(self, path: KeyPath) -> Optional["RowFormat"]:
        """How the leaf's stored chunks decode from the front (`zarr_rows`), when they can;
        None means read it through `read`."""
        return None

    def chunk_rows(self, path: KeyPath, coords: tuple[int, ...], fmt: "RowFormat") -> "ChunkRows":
        raise NotImplementedError

    def with_name(self, name: str) -> "Checkpoint":
        self.name = name
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {self.location}>"


# --------------------------------------------------------------------------------------
# Finding the item folder
# --------------------------------------------------------------------------------------


def _usage(side: str, path: Any, what: str) -> CkptParityUsageError:
    """`A: ...` when there are two sides; a command that reads one checkpoint (inspect,
    fingerprint) names it "checkpoint", which the sentence already says."""
    return CkptParityUsageError(what if side == "checkpoint" else f"{side}: {what}", path=path)


def _is_committed_step(d: Storage) -> bool:
    return _TMP_MARK not in d.name and d.exists("commit_success.txt")


def _list_dir(side: str, p: Storage) -> list[tuple[str, bool]]:
    try:
        return p.list()
    except StorageError as e:
        raise _usage(side, p, str(e)) from None


def _item_subfolder(side: str, step_dir: Storage) -> Optional[Storage]:
    # The usual item names are probed first: on an object store that avoids listing a step.
    for preferred in _ITEM_PREFERENCE:
        if step_dir.exists(f"{preferred}/_METADATA"):
            return step_dir.child(preferred)
    items = [step_dir.child(n) for n, is_folder in _list_dir(side, step_dir) if is_folder and step_dir.exists(f"{n}/_METADATA")]
    if not items:
        return None
    if len(items) == 1:
        return items[0]
    names = ", ".join(c.name for c in items)
    raise _usage(side, step_dir, f"step folder '{step_dir}' holds several items ({names}); point at the one to compare, e.g. '{items[0]}'.")


def _refuse_if_code_file(side: str, p: Storage) -> None:
    if os.path.splitext(p.name)[1].lower() in _CODE_RUNNING_SUFFIXES or p.name == "checkpoint":
        raise _usage(
            side, p,
            f"refusing '{p}': pickle, msgpack and similar files can run code or are not orbax "
            f"checkpoints, and are never loaded; pass {_EXPECTED}.",
        )


def _steps(side: str, root: Storage) -> tuple[dict[int, Storage], list[Storage]]:
    committed: dict[int, Storage] = {}
    unfinished: list[Storage] = []
    for name, is_folder in _list_dir(side, root):
        if not is_folder:
            continue
        c = root.child(name)
        if _TMP_MARK in name:
            unfinished.append(c)
            continue
        m = _STEP_NAME.match(name)
        if not m:
            continue
        if _is_committed_step(c):
            committed[int(m.group(1))] = c
        elif c.exists("_CHECKPOINT_METADATA") or _item_subfolder(side, c):
            unfinished.append(c)
    return committed, unfinished


def locate_item_folder(
    path: os.PathLike | str | Storage, *, step: Optional[int] = None, side: str = "A", storage_options: Optional[Mapping[str, Any]] = None,
) -> tuple[Storage, Optional[Storage]]:
    """Resolve what a user pointed at to (item folder, step folder or None).

    Local folders come back as `LocalStorage` (usable wherever a path is: `os.fspath`, `str`).
    """
    try:
        where = path if isinstance(path, Storage) else open_storage(path, storage_options)
        return _locate(where, step, side)
    except StorageError as e:
        raise _usage(side, path, str(e)) from None
    except PermissionError as e:  # Path.exists() and friends raise it on an unreadable parent
        where = e.filename or path
        raise _usage(side, path, f"permission denied reading '{where}'; make the checkpoint and its parent folders readable for this user.") from None


def _locate(p: Storage, step: Optional[int], side: str) -> tuple[Storage, Optional[Storage]]:
    kind = p.kind()
    if kind == "missing":
        raise _usage(side, p, f"checkpoint path '{p}' does not exist; pass {_EXPECTED}.")
    if kind == "file":
        _refuse_if_code_file(side, p)
        raise _usage(side, p, f"'{p}' is a file, not a checkpoint folder; pass {_EXPECTED}.")

    if _TMP_MARK in p.name:
        raise _usage(side, p, f"'{p}' is an unfinished orbax checkpoint (a temporary folder still being written); wait for the save to finish or pick a committed step.")

    if p.exists("_METADATA"):
        parent = p.parent
        step_dir = parent if parent.exists("_CHECKPOINT_METADATA") else None
        if step is not None:
            raise _usage(side, p, f"step={step} was given but '{p}' is a single checkpoint, not a CheckpointManager root; drop the step or point at the root.")
        marked = p.exists("commit_success.txt") or (step_dir is not None and step_dir.exists("commit_success.txt"))
        if not marked:
            raise _usage(side, p, f"'{p}' is an unfinished orbax checkpoint (no commit_success.txt); wait for the save to finish or pick a committed step.")
        return p, step_dir

    item = _item_subfolder(side, p) if p.exists("_CHECKPOINT_METADATA") else None
    if item is not None:
        if step is not None:
            raise _usage(side, p, f"step={step} was given but '{p}' is a step folder; point at the CheckpointManager root to choose a step.")
        if not p.exists("commit_success.txt"):
            raise _usage(side, p, f"'{p}' is an unfinished orbax checkpoint (no commit_success.txt); wait for the save to finish or pick a committed step.")
        return item, p

    committed, unfinished = _steps(side, p)
    if committed:
        if step is None:
            step = max(committed)
        if step not in committed:
            listed = ", ".join(str(s) for s in sorted(committed))
            raise _usage(side, p, f"step {step} is not a committed step of '{p}' (committed steps: {listed}); pass one of those.")
        step_dir = committed[step]
        item = _item_subfolder(side, step_dir)
        if item is None:
            raise _usage(side, step_dir, f"step folder '{step_dir}' holds no item folder with _METADATA; the checkpoint is incomplete or damaged.")
        return item, step_dir
    if unfinished:
        names = ", ".join(u.name for u in unfinished[:3])
        raise _usage(side, p, f"'{p}' holds no committed step (only unfinished ones: {names}); wait for a save to finish.")

    children = _list_dir(side, p)
    for name, is_folder in children:
        if not is_folder:
            _refuse_if_code_file(side, p.child(name))
    if not children:
        raise _usage(side, p, f"'{p}' is an empty folder; pass {_EXPECTED}.")
    raise _usage(side, p, f"'{p}' is not an orbax checkpoint (no _METADATA, step folders or items found); pass {_EXPECTED}.")


def manager_steps(
    path: os.PathLike | str | Storage, *, side: str = "A", storage_options: Optional[Mapping[str, Any]] = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(committed, uncommitted) step numbers of a CheckpointManager root, each sorted.

    Only a committed step (`commit_success.txt`, not a temporary folder) is ever compared;
    the uncommitted ones are returned so callers can say why a step is left out. Anything
    but a manager root (a step folder, a single checkpoint, a file, a missing path) is refused
    in one sentence. Local folders, `gs://` and `s3://` take the same way (one listing).
    """
    try:
        root = path if isinstance(path, Storage) else open_storage(path, storage_options)
        kind = root.kind()
        if kind != "folder" or _TMP_MARK in root.name:
            _locate(root, None, side)  # raises the sentence for a missing path, a file or a temp folder
        if root.exists("_METADATA") or root.exists("_CHECKPOINT_METADATA"):
            what = "a single checkpoint" if root.exists("_METADATA") else "a step folder"
            up = root.parent
            if root.exists("_METADATA") and _STEP_NAME.match(up.name):  # an item inside a step folder
                up = up.parent
            raise _usage(side, root, f"'{root}' is {what}, not a CheckpointManager root; comparing over steps needs the folder that holds the step folders (e.g. '{up}').")
        committed, unfinished = _steps(side, root)
        if not committed:
            _locate(root, None, side)  # no committed step: the sentence says what the folder holds
        pending = set()
        for u in unfinished:
            m = _STEP_NAME.match(u.name.split(_TMP_MARK)[0].rstrip("."))
            if m and int(m.group(1)) not in committed:
                pending.add(int(m.group(1)))
        return tuple(sorted(committed)), tuple(sorted(pending))
    except StorageError as e:
        raise _usage(side, path, str(e)) from None
    except PermissionError as e:
        where = e.filename or path
        raise _usage(side, path, f"permission denied reading '{where}'; make the checkpoint and its parent folders readable for this user.") from None


def _step_number(step_dir: Optional[Storage]) -> Optional[int]:
    m = _STEP_NAME.match(step_dir.name) if step_dir is not None else None
    return int(m.group(1)) if m else None


def _uncommitted_newer(side: str, root: Storage, step: Optional[int]) -> tuple[int, ...]:
    """Steps of a manager root newer than the opened one that are not committed (yet)."""
    if step is None or root.kind() != "folder" or root.exists("_METADATA") or root.exists("_CHECKPOINT_METADATA"):
        return ()
    _, unfinished = _steps(side, root)
    newer = set()
    for u in unfinished:
        m = _STEP_NAME.match(u.name.split(_TMP_MARK)[0].rstrip("."))
        if m and int(m.group(1)) > step:
            newer.add(int(m.group(1)))
    return tuple(sorted(newer))


# --------------------------------------------------------------------------------------
# Orbax folders
# --------------------------------------------------------------------------------------


def _read_json(side: str, folder: Storage, key: str, what: str) -> Any:
    """The JSON file `key` of `folder`, or None when it does not exist."""
    f = folder.child(key)
    try:
        data = folder.read(key)
        return None if data is None else json.loads(data)
    except StorageError as e:
        raise _usage(side, f, str(e)) from None
    except PermissionError:
        raise _usage(side, f, f"permission denied reading '{f}'; make it readable for this user.") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise _usage(side, f, f"'{f}' is not valid {what} ({type(e).__name__}); the checkpoint is damaged: re-save it or pick another step.") from None


def _parse_tree_metadata(side: str, meta_file: Storage, meta: Any) -> list[tuple[KeyPath, str]]:
    """(path, value_type) for every stored leaf, from orbax's `_METADATA`."""
    try:
        tree = meta["tree_metadata"]
        out = []
        for entry in tree.values():
            vm = entry["value_metadata"]
            if vm.get("skip_deserialize"):
                continue  # None, empty dict or list: nothing stored
            keys = tuple(str(k["key"]) for k in entry["key_metadata"])
            out.append((keys, str(vm.get("value_type", ""))))
        return out
    except (KeyError, TypeError, AttributeError):
        raise _usage(side, meta_file, f"'{meta_file}' is not orbax tree metadata this tool understands (no tree_metadata entries); re-save the checkpoint with orbax-checkpoint >= 0.5.") from None


def _open_failure(err: BaseException, param: str, item: Storage) -> str:
    """Why an array listed in _METADATA could not be opened: missing data, or the store itself."""
    text = str(err)
    if any(s in text for s in ("CURL error", "retry attempts failed", "PERMISSION_DENIED", "UNAUTHENTICATED", "NoSuchBucket")):
        return f"array '{param}' in '{item}': {explain(err, str(item))}"
    missing = "NOT_FOUND" in text or "does not exist" in text
    what = "has no data" if missing else f"cannot be opened ({_short(err)})"
    return f"array '{param}' listed in '{item.child('_METADATA')}' {what}; the checkpoint is incomplete or damaged: re-save it or pick another step."


def _short(err: BaseException) -> str:
    text = str(err).split("[tensorstore_spec", 1)[0].strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


class OrbaxCheckpoint(Checkpoint):
    """An orbax item folder, read through tensorstore only."""

    def __init__(
        self, path: os.PathLike | str, *, step: Optional[int] = None, name: str = "A", storage_options: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.name = name
        try:
            self.requested = open_storage(path, storage_options)
        except StorageError as e:
            raise _usage(name, path, str(e)) from None
        self.item_dir, self.step_dir = locate_item_folder(self.requested, step=step, side=name)
        self.location = str(self.item_dir)
        self.step = _step_number(self.step_dir)
        try:
            self.uncommitted_newer = _uncommitted_newer(name, self.requested, self.step)
        except StorageError as e:
            raise _usage(name, self.requested, str(e)) from None
        meta_file = self.item_dir.child("_METADATA")
        meta = _read_json(name, self.item_dir, "_METADATA", "orbax metadata (_METADATA)")
        if not isinstance(meta, dict):
            raise _usage(name, meta_file, f"'{meta_file}' is not orbax tree metadata; the checkpoint is damaged: re-save it or pick another step.")
        self._entries = _parse_tree_metadata(name, meta_file, meta)
        self.use_ocdbt = bool(meta.get("use_ocdbt", True))
        self.use_zarr3 = bool(meta.get("use_zarr3", False))
        custom: dict[str, Any] = {}
        if self.step_dir is not None:
            step_meta = _read_json(name, self.step_dir, "_CHECKPOINT_METADATA", "orbax step metadata")
            custom.update((step_meta or {}).get("custom_metadata") or {})
        custom.update(meta.get("custom_metadata") or {})
        self.custom_metadata = custom
        self._infos: Optional[dict[KeyPath, ArrayInfo]] = None
        self._arrays: dict[KeyPath, Any] = {}
        self._strings: Optional[dict[str, str]] = None
        self._context: Any = None

    # -- metadata ----------------------------------------------------------------------
    def _spec(self, param: str) -> dict[str, Any]:
        if self.use_ocdbt:
            kv: dict[str, Any] = {"driver": "ocdbt", "base": self.item_dir.kvstore_spec(), "path": param}
        else:
            kv = self.item_dir.kvstore_spec(param)
        return {"driver": "zarr3" if self.use_zarr3 else "zarr", "kvstore": kv, "recheck_cached_data": False, "recheck_cached_metadata": False}

    def _key_notes(self) -> dict[str, str]:
        """PRNG key impls recorded by orbax in array_metadatas (typed keys are saved as key data)."""
        notes: dict[str, str] = {}
        folder = self.item_dir.child("array_metadatas")
        try:
            names = [n for n, is_folder in folder.list() if not is_folder]  # a missing folder lists nothing (remote) or raises (local)
        except StorageError:
            return notes  # optional metadata: an unreadable folder only loses the notes
        for n in names:
            try:
                data = json.loads(folder.read(n) or b"{}")
                for entry in data.get("array_metadatas", []):
                    am = entry.get("array_metadata", {})
                    impl = (am.get("ext_metadata") or {}).get("random_key_impl")
                    if impl:
                        notes[am.get("param_name", "")] = f"PRNG key data ({impl})"
            except (OSError, ValueError, AttributeError, StorageError):
                continue  # optional metadata: a damaged file only loses the note
        return notes

    def leaves(self) -> dict[KeyPath, ArrayInfo]:
        if self._infos is not None:
            return self._infos
        import tensorstore as ts

        self._context = ts.Context({**self.item_dir.context_spec(), **tensorstore_context(), "cache_pool": {"total_bytes_limit": 0}})
        key_notes = self._key_notes()
        opening = []
        infos: dict[KeyPath, ArrayInfo] = {}
        for keys, value_type in self._entries:
            if value_type == "string":
                infos[keys] = ArrayInfo(shape=(), dtype="str")
                continue
            param = ".".join(keys)
            fut = ts.open(self._spec(param), open=True, read=True, context=self._context)
            opening.append((keys, param, fut))
        for keys, param, fut in opening:
            try:
                arr = fut.result(timeout=self.item_dir.timeout)
            except TimeoutError:
                raise _usage(self.name, self.item_dir, f"array '{param}' in '{self.item_dir}' did not open within {self.item_dir.timeout:g} s; check the endpoint and the network (storage option timeout=SECONDS).") from None
            except Exception as e:  # tensorstore raises ValueError with a status text
                raise _usage(self.name, self.item_dir, _open_failure(e, param, self.item_dir)) from None
            self._arrays[keys] = arr
            chunk = arr.chunk_layout.read_chunk.shape
            infos[keys] = ArrayInfo(
                shape=tuple(int(d) for d in arr.shape),
                dtype=arr.dtype.numpy_dtype.name,
                chunk_shape=tuple(int(d) for d in chunk) if chunk is not None else None,
                note=key_notes.get(param, ""),
            )
        self._infos = dict(sorted(infos.items()))
        return self._infos

    # -- data --------------------------------------------------------------------------
    def _string(self, keys: KeyPath) -> str:
        if self._strings is None:
            self._strings = _read_json(self.name, self.item_dir, "_strings.json", "orbax string storage (_strings.json)") or {}
        name = ".".join(keys)
        if name not in self._strings:
            raise _usage(self.name, self.item_dir, f"string leaf '{name}' listed in _METADATA is missing from _strings.json; the checkpoint is damaged.")
        return self._strings[name]

    def read(self, path: KeyPath, index: Optional[tuple] = None) -> Pending:
        info = self.leaves()[path]
        if info.dtype == "str":
            value = self._string(path)
            return Pending(lambda: value, len(value))
        arr = self._arrays[path]
        view = arr[index] if index else arr
        nbytes = int(view.dtype.numpy_dtype.itemsize)
        for d in view.shape:
            nbytes *= int(d)
        fut = view.read()
        side, item, param = self.name, self.item_dir, ".".join(path)

        def get() -> Any:
            try:
                return fut.result()
            except Exception as e:
                raise _usage(side, item, f"could not read array '{param}' from '{item}' ({_short(e)}); its data is truncated or corrupt: re-save the checkpoint or pick another step.") from None

        return Pending(get, nbytes)

    # -- stored chunk bytes (compared before decoding when both sides store a leaf alike) --
    def _kvstore(self) -> Any:
        """The item's key-value store (OCDBT or plain files), opened once, read only."""
        if getattr(self, "_kv", None) is None:
            import tensorstore as ts

            base = self.item_dir.kvstore_spec()
            spec = {"driver": "ocdbt", "base": base} if self.use_ocdbt else base
            context = ts.Context({**self.item_dir.context_spec(), **tensorstore_context(), "cache_pool": {"total_bytes_limit": 0}})
            self._kv = ts.KvStore.open(spec, context=context).result()
        return self._kv

    def chunk_layout(self, path: KeyPath) -> Optional[ChunkLayout]:
        """How a leaf is stored: its chunk grid and the rest of its zarr metadata (dtype,
        shape, codecs, fill value, key encoding). Two arrays with equal layouts encode equal
        values the same way, so equal stored chunk bytes mean equal values. None for strings
        or metadata this method does not understand (the caller then compares values).
        Worked out once per leaf: a leaf read in step asks for it for every chunk."""
        cache = self.__dict__.setdefault("_layouts", {})
        if path not in cache:
            cache[path] = self._chunk_layout(path)
        return cache[path]

    def _chunk_layout(self, path: KeyPath) -> Optional[ChunkLayout]:
        if self.leaves()[path].dtype == "str":
            return None
        try:
            meta = dict(self._zarr_meta(path))
            if self.use_zarr3:
                grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
                encoding = meta.get("chunk_key_encoding") or {"name": "default"}
                style = encoding.get("name", "default")
                sep = (encoding.get("configuration") or {}).get("separator", "/" if style == "default" else ".")
                prefix = "c" if style == "default" else ""
            else:
                grid, sep, prefix = meta["chunks"], meta.get("dimension_separator") or ".", ""
            meta.pop("attributes", None)  # free-form user attributes do not change the encoding
            meta.pop("dimension_names", None)
            return ChunkLayout(tuple(int(c) for c in grid), json.dumps(meta, sort_keys=True), sep, prefix)
        except Exception:  # noqa: BLE001 - an unexpected layout only loses the shortcut
            return None

    def _zarr_meta(self, path: KeyPath) -> dict:
        """The leaf's zarr metadata (`.zarray` or `zarr.json`), read once."""
        cache = self.__dict__.setdefault("_metas", {})
        if path not in cache:
            name = "zarr.json" if self.use_zarr3 else ".zarray"
            cache[path] = json.loads(self._kvstore().read(f"{'.'.join(path)}/{name}").result().value)
        return cache[path]

    def row_format(self, path: KeyPath) -> Optional[RowFormat]:
        if self.leaves()[path].dtype == "str":
            return None
        try:
            return row_format(self._zarr_meta(path))
        except Exception:  # noqa: BLE001 - unreadable metadata only loses streaming; reads will say why
            return None

    def chunk_rows(self, path: KeyPath, coords: tuple[int, ...], fmt: RowFormat) -> ChunkRows:
        """The rows of one stored chunk, decoded from the front as they are asked for."""
        param = ".".join(path)
        layout = self.chunk_layout(path)
        if layout is None:
            raise NotStreamable(f"array '{param}': its chunk keys are not known")
        kv = self._kvstore()
        if fmt.shards is not None:
            return self._sharded_chunk_rows(param, layout, coords, fmt)
        key = layout.key(param, coords)

        def fetch(start: int, stop: Optional[int]) -> Pending:
            try:
                fut = kv.read(key, byte_range=slice(start, stop))
            except Exception as e:  # noqa: BLE001 - tensorstore's read of the leaf will say what is wrong
                raise NotStreamable(f"chunk '{key}': {_short(e)}") from None

            def get() -> Optional[bytes]:
                try:
                    r = fut.result()
                except Exception as e:  # noqa: BLE001
                    if "OUT_OF_RANGE" not in str(e) or stop is None:
                        raise NotStreamable(f"chunk '{key}': {_short(e)}") from None
                    try:  # the last piece: what is left of the value
                        r = kv.read(key, byte_range=slice(start, None)).result()
                    except Exception as e2:  # noqa: BLE001
                        raise NotStreamable(f"chunk '{key}': {_short(e2)}") from None
                return bytes(r.value) if r.state == "value" else None

            return Pending(get, 0)

        return ChunkRows(fmt, fetch, f"chunk '{key}' of '{self.item_dir}'")

    def _sharded_chunk_rows(self, param: str, layout: ChunkLayout, coords: tuple[int, ...], fmt: RowFormat) -> ChunkRows:
        """A chunk of a sharded zarr3 array: its byte range in the shard, from the shard's index."""
        assert fmt.shards is not None
        shards, kv = fmt.shards, self._kvstore()
        shard, inner = shards.locate(coords)
        key = layout.key(param, shard)
        what = f"chunk {inner} of shard '{key}' of '{self.item_dir}'"
        indexes = self.__dict__.setdefault("_shard_indexes", {})
        if key not in indexes:
            if len(indexes) >= 4096:  # a few shards' worth, for the chunks of one region
                indexes.clear()
            try:
                indexes[key] = kv.read(key, byte_range=slice(-shards.index_bytes, None) if shards.index_at_end else slice(0, shards.index_bytes)).result()
            except Exception as e:  # noqa: BLE001 - tensorstore's read of the leaf will say what is wrong
                raise NotStreamable(f"{what}: {_short(e)}") from None
        r = indexes[key]
        if r.state != "value":
            return ChunkRows(fmt, lambda start, stop: Pending(lambda: None, 0), what)  # no shard: the fill value
        offset, length = (int(x) for x in shards.index(bytes(r.value))[inner])
        if offset == length == MISSING:
            return ChunkRows(fmt, lambda start, stop: Pending(lambda: None, 0), what)
        if offset >= 1 << 62 or length >= 1 << 62:  # a damaged index (one half of MISSING, or past any shard)
            raise NotStreamable(f"{what}: its shard index entry ({offset}, {length}) is not a byte range")

        def fetch(start: int, stop: Optional[int]) -> Pending:
            stop = length if stop is None else min(stop, length)
            if start >= stop:
                return Pending(lambda: b"", 0)
            try:
                fut = kv.read(key, byte_range=slice(offset + start, offset + stop))
            except Exception as e:  # noqa: BLE001 - tensorstore's read of the leaf will say what is wrong
                raise NotStreamable(f"{what}: {_short(e)}") from None

            def get() -> bytes:
                try:
                    value = fut.result().value
                except Exception as e:  # noqa: BLE001
                    raise NotStreamable(f"{what}: {_short(e)}") from None
                if len(value) != stop - start:  # the index points past the shard's end
                    raise NotStreamable(f"{what}: {len(value)} stored bytes where its shard index says {stop - start}")
                return bytes(value)

            return Pending(get, 0)

        return ChunkRows(fmt, fetch, what)

    def stored_chunk(self, path: KeyPath, coords: tuple[int, ...], layout: ChunkLayout) -> Pending:
        """Start reading the stored (still encoded) bytes of one chunk; the result is bytes,
        or None when the chunk is absent (zarr then means the fill value)."""
        param = ".".join(path)
        key = layout.key(param, coords)
        fut = self._kvstore().read(key)
        side, item = self.name, self.item_dir

        def get() -> Optional[bytes]:
            try:
                r = fut.result()
            except Exception as e:
                raise _usage(side, item, f"could not read array '{param}' (chunk '{key}') from '{item}' ({_short(e)}); its data is truncated or corrupt: re-save the checkpoint or pick another step.") from None
            return bytes(r.value) if r.state == "value" else None

        return Pending(get, 0)


class ChunkLayout:
    """A stored array's chunk grid, its full encoding (as comparable text) and chunk key rule."""

    __slots__ = ("grid", "encoding", "separator", "prefix")

    def __init__(self, grid: tuple[int, ...], encoding: str, separator: str, prefix: str) -> None:
        self.grid, self.encoding, self.separator, self.prefix = grid, encoding, separator, prefix

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChunkLayout) and (self.grid, self.encoding) == (other.grid, other.encoding)

    def __hash__(self) -> int:
        return hash((self.grid, self.encoding))

    def key(self, param: str, coords: tuple[int, ...]) -> str:
        """zarr2 `<param>/0.1.2`; zarr3 `<param>/c/0/1/2` (default encoding) or `<param>/0.1.2` (v2)."""
        parts = [self.prefix] if self.prefix else []
        parts += [str(c) for c in coords] or ([] if self.prefix else ["0"])  # a scalar: `c` or `0`
        return f"{param}/{self.separator.join(parts)}"


# --------------------------------------------------------------------------------------
# In-memory trees
# --------------------------------------------------------------------------------------

_PLAIN_LEAF_TYPES = (bool, int, float, complex, str)


def _is_plain_tree(obj: Any) -> bool:
    """True when the tree holds only dicts, lists, tuples, numpy values and Python scalars."""
    import numpy as np

    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, Mapping):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)) and type(x) in (list, tuple):
            stack.extend(x)
        elif x is None or isinstance(x, (np.ndarray, np.generic) + _PLAIN_LEAF_TYPES):
            continue
        else:
            return False
    return True


def _flatten_plain(obj: Any, prefix: KeyPath = ()) -> Iterable[tuple[KeyPath, Any]]:
    if isinstance(obj, Mapping):
        for k in obj:
            yield from _flatten_plain(obj[k], prefix + (str(k),))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten_plain(v, prefix + (str(i),))
    elif obj is not None:
        yield prefix, obj


def _jax_key_name(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flatten_jax(obj: Any) -> Iterable[tuple[KeyPath, Any]]:
    import jax

    prefix: KeyPath = ()
    try:
        from flax import nnx

        if isinstance(obj, nnx.Module):
            # A module is the model: its state is what TrainStateNNX saves under `model/`.
            obj, prefix = nnx.state(obj), ("model",)
    except ImportError:  # pragma: no cover - flax is a dependency, but stay usable without it
        pass
    leaves, _ = jax.tree_util.tree_flatten_with_path(obj)
    for keypath, leaf in leaves:
        yield prefix + tuple(_jax_key_name(k) for k in keypath), leaf


def _as_numpy_leaf(side: str, path: KeyPath, leaf: Any) -> tuple[Any, str]:
    """(numpy array or str, note). Typed PRNG keys become their uint32 key data."""
    import numpy as np

    if isinstance(leaf, str):
        return leaf, ""
    note = ""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and "key<" in str(dtype):
        import jax

        impl = str(dtype)
        leaf = jax.random.key_data(leaf)
        note = f"PRNG key data ({impl})"
    try:
        arr = np.asarray(leaf)
    except Exception as e:
        raise CkptParityUsageError(f"{side}: leaf '{path_str(path)}' of the in-memory tree is a {type(leaf).__name__}, which cannot be compared as an array ({e}); pass arrays, scalars or strings.") from None
    if arr.dtype == object:
        raise CkptParityUsageError(f"{side}: leaf '{path_str(path)}' of the in-memory tree is a {type(leaf).__name__}, not an array, scalar or string; convert it or exclude it.")
    return arr, note


class InMemoryCheckpoint(Checkpoint):
    """A live tree. Leaves are converted to numpy when read, not before."""

    def __init__(self, tree: Any, *, name: str = "A") -> None:
        self.name = name
        self.location = f"<in-memory {type(tree).__name__}>"
        self.custom_metadata = {}
        pairs = _flatten_plain(tree) if _is_plain_tree(tree) else _flatten_jax(tree)
        self._leaves: dict[KeyPath, Any] = {}
        infos: dict[KeyPath, ArrayInfo] = {}
        for path, leaf in pairs:
            value, note = _as_numpy_leaf(name, path, leaf)
            self._leaves[path] = value
            if isinstance(value, str):
                infos[path] = ArrayInfo(shape=(), dtype="str")
            else:
                infos[path] = ArrayInfo(shape=tuple(value.shape), dtype=value.dtype.name, note=note)  # in memory: any slice is free
        self._infos = dict(sorted(infos.items()))

    def leaves(self) -> dict[KeyPath, ArrayInfo]:
        return self._infos

    def read(self, path: KeyPath, index: Optional[tuple] = None) -> Pending:
        value = self._leaves[path]
        if isinstance(value, str):
            return Pending(lambda: value, len(value))
        view = value[index] if index else value
        return Pending(lambda: view, int(view.nbytes))


def open_checkpoint(
    obj: Any, *, step: Optional[int] = None, name: str = "A", storage_options: Optional[Mapping[str, str]] = None,
) -> Checkpoint:
    """Open a path or URL (orbax folder) or wrap an in-memory tree; an opened Checkpoint passes through.

    `storage_options` are extra settings for object-store URLs (endpoint, region, ...).
    """
    if storage_options and not (isinstance(obj, str) and "://" in obj):
        raise CkptParityUsageError(f"{name}: storage options apply to object-store URLs (gs://, s3://), not to {obj!r}; drop them or pass a URL.")
    if isinstance(obj, Checkpoint):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return OrbaxCheckpoint(obj, step=step, name=name, storage_options=storage_options)
    if isinstance(obj, bytes):
        raise CkptParityUsageError(f"{name}: raw bytes are not a checkpoint (nothing serialized is ever deserialized); pass a path or an in-memory tree.")
    return InMemoryCheckpoint(obj, name=name)


__all__: Sequence[str] = ("Checkpoint", "ChunkLayout", "OrbaxCheckpoint", "InMemoryCheckpoint", "Pending", "open_checkpoint", "locate_item_folder", "manager_steps")
