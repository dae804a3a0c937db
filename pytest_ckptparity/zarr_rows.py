"""A stored zarr chunk decoded from the front, a few rows at a time.

tensorstore decodes a chunk whole, and while it does it holds the chunk's stored bytes, the
decoded chunk and the copy it hands out: three times the chunk, however little of it a read
wants. Two checkpoints written on different meshes need, for any region, parts of several
chunks of each side, so reading them so holds many chunks or decodes each several times.

A zarr chunk whose codecs are plain C-order bytes, compressed as one stream (zstd, zlib,
gzip) or not at all, can instead be decompressed from the front: its rows along the first
stored axis come out in order, and only the rows asked for, a piece of the stored bytes and
the decompressor's window are held. `read_in_step` reads two chunk grids that way.

zarr v3 `sharding_indexed` (orbax's and MaxText's zarr3) is read too: a chunk's bytes are
the byte range its shard's index gives. Anything else (blosc, checksums, filters, a
transposed order, a chunk missing without a fill value) is not streamed: `row_format`
gives None, or `ChunkRows` raises `NotStreamable`, and the caller reads through tensorstore.
So does damage: a stream that ends early, runs past the chunk or has bytes after it (a
chunk read to its end is checked, `ChunkRows.finish`), a bad shard index; tensorstore then
names it.
zstd is libzstd through ctypes (the decompression runs without the GIL); where libzstd is
not installed, zstd chunks are not streamed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import zlib
from typing import Any, Callable, Optional

import numpy as np

from pytest_ckptparity._native import in_step_turned_off

INPUT_PIECE = 2 << 20  # stored bytes read at once, a chunk (one more is read ahead)


class NotStreamable(Exception):
    """This chunk cannot be decoded here; read it through tensorstore."""


class Shards:
    """zarr v3 `sharding_indexed`: chunks stored several to a value (a shard), each at a byte
    range the shard's index gives (orbax writes zarr3 so, one chunk per shard by default)."""

    __slots__ = ("per_shard", "index_at_end", "index_bytes")

    def __init__(self, per_shard: tuple[int, ...], index_at_end: bool, checksum: bool) -> None:
        self.per_shard, self.index_at_end = per_shard, index_at_end
        self.index_bytes = 16 * math.prod(per_shard) + (4 if checksum else 0)

    def locate(self, coords: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """A chunk's shard and its place in the shard's index."""
        return tuple(c // p for c, p in zip(coords, self.per_shard)), tuple(c % p for c, p in zip(coords, self.per_shard))

    def index(self, stored: bytes) -> np.ndarray:
        """The (offset, length) of every chunk in a shard, from the index's stored bytes."""
        if len(stored) != self.index_bytes:
            raise NotStreamable(f"a shard index of {len(stored)} bytes where {self.index_bytes} were expected")
        return np.frombuffer(stored, "<u8", count=2 * math.prod(self.per_shard)).reshape(*self.per_shard, 2)


MISSING = 2**64 - 1  # a chunk the shard does not store (offset and length both)


class RowFormat:
    """What decoding a stored chunk needs: its dtype as stored (byte order included), its
    shape, the compression of its byte stream, the value of a chunk not stored, and for a
    sharded array where a chunk's bytes sit in its shard."""

    __slots__ = ("dtype", "chunk", "codec", "fill", "shards", "window_log")

    def __init__(self, dtype: np.dtype, chunk: tuple[int, ...], codec: str, fill: Optional[np.ndarray], shards: Optional[Shards] = None) -> None:
        self.dtype, self.chunk, self.codec, self.fill, self.shards = dtype, chunk, codec, fill, shards
        self.window_log = ZSTD_WINDOW_LOG_MAX  # the largest zstd window decoded, as a power of two

    def with_window_log(self, window_log: int) -> "RowFormat":
        """The same format, decoding zstd frames with windows of at most 2**window_log bytes
        (a frame that needs more is not streamable)."""
        fmt = RowFormat(self.dtype, self.chunk, self.codec, self.fill, self.shards)
        fmt.window_log = window_log
        return fmt

    @property
    def row_bytes(self) -> int:
        return math.prod(self.chunk[1:]) * self.dtype.itemsize


def _dtype(name: Any) -> Optional[np.dtype]:
    if not isinstance(name, str):
        return None
    try:
        if name.lstrip("<>|=") == "bfloat16" or name == "bfloat16":
            import ml_dtypes

            dt = np.dtype(ml_dtypes.bfloat16)
            return dt.newbyteorder(">") if name.startswith(">") else dt
        dt = np.dtype(name)
    except TypeError:
        return None
    return dt if dt.kind in "biuf" else None  # no complex, strings, records or datetimes


def _fill(value: Any, dtype: np.dtype) -> Optional[np.ndarray]:
    """The fill value zarr stores for a missing chunk; None when absent or not understood (a
    missing chunk then goes through tensorstore)."""
    if value is None or isinstance(value, (list, dict)):
        return None
    if isinstance(value, str):
        named = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}
        if value not in named or dtype.kind != "f":
            return None
        value = named[value]
    try:
        return np.array(value, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        return None


def row_format(meta: Any) -> Optional[RowFormat]:
    """The row format of a zarr array (v2 `.zarray` or v3 `zarr.json`, parsed), or None when
    its chunks cannot be decoded from the front here."""
    if not isinstance(meta, dict):
        return None
    try:
        if meta.get("zarr_format") == 2:
            if meta.get("order", "C") != "C" or meta.get("filters"):
                return None
            dtype, chunk = _dtype(meta.get("dtype")), tuple(int(c) for c in meta["chunks"])
            comp = meta.get("compressor")
            codec = "raw" if comp is None else {"zstd": "zstd", "zlib": "zlib", "gzip": "gzip"}.get(comp.get("id"))
        elif meta.get("zarr_format") == 3:
            grid = meta.get("chunk_grid") or {}
            if grid.get("name") != "regular":
                return None
            chunk = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
            codecs = list(meta.get("codecs") or [])
            if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
                shard, config = chunk, codecs[0].get("configuration") or {}
                chunk = tuple(int(c) for c in config["chunk_shape"])
                codecs = list(config.get("codecs") or [])
                index_codecs = [c.get("name") for c in config.get("index_codecs") or []]
                endian = ((config.get("index_codecs") or [{}])[0].get("configuration") or {}).get("endian", "little")
                if (len(chunk) != len(shard) or any(s % c for s, c in zip(shard, chunk)) or endian != "little"
                        or index_codecs not in (["bytes"], ["bytes", "crc32c"]) or config.get("index_location", "end") not in ("start", "end")):
                    return None
                shards: Optional[Shards] = Shards(tuple(s // c for s, c in zip(shard, chunk)), config.get("index_location", "end") == "end", index_codecs[-1] == "crc32c")
            else:
                shards = None
            dtype, codec = _v3_codecs(codecs, meta.get("data_type"), len(chunk))
        else:
            return None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if dtype is None or codec is None or not chunk or 0 in chunk:
        return None
    if codec == "zstd" and _zstd() is None:
        return None
    return RowFormat(dtype, chunk, codec, _fill(meta.get("fill_value"), dtype), shards if meta.get("zarr_format") == 3 else None)


def _v3_codecs(codecs: list, data_type: Any, ndim: int) -> tuple[Optional[np.dtype], Optional[str]]:
    """The stored dtype and the compression of a zarr v3 codec chain that is C-order bytes,
    then at most one compressor; (None, None) for anything else."""
    codecs = list(codecs)
    if codecs and codecs[0].get("name") == "transpose":
        order = (codecs.pop(0).get("configuration") or {}).get("order")
        if list(order or []) != list(range(ndim)):
            return None, None
    if not codecs or codecs[0].get("name") != "bytes" or len(codecs) > 2:
        return None, None
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    dtype = _dtype(data_type)
    if dtype is not None and dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    return dtype, "raw" if len(codecs) == 1 else {"zstd": "zstd", "gzip": "gzip"}.get(codecs[1].get("name"))


# --------------------------------------------------------------------------------------
# zstd through ctypes
# --------------------------------------------------------------------------------------


class _Buffer(ctypes.Structure):
    """ZSTD_inBuffer and ZSTD_outBuffer: a pointer, a size and a position."""

    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


_ZSTD: list = []  # [library or None], looked up once
_ZSTD_D_WINDOW_LOG_MAX = 100  # ZSTD_d_windowLogMax
ZSTD_WINDOW_LOG_MAX = 23  # 8 MiB windows at most (zstd levels up to 18 write no more), fewer for a small budget


def _zstd() -> Any:
    if not _ZSTD:
        lib = None
        name = ctypes.util.find_library("zstd")
        for candidate in ([name] if name else []) + ["libzstd.so.1", "libzstd.dylib"]:
            try:
                lib = ctypes.CDLL(candidate)
                lib.ZSTD_createDCtx.restype = ctypes.c_void_p
                lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
                lib.ZSTD_DCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
                lib.ZSTD_DCtx_setParameter.restype = ctypes.c_size_t
                lib.ZSTD_decompressStream.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Buffer), ctypes.POINTER(_Buffer)]
                lib.ZSTD_decompressStream.restype = ctypes.c_size_t
                lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
                lib.ZSTD_isError.restype = ctypes.c_uint
                lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
                lib.ZSTD_getErrorName.restype = ctypes.c_char_p
                break
            except (OSError, AttributeError):
                lib = None
        _ZSTD.append(lib)
    return _ZSTD[0]


def status() -> str:
    """A short line for `ckptparity --version`: whether zstd chunks can be read in step."""
    if in_step_turned_off():
        return "rows in step: off (CKPTPARITY_IN_STEP=0)"
    return "rows in step: yes" if _zstd() is not None else "rows in step: not for zstd chunks (libzstd not found)"


# --------------------------------------------------------------------------------------
# One chunk's rows
# --------------------------------------------------------------------------------------

Fetch = Callable[[int, Optional[int]], Any]  # (start, stop or None for the end) -> pending bytes (None: no chunk)


class ChunkRows:
    """The rows of one stored chunk, in order, `read(k)` rows at a time.

    `fetch(start, stop)` starts reading a byte range of the chunk's stored value and returns
    something whose `result()` is the bytes, or None when the chunk is not stored. One piece
    is read ahead while the one before is decompressed."""

    def __init__(self, fmt: RowFormat, fetch: Fetch, what: str) -> None:
        self.fmt, self.fetch, self.what = fmt, fetch, what
        self.rows_done = 0
        self._offset = 0  # stored bytes asked for so far
        self._ahead: Any = None
        self._input: Optional[bytes] = None
        self._in = _Buffer(None, 0, 0)
        self._dctx: Any = None
        self._inflate: Any = None
        self._missing = False
        self._started = False
        self._frame_done = False  # zstd: the frame ended (it must end with the chunk)
        self._whole = False  # the first piece was the whole stored value (a small chunk)
        if fmt.codec != "raw":
            self._ahead = self._next_piece()

    def _next_piece(self) -> Any:
        start = self._offset
        if start == 0 and math.prod(self.fmt.chunk) * self.fmt.dtype.itemsize < INPUT_PIECE // 2:
            self._offset = INPUT_PIECE  # a small chunk: its whole value at once (no ranged read past its end)
            self._whole = True
            return self.fetch(0, None)
        self._offset += INPUT_PIECE
        return self.fetch(start, start + INPUT_PIECE)

    def _take_piece(self) -> Optional[bytes]:
        piece = self._ahead.result()
        if piece is None or len(piece) == 0:
            return piece
        self._ahead = self._next_piece() if len(piece) == INPUT_PIECE and not self._whole else _Done()
        return piece

    def read(self, k: int) -> np.ndarray:
        """The next `k` rows, shape (k, *chunk[1:]), in native byte order."""
        out = np.empty((min(k, max(self.fmt.chunk[0] - self.rows_done, 0)), *self.fmt.chunk[1:]), self.fmt.dtype)
        self._decode(out)
        return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))

    def read_into(self, out: np.ndarray) -> None:
        """The next `len(out)` rows, decoded into `out` (C-contiguous, the chunk's row shape,
        native byte order): no copy when the chunk is stored in native order."""
        if out.dtype.byteorder == self.fmt.dtype.byteorder or self.fmt.dtype.isnative or out.dtype.itemsize == 1:
            self._decode(out.view(self.fmt.dtype))
        else:
            out[...] = self.read(len(out))

    def _decode(self, out: np.ndarray) -> None:
        fmt = self.fmt
        k = len(out)
        if not out.flags.c_contiguous:
            raise ValueError(f"{self.what}: rows are decoded into C-contiguous arrays only")
        if self.rows_done + k > fmt.chunk[0]:
            raise ValueError(f"{self.what}: {k} rows asked past the chunk's {fmt.chunk[0]}")
        if k <= 0:
            return
        if self._missing:
            out[...] = fmt.fill
        elif fmt.codec == "raw":
            start = self.rows_done * fmt.row_bytes
            data = self.fetch(start, start + k * fmt.row_bytes).result()
            if data is None:
                self._fill_missing(out)
            elif len(data) != out.nbytes:
                raise NotStreamable(f"{self.what}: {len(data)} stored bytes where {out.nbytes} were expected")
            else:
                out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)
        elif fmt.codec == "zstd":
            self._zstd_into(out)
        else:
            self._inflate_into(out)
        self.rows_done += k

    def _fill_missing(self, out: np.ndarray) -> None:
        if self.fmt.fill is None:
            raise NotStreamable(f"{self.what}: not stored, and its fill value is not understood")
        self._missing = True
        out[...] = self.fmt.fill

    def _first_input(self, out: np.ndarray) -> bool:
        """Take the first piece; False when the chunk is not stored (`out` then holds the fill)."""
        if not self._started:
            self._started = True
            piece = self._take_piece()
            if piece is None:
                self._fill_missing(out)
                return False
            self._set_input(piece)
        return not self._missing

    def _set_input(self, piece: bytes) -> None:
        self._input = piece
        self._in = _Buffer(ctypes.cast(ctypes.c_char_p(piece), ctypes.c_void_p), len(piece), 0)

    def _zstd_into(self, out: np.ndarray) -> None:
        lib = _zstd()
        if self._dctx is None:
            self._dctx = lib.ZSTD_createDCtx()
            if not self._dctx:
                raise NotStreamable(f"{self.what}: no zstd decoder")
            # a frame asking for a larger window than `read_in_step` counts (level 19 and up, a
            # damaged or hostile header) fails here and goes to tensorstore
            if lib.ZSTD_isError(lib.ZSTD_DCtx_setParameter(self._dctx, _ZSTD_D_WINDOW_LOG_MAX, max(10, self.fmt.window_log))):
                raise NotStreamable(f"{self.what}: the zstd window cannot be limited to 2**{self.fmt.window_log} bytes")
        if not self._first_input(out):
            return
        if self._frame_done:
            raise NotStreamable(f"{self.what}: the zstd frame ends before the chunk does")
        dst = _Buffer(out.ctypes.data, out.nbytes, 0)
        while dst.pos < dst.size:
            if self._in.pos == self._in.size:
                piece = self._take_piece()
                if not piece:
                    raise NotStreamable(f"{self.what}: the stored bytes end before the chunk does")
                self._set_input(piece)
            ret = lib.ZSTD_decompressStream(self._dctx, ctypes.byref(dst), ctypes.byref(self._in))
            if lib.ZSTD_isError(ret):
                raise NotStreamable(f"{self.what}: {lib.ZSTD_getErrorName(ret).decode(errors='replace')}")
            if ret == 0:
                if dst.pos < dst.size:
                    raise NotStreamable(f"{self.what}: the zstd frame ends before the chunk does")
                self._frame_done = True

    def _inflate_into(self, out: np.ndarray) -> None:
        if self._inflate is None:
            self._inflate = zlib.decompressobj(31 if self.fmt.codec == "gzip" else 15)
            self._pending = b""
        if not self._first_input(out):
            return
        flat = out.reshape(-1).view(np.uint8)
        pos = 0
        try:
            while pos < flat.size:
                if not self._pending:
                    if self._input is None:
                        piece = self._take_piece()
                        if not piece:
                            raise NotStreamable(f"{self.what}: the stored bytes end before the chunk does")
                        self._input = piece
                    self._pending, self._input = self._input, None
                data = self._inflate.decompress(self._pending, flat.size - pos)
                self._pending = self._inflate.unconsumed_tail
                if self._inflate.eof and not data and pos < flat.size:
                    raise NotStreamable(f"{self.what}: the stored stream ends before the chunk does")
                flat[pos:pos + len(data)] = np.frombuffer(data, np.uint8)
                pos += len(data)
        except zlib.error as e:
            raise NotStreamable(f"{self.what}: {e}") from None

    def finish(self) -> None:
        """Decode the rows not asked for (padding past the array's end, rows past the region)
        and check that the stored stream ends with the chunk, as tensorstore does: a stream
        that runs past it, a second frame or bytes after it are damage (`NotStreamable`)."""
        self.skip(self.fmt.chunk[0] - self.rows_done)
        if self._missing:
            return
        if self.fmt.codec == "raw":
            end = self.fmt.chunk[0] * self.fmt.row_bytes
            if self.fetch(end, None).result():
                raise NotStreamable(f"{self.what}: stored bytes after the chunk's end")
            return
        if self.fmt.codec == "zstd":
            self._zstd_end()
        else:
            self._inflate_end()
        if self._ahead is not None and self._ahead.result():
            raise NotStreamable(f"{self.what}: stored bytes after the chunk's end")

    def _zstd_end(self) -> None:
        lib = _zstd()
        dst = _Buffer(None, 0, 0)
        while not self._frame_done:
            if self._in.pos == self._in.size:
                piece = self._take_piece()
                if not piece:
                    raise NotStreamable(f"{self.what}: the stored bytes end before the zstd frame does")
                self._set_input(piece)
            before = self._in.pos
            ret = lib.ZSTD_decompressStream(self._dctx, ctypes.byref(dst), ctypes.byref(self._in))
            if lib.ZSTD_isError(ret):
                raise NotStreamable(f"{self.what}: {lib.ZSTD_getErrorName(ret).decode(errors='replace')}")
            if ret == 0:
                self._frame_done = True
            elif self._in.pos == before and self._in.pos < self._in.size:
                raise NotStreamable(f"{self.what}: the zstd frame holds more than the chunk")
        if self._in.pos < self._in.size:
            raise NotStreamable(f"{self.what}: stored bytes after the zstd frame")

    def _inflate_end(self) -> None:
        try:
            while not self._inflate.eof:
                if not self._pending:
                    piece = self._input if self._input is not None else self._take_piece()
                    self._input = None
                    if not piece:
                        raise NotStreamable(f"{self.what}: the stored bytes end before the stream does")
                    self._pending = piece
                if self._inflate.decompress(self._pending, 1):
                    raise NotStreamable(f"{self.what}: the stored stream holds more than the chunk")
                self._pending = self._inflate.unconsumed_tail
        except zlib.error as e:
            raise NotStreamable(f"{self.what}: {e}") from None
        if self._inflate.unused_data or self._pending or self._input:
            raise NotStreamable(f"{self.what}: stored bytes after the compressed stream")

    def skip(self, k: int) -> None:
        """Decode and drop `k` rows (a region that starts inside the chunk), a piece at a time."""
        step = max(1, INPUT_PIECE // max(self.fmt.row_bytes, 1))
        while k > 0:
            n = min(k, step)
            self.read(n)
            k -= n

    def close(self) -> None:
        if self._dctx is not None:
            _zstd().ZSTD_freeDCtx(self._dctx)
            self._dctx = None
        self._input = self._ahead = self._inflate = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the library may be gone already
            pass


class _Done:
    """The piece after the last one: nothing more is stored."""

    @staticmethod
    def result() -> bytes:
        return b""
