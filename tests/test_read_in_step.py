"""Two chunk grids read row by row, in step (`read_in_step`, `zarr_rows`): a stored zarr chunk
decoded from the front gives exactly what tensorstore decodes, every chunk is opened once,
and the verdict, figures and indices equal those of reading the same pair in slabs."""

from __future__ import annotations

import dataclasses
import itertools
import zlib

import ml_dtypes
import numpy as np
import pytest

from pytest_ckptparity import Comparison
from pytest_ckptparity import read_in_step
from pytest_ckptparity import zarr_rows
from pytest_ckptparity.diff import CompareOptions
from pytest_ckptparity.sources import OrbaxCheckpoint, Pending
from pytest_ckptparity.zarr_rows import ChunkRows, NotStreamable, RowFormat, row_format

# Without the system's libzstd, zstd chunks (orbax's default) are not read in step.
needs_libzstd = pytest.mark.skipif(zarr_rows._zstd() is None, reason="rows in step need the system's libzstd for zstd chunks")

# The stacked mlp kernels' common block (both grids' whole chunks) is 48 KiB a side: this
# budget cannot hold it twice, so blocks would be slabs, and the leaf is read in step.
BUDGET = 80 << 10


@pytest.fixture
def small_pieces(monkeypatch):
    """Stored bytes read 512 at a time: piece edges fall inside rows and inside zstd blocks.
    And the plan counts 256 bytes for each open chunk's decoder (these few-KiB chunks'
    frames need their whole size, which would not fit budgets small enough to need rows in
    step at all), while the decoder itself keeps its usual limit."""
    monkeypatch.setattr(zarr_rows, "INPUT_PIECE", 512)
    monkeypatch.setattr(read_in_step, "INPUT_PIECE", 512)
    monkeypatch.setattr(read_in_step, "DECODER_BUFFERS", 0)
    monkeypatch.setattr(read_in_step, "WINDOW_LOGS", (8,))
    monkeypatch.setattr(RowFormat, "with_window_log", lambda fmt, window_log: fmt)


# --------------------------------------------------------------------------------------
# One chunk decoded from the front equals tensorstore's decoding
# --------------------------------------------------------------------------------------


def _write_zarr(path, zarr_format, codec, dtype, values, chunks):
    """An array written by tensorstore itself (zarr v2 or v3), with the given compression."""
    import tensorstore as ts

    if zarr_format == 2:
        compressor = None if codec == "raw" else {"zstd": {"id": "zstd", "level": 3}, "zlib": {"id": "zlib", "level": 5}, "gzip": {"id": "gzip", "level": 5}}[codec]
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
                "metadata": {"shape": list(values.shape), "chunks": list(chunks), "dtype": dtype, "compressor": compressor, "fill_value": 0}}
    else:
        codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if codec != "raw":
            codecs.append({"name": codec, "configuration": {"level": 3} if codec == "zstd" else {"level": 5}})
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
                "metadata": {"shape": list(values.shape), "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
                             "data_type": dtype, "codecs": codecs, "fill_value": 0}}
    arr = ts.open(spec, create=True).result()
    arr.write(values).result()
    meta_name = ".zarray" if zarr_format == 2 else "zarr.json"
    import json

    return arr, json.loads((path / meta_name).read_text())


def _fetcher(path, key):
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "file", "path": str(path) + "/"}).result()

    def fetch(start, stop):
        try:
            value = kv.read(key, byte_range=slice(start, stop)).result()
        except ValueError:  # past the end: what is left
            value = kv.read(key, byte_range=slice(start, None)).result()
        return Pending(lambda: bytes(value.value) if value.state == "value" else None, 0)

    return fetch


@pytest.mark.parametrize("zarr_format, codec", [(2, "zstd"), (2, "zlib"), (2, "gzip"), (2, "raw"), (3, "zstd"), (3, "gzip"), (3, "raw")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32"])
def test_a_chunk_decoded_from_the_front_is_what_tensorstore_decodes(tmp_path, small_pieces, zarr_format, codec, dtype):
    """Every chunk (edge chunks included, padded by zarr), read 1, 3 and then the rest of
    its rows at a time, equals tensorstore's read of the same region."""
    if codec == "zstd" and zarr_rows._zstd() is None:
        pytest.skip("no system libzstd")
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    values = (np.random.default_rng(0).standard_normal((37, 5, 9)) * 100).astype(np_dtype)
    v2_dtype = {"float32": "<f4", "bfloat16": "bfloat16", "int32": "<i4"}[dtype]
    arr, meta = _write_zarr(tmp_path / "arr", zarr_format, codec, v2_dtype if zarr_format == 2 else dtype, values, (8, 5, 4))
    fmt = row_format(meta)
    assert fmt is not None and fmt.codec == codec and fmt.chunk == (8, 5, 4)
    for coords in itertools.product(range(5), range(1), range(3)):
        key = ".".join(map(str, coords)) if zarr_format == 2 else "c/" + "/".join(map(str, coords))
        rows = ChunkRows(fmt, _fetcher(tmp_path / "arr", key), key)
        got = np.concatenate([rows.read(1), rows.read(3), rows.read(100)])
        assert got.shape == (8, 5, 4) and rows.rows_done == 8
        lo = [c * g for c, g in zip(coords, fmt.chunk)]
        region = tuple(slice(a, min(a + g, n)) for a, g, n in zip(lo, fmt.chunk, values.shape))
        valid = tuple(slice(0, r.stop - r.start) for r in region)
        np.testing.assert_array_equal(got[valid], values[region])
        rows.close()


@needs_libzstd
@pytest.mark.parametrize("index_location", ["end", "start"])
def test_chunks_of_a_sharded_zarr3_array_decode_from_their_byte_range(tmp_path, small_pieces, index_location):
    """zarr3 `sharding_indexed` (orbax's zarr3): each chunk is found through its shard's index
    (at the end or the start), decoded from the front, and a chunk the shard does not store
    (all fill value, not written) reads as the fill value."""
    import tensorstore as ts

    from pytest_ckptparity.sources import ChunkLayout

    values = np.random.default_rng(0).standard_normal((24, 3, 10)).astype(np.float32)
    values[8:16, :, 5:10] = 0.0  # one chunk all fill value: not stored in its shard
    codecs = [{"name": "sharding_indexed", "configuration": {
        "chunk_shape": [8, 3, 5], "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd", "configuration": {"level": 1}}],
        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}], "index_location": index_location}}]
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "s")},
            "metadata": {"shape": [24, 3, 10], "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [16, 3, 10]}},
                         "data_type": "float32", "codecs": codecs, "fill_value": 0}}
    ts.open(spec, create=True).result().write(values).result()
    import json

    fmt = row_format(json.loads((tmp_path / "s" / "zarr.json").read_text()))
    assert fmt is not None and fmt.chunk == (8, 3, 5) and fmt.shards.per_shard == (2, 1, 2)

    class _Item:  # what `OrbaxCheckpoint._sharded_chunk_rows` uses of a checkpoint
        item_dir = str(tmp_path)
        kv = ts.KvStore.open({"driver": "file", "path": str(tmp_path) + "/"}).result()

        def _kvstore(self):
            return self.kv

    layout = ChunkLayout((16, 3, 10), "", "/", "c")
    for coords in itertools.product(range(3), range(1), range(2)):
        rows = OrbaxCheckpoint._sharded_chunk_rows(_Item(), "s", layout, coords, fmt)
        got = np.concatenate([rows.read(3), rows.read(5)])
        region = tuple(slice(c * g, min(c * g + g, n)) for c, g, n in zip(coords, fmt.chunk, values.shape))
        np.testing.assert_array_equal(got[tuple(slice(0, r.stop - r.start) for r in region)], values[region])


def test_rows_decode_straight_into_a_batch_and_big_endian_is_swapped(tmp_path):
    values = np.arange(4 * 3, dtype=">f4").reshape(4, 3)
    _, meta = _write_zarr(tmp_path / "be", 2, "zlib", ">f4", values, (4, 3))
    fmt = row_format(meta)
    assert fmt is not None and not fmt.dtype.isnative
    rows = ChunkRows(fmt, _fetcher(tmp_path / "be", "0.0"), "be")
    out = np.empty((2, 3), np.float32)
    rows.read_into(out)
    np.testing.assert_array_equal(out, values[:2].astype(np.float32))
    np.testing.assert_array_equal(rows.read(2), values[2:].astype(np.float32))


@pytest.mark.parametrize("meta", [
    {"zarr_format": 2, "chunks": [4], "dtype": "<f4", "compressor": {"id": "blosc"}, "order": "C", "filters": None},
    {"zarr_format": 2, "chunks": [4], "dtype": "<f4", "compressor": None, "order": "F", "filters": None},
    {"zarr_format": 2, "chunks": [4], "dtype": "<f4", "compressor": None, "order": "C", "filters": [{"id": "delta"}]},
    {"zarr_format": 2, "chunks": [4], "dtype": "<c8", "compressor": None, "order": "C", "filters": None},
    {"zarr_format": 3, "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4, 4]}}, "data_type": "float32",
     "codecs": [{"name": "sharding_indexed", "configuration": {}}]},
    {"zarr_format": 3, "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4, 4]}}, "data_type": "float32",
     "codecs": [{"name": "bytes"}, {"name": "zstd"}, {"name": "crc32c"}]},
    {"zarr_format": 3, "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4, 4]}}, "data_type": "float32",
     "codecs": [{"name": "transpose", "configuration": {"order": [1, 0]}}, {"name": "bytes"}]},
    {"zarr_format": 3, "chunk_grid": {"name": "rectilinear"}, "data_type": "float32", "codecs": [{"name": "bytes"}]},
    "not metadata",
])
def test_chunks_that_do_not_decode_from_the_front_are_left_to_tensorstore(meta):
    assert row_format(meta) is None


def test_an_identity_transpose_still_decodes_from_the_front():
    meta = {"zarr_format": 3, "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4, 4]}}, "data_type": "float32",
            "codecs": [{"name": "transpose", "configuration": {"order": [0, 1]}}, {"name": "bytes", "configuration": {"endian": "big"}}], "fill_value": "NaN"}
    fmt = row_format(meta)
    assert fmt is not None and fmt.codec == "raw" and fmt.dtype == np.dtype(">f4") and np.isnan(fmt.fill)


@pytest.mark.parametrize("stored", [b"", b"\x28\xb5\x2f\xfd garbage that is no frame", None])
def test_damaged_or_missing_chunks_without_a_fill_value_are_not_streamable(stored):
    if zarr_rows._zstd() is None:
        pytest.skip("no system libzstd")
    """A stored stream that ends early or is not zstd, or a missing chunk whose fill value is
    not known (orbax writes `null`), is not guessed at: the leaf goes back to tensorstore."""
    fmt = RowFormat(np.dtype("<f4"), (4, 3), "zstd", None)
    rows = ChunkRows(fmt, lambda start, stop: Pending(lambda: stored if start == 0 else b"", 0), "chunk")
    with pytest.raises(NotStreamable):
        rows.read(2)


@pytest.mark.parametrize("codec", ["zstd", "zlib", "raw"])
@pytest.mark.parametrize("damage", ["trailing bytes", "a second copy", "cut short"])
def test_a_chunk_whose_stream_does_not_end_with_it_is_not_streamable(tmp_path, codec, damage):
    """What tensorstore refuses (bytes after a chunk's data: `End of data expected`; a chunk
    cut short) is never decoded here: `finish`, which a lane calls on the last rows of every
    chunk, raises, and the leaf goes to tensorstore. (A zlib stream missing its checksum,
    which tensorstore reads, is refused here too: it then reads through tensorstore.)"""
    import tensorstore as ts

    if codec == "zstd" and zarr_rows._zstd() is None:
        pytest.skip("no system libzstd")
    values = np.arange(4 * 3, dtype="<f4").reshape(4, 3) + 1
    _, meta = _write_zarr(tmp_path / "c", 2, codec, "<f4", values, (4, 3))
    stored = (tmp_path / "c" / "0.0").read_bytes()
    data = {"trailing bytes": stored + b"\x00" * 8, "a second copy": stored + stored, "cut short": stored[:-3]}[damage]
    (tmp_path / "c" / "0.0").write_bytes(data)
    try:
        ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "c")}}).result().read().result()
        refused = False
    except ValueError:
        refused = True
    assert refused or (codec, damage) == ("zlib", "cut short")
    rows = ChunkRows(row_format(meta), lambda start, stop: Pending(lambda: data[start:stop], 0), "chunk")
    with pytest.raises(NotStreamable):
        rows.read(4)
        rows.finish()


def test_a_whole_chunk_ends_where_its_stream_does(tmp_path, small_pieces):
    for codec in ("zstd", "zlib", "gzip", "raw")[0 if zarr_rows._zstd() else 1:]:
        values = np.random.default_rng(0).standard_normal((9, 3)).astype("<f4")
        _, meta = _write_zarr(tmp_path / codec, 2, codec, "<f4", values, (4, 3))
        for key in ("0.0", "1.0", "2.0"):  # the last one padded past the array's end
            data = (tmp_path / codec / key).read_bytes()
            rows = ChunkRows(row_format(meta), lambda start, stop, data=data: Pending(lambda: data[start:stop], 0), key)
            rows.read(1)
            rows.finish()  # decodes the rest, finds the stream's end exactly there
            assert rows.rows_done == 4


def test_a_truncated_zlib_stream_is_not_streamable():
    data = zlib.compress(np.arange(12, dtype="<f4").tobytes())[:-8]
    rows = ChunkRows(RowFormat(np.dtype("<f4"), (4, 3), "zlib", None), lambda s, e: Pending(lambda: data[s:e], 0), "chunk")
    with pytest.raises(NotStreamable):
        rows.read(4)


def test_a_missing_chunk_reads_as_its_fill_value():
    if zarr_rows._zstd() is None:
        pytest.skip("no system libzstd")
    rows = ChunkRows(RowFormat(np.dtype("<f4"), (4, 3), "zstd", np.array(1.5, "<f4")), lambda s, e: Pending(lambda: None, 0), "chunk")
    np.testing.assert_array_equal(rows.read(3), np.full((3, 3), 1.5, np.float32))
    np.testing.assert_array_equal(rows.read(3), np.full((1, 3), 1.5, np.float32))


# --------------------------------------------------------------------------------------
# A layer-stacked TrainState written from two meshes
# --------------------------------------------------------------------------------------


class _Reads:
    """Counts the chunks opened row by row and the leaves read through tensorstore."""

    def __init__(self, monkeypatch):
        self.opened, self.tensorstore = [], []
        chunk_rows, read = OrbaxCheckpoint.chunk_rows, OrbaxCheckpoint.read

        def counted_chunk_rows(ckpt, path, coords, fmt):
            self.opened.append((ckpt.name, path, coords))
            return chunk_rows(ckpt, path, coords, fmt)

        def counted_read(ckpt, path, index=None):
            self.tensorstore.append((ckpt.name, path))
            return read(ckpt, path, index)

        monkeypatch.setattr(OrbaxCheckpoint, "chunk_rows", counted_chunk_rows)
        monkeypatch.setattr(OrbaxCheckpoint, "read", counted_read)


def _run(a, b, monkeypatch, in_step=True, budget=BUDGET):
    if in_step:
        monkeypatch.delenv("CKPTPARITY_IN_STEP", raising=False)
    else:
        monkeypatch.setenv("CKPTPARITY_IN_STEP", "0")
    return Comparison(a, b, options=CompareOptions(read_budget=budget)).run()


def _figures(report):
    return {r.path: (r.kind, r.bytes_read, dataclasses.asdict(r.stats) if r.stats else None) for r in report.results}


MLP = "params.params.decoder.layers.mlp.wi_0.kernel".split(".")
@needs_libzstd
def test_rows_in_step_open_every_chunk_once_and_never_decode_the_leaf_whole(stack_meshes, monkeypatch, small_pieces):
    reads = _Reads(monkeypatch)
    report = _run(stack_meshes["a"], stack_meshes["b"], monkeypatch)
    assert report.passed
    opened = [(side, path, coords) for side, path, coords in reads.opened if list(path) == MLP]
    # A: 4 x 1 x 2 chunks (fsdp rows, tensor columns), B: 1 x 1 x 8 (tensor columns)
    assert sorted(c for s, _, c in opened if s == "A") == [(r, 0, c) for r in range(4) for c in range(2)]
    assert sorted(c for s, _, c in opened if s == "B") == [(0, 0, c) for c in range(8)]
    assert not [p for _, p in reads.tensorstore if list(p) == MLP]  # never decoded by tensorstore
    (wi_0,) = [r for r in report.results if r.path == "params/decoder/layers/mlp/wi_0/kernel"]
    assert wi_0.stats.n_total == 3 * 64 * 128 and wi_0.bytes_read == 2 * 3 * 64 * 128 * 4


@needs_libzstd
@pytest.mark.parametrize("b", ["b", "b_planted", "b_noisy"])
def test_rows_in_step_give_the_figures_of_slabs_and_of_whole_blocks(stack_meshes, monkeypatch, small_pieces, b):
    """The same verdict, counts, worst values, indices and per-layer drift, leaf by leaf,
    whether the pair is read in step, in slabs (`CKPTPARITY_IN_STEP=0`) or in whole blocks
    (the default budget)."""
    reads = _Reads(monkeypatch)
    in_step = _run(stack_meshes["a"], stack_meshes[b], monkeypatch)
    assert {tuple(p) for _, p, _ in reads.opened} >= {tuple(MLP)}  # the mlp kernels were read in step
    reads.opened.clear()
    slabs = _run(stack_meshes["a"], stack_meshes[b], monkeypatch, in_step=False)
    blocks = _run(stack_meshes["a"], stack_meshes[b], monkeypatch, budget=256 << 20)
    assert not reads.opened
    assert _figures(in_step) == _figures(slabs) == _figures(blocks)
    assert in_step.passed == (b != "b_planted")
    if b == "b_planted":
        # the moments are made from the params (examples.linen_train_state): mu differs too
        assert {r.path for r in in_step.mismatches} == {"params/decoder/layers/mlp/wi_0/kernel", "opt_state/0/mu/decoder/layers/mlp/wi_0/kernel"}
        (bad,) = [r for r in in_step.mismatches if r.path.startswith("params/")]
        assert bad.stats.n_mismatch == 1 and bad.stats.first_indices == ((2, 5, 40),) and bad.stats.mismatched_layers == (2,)
        assert bad.stats.max_abs == pytest.approx(1.0, rel=1e-5)
    if b == "b_noisy":
        assert all(r.stats.headroom > 0 for r in in_step.results if r.stats and r.layers)
@needs_libzstd
def test_a_chunk_that_fails_to_decode_restarts_the_leaf_through_tensorstore(stack_meshes, monkeypatch, small_pieces):
    """A decode that fails halfway (after some batches were compared) starts the leaf over
    from nothing: the counts are not doubled, and the planted difference is still found."""
    reads = _Reads(monkeypatch)
    original = ChunkRows.read

    def failing(self, k):
        if self.rows_done >= 8 and "wi_0" in self.what:
            raise NotStreamable("damaged")
        return original(self, k)

    monkeypatch.setattr(ChunkRows, "read", failing)
    report = _run(stack_meshes["a"], stack_meshes["b_planted"], monkeypatch)
    (bad,) = [r for r in report.mismatches if r.path.startswith("params/")]
    assert bad.stats.n_total == 3 * 64 * 128 and bad.stats.n_mismatch == 1 and bad.stats.first_indices == ((2, 5, 40),)
    assert [p for _, p in reads.tensorstore if list(p) == MLP]  # read again through tensorstore
@needs_libzstd
def test_a_layer_range_in_step_reports_those_layers_only(stack_meshes, monkeypatch, small_pieces):
    from pytest_ckptparity.diff import Selection, diff_views

    monkeypatch.delenv("CKPTPARITY_IN_STEP", raising=False)
    reads = _Reads(monkeypatch)
    # a layer range's common block is smaller (2 or 1 of the 3 layers): a smaller budget
    comparison = Comparison(stack_meshes["a"], stack_meshes["b_planted"], options=CompareOptions(read_budget=24 << 10))
    va, vb = comparison.views
    path = "params/decoder/layers/mlp/wi_0/kernel"
    for layers, fails in (((0, 2), False), ((2, 3), True)):
        reads.opened.clear()
        report = diff_views(va, vb, comparison.options, [Selection((path,), layers)])
        assert reads.opened and not reads.tensorstore  # read in step (its blocks would be slabs)
        (r,) = report.results
        assert r.layer_range == layers and r.stats.n_total == (layers[1] - layers[0]) * 64 * 128
        assert (r.kind is not None) == fails
        assert [d.layer for d in r.stats.layer_drift] == list(range(*layers))


def test_a_budget_too_small_for_batches_reads_slabs(stack_meshes, monkeypatch):
    """Without the small pieces, the chunks' input pieces and windows do not fit in 80 KiB:
    the plan keeps slabs, which still find the planted element."""
    reads = _Reads(monkeypatch)
    report = _run(stack_meshes["a"], stack_meshes["b_planted"], monkeypatch)
    assert not reads.opened
    (bad,) = [r for r in report.mismatches if r.path.startswith("params/")]
    assert bad.stats.first_indices == ((2, 5, 40),)


# budgets under twice the mlp kernels' common block (12 KiB a side between the two zarr3
# grids, 48 KiB against zarr v2's) that still hold the batches and every open chunk's input
@needs_libzstd
@pytest.mark.parametrize("a, b, budget", [("a_zarr3", "b_planted_zarr3", 20 << 10), ("a", "b_planted_zarr3", 48 << 10)])
def test_zarr3_as_maxtext_writes_it_is_read_in_step(stack_meshes, monkeypatch, small_pieces, a, b, budget):
    """Sharded zarr3 (MaxText's format; here chunks of at most 4 KiB, so the grids are finer),
    alone or against zarr v2: read in step at a budget that would otherwise need slabs, with
    the slabs' figures, and the planted element found."""
    reads = _Reads(monkeypatch)
    in_step = _run(stack_meshes[a], stack_meshes[b], monkeypatch, budget=budget)
    assert [p for _, p, _ in reads.opened if list(p) == MLP] and not [p for _, p in reads.tensorstore if list(p) == MLP]
    slabs = _run(stack_meshes[a], stack_meshes[b], monkeypatch, in_step=False, budget=budget)
    assert _figures(in_step) == _figures(slabs)
    (bad,) = [r for r in in_step.mismatches if r.path.startswith("params/")]
    assert bad.stats.n_mismatch == 1 and bad.stats.first_indices == ((2, 5, 40),)
@needs_libzstd
def test_every_chunk_of_maxtexts_own_checkpoints_decodes_as_tensorstore_reads_it(samples):
    """The sample checkpoints MaxText wrote (zarr3, sharded, zstd; float32 and bfloat16):
    every stored chunk of every array, decoded from the front, equals tensorstore's read."""
    checked = 0
    for name in ("maxtext_nnx_scan", "maxtext_decode_scan"):
        ckpt = OrbaxCheckpoint(samples[name])
        for path, info in ckpt.leaves().items():
            fmt = ckpt.row_format(path)
            if fmt is None:
                assert info.dtype == "str" or info.shape == ()  # scalars have no rows
                continue
            assert fmt.shards is not None and fmt.codec == "zstd"
            whole = ckpt.read(path).result()
            for coords in itertools.product(*(range(-(-n // c)) for n, c in zip(info.shape, fmt.chunk))):
                rows = ckpt.chunk_rows(path, coords, fmt)
                got = rows.read(fmt.chunk[0])
                region = tuple(slice(c * g, min(c * g + g, n)) for c, g, n in zip(coords, fmt.chunk, info.shape))
                np.testing.assert_array_equal(got[tuple(slice(0, r.stop - r.start) for r in region)], whole[region])
                checked += 1
    assert checked > 50


@pytest.mark.parametrize("value, expected", [("0", "rows in step: off (CKPTPARITY_IN_STEP=0)"), ("", zarr_rows.status())])
def test_the_command_says_whether_rows_are_read_in_step(value, expected):
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "pytest_ckptparity", "--version"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CKPTPARITY_IN_STEP": value})
    assert run.returncode == 0 and run.stdout.strip().endswith(f"; {expected})")
@needs_libzstd
def test_a_misspelt_in_step_switch_is_one_sentence(stack_meshes):
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "pytest_ckptparity", stack_meshes["a"], stack_meshes["b"]], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "CKPTPARITY_IN_STEP": "slabs"})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == "ckptparity: error: CKPTPARITY_IN_STEP must be 1 (read mismatched chunk grids row by row in step) or 0 (in slabs), got 'slabs'."
@needs_libzstd
def test_a_chunk_larger_than_the_budget_is_read_in_step(tmp_path, monkeypatch, small_pieces):
    """An array written from one device is one chunk: read whole, it would hold the chunk
    three times a side (stored bytes, decoded chunk, copy). When that is more than the
    budget, it is read in step too (zarr v2 against zarr3 here, so no stored bytes to
    compare first), with the figures tensorstore's reading gives."""
    from pytest_ckptparity import examples as ex

    w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    planted = w.copy()
    planted[37, 5] += 0.5
    a = ex.save(tmp_path / "a", {"params": {"w": w}}, step=0)
    b = ex.save(tmp_path / "b", {"params": {"w": planted}}, step=0, zarr3=True)
    reads = _Reads(monkeypatch)
    in_step = _run(a, b, monkeypatch, budget=20 << 10)  # one chunk a side read whole: 72 KiB
    assert sorted(side for side, _, _ in reads.opened) == ["A", "B"] and not reads.tensorstore
    whole = _run(a, b, monkeypatch, in_step=False, budget=20 << 10)
    assert _figures(in_step) == _figures(whole)
    (bad,) = in_step.mismatches
    assert bad.stats.n_mismatch == 1 and bad.stats.first_indices == ((37, 5),) and bad.stats.max_abs == pytest.approx(0.5)
    reads.opened.clear()
    assert _run(a, b, monkeypatch).mismatches  # the default budget holds it: read whole, as before
    assert not reads.opened
@needs_libzstd
def test_a_damaged_shard_index_is_reported_as_tensorstore_reports_it(stack_meshes, tmp_path, monkeypatch, small_pieces):
    """One shard index entry of B's stacked wi_0 pointing past any shard: the leaf falls back
    to tensorstore, which names the damage in one sentence (no traceback from the rows)."""
    import shutil
    import struct

    import tensorstore as ts

    from pytest_ckptparity.errors import CkptParityUsageError

    b = tmp_path / "b"
    shutil.copytree(stack_meshes["b_planted_zarr3"], b)
    item = b / "0" / "items"
    key = "params.params.decoder.layers.mlp.wi_0.kernel/c/0/0/0"
    value = bytes(ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}/"}).result().read(key).result().value)
    for f in item.rglob("d/*"):
        blob = f.read_bytes()
        at = blob.find(value)
        if at >= 0:  # orbax's zarr3: the index (16 bytes a chunk, then a crc32c) ends the shard
            start = at + len(value) - 20
            f.write_bytes(blob[:start] + struct.pack("<Q", 2**63 + 8) + blob[start + 8:])
            break
    else:
        pytest.fail("the shard's bytes were not found in OCDBT's data files")
    messages = []
    for in_step in (True, False):
        with pytest.raises(CkptParityUsageError) as err:
            _run(stack_meshes["a_zarr3"], str(b), monkeypatch, in_step=in_step, budget=20 << 10)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert "params.params.decoder.layers.mlp.wi_0.kernel" in messages[0] and "truncated or corrupt" in messages[0]
@needs_libzstd
def test_a_layer_range_that_starts_inside_a_chunk_is_read_in_step(tmp_path, monkeypatch, small_pieces):
    """rows in step over an extent that starts and ends inside chunks on the first stored
    axis (an NNX stack keeps its layers there): the chunks are skipped into and finished, and
    every element of the range is compared once, against the ground truth."""
    from pytest_ckptparity._model import Tolerance
    from pytest_ckptparity.kernel import _Accumulator, compare_stored_block
    from pytest_ckptparity.read_in_step import compare_in_step, plan_in_step

    rng = np.random.default_rng(0)
    data = rng.standard_normal((37, 11, 9)).astype("<f4")
    other = data.copy()
    other[12, 3, 4] += 1.0
    fmts, opens = [], []
    for name, values, chunks in (("a", data, (8, 11, 3)), ("b", other, (5, 4, 9))):
        _write_zarr(tmp_path / name, 2, "zstd", "<f4", values, chunks)
        import json

        fmt = row_format(json.loads((tmp_path / name / ".zarray").read_text()))
        fmts.append(fmt)
        opens.append(lambda coords, name=name, fmt=fmt: ChunkRows(fmt, _fetcher(tmp_path / name, ".".join(map(str, coords))), name))
    extent = (slice(3, 30), slice(0, 11), slice(2, 9))
    plan = plan_in_step(extent, fmts[0], fmts[1], 1 << 16)
    assert plan is not None and plan.batch_rows < 27
    seen = np.zeros(data.shape, int)
    acc = _Accumulator()

    def compare(a, b, region):
        np.testing.assert_array_equal(a, data[region])
        np.testing.assert_array_equal(b, other[region])
        seen[region] += 1
        compare_stored_block(a, b, Tolerance(1e-6, 1e-6), True, acc, tuple(s.start for s in region), None)

    compare_in_step(plan, opens[0], opens[1], compare, 2)
    assert (seen[extent] == 1).all() and seen.sum() == seen[extent].size
    stats = acc.stats()
    assert stats.n_total == 27 * 11 * 7 and stats.n_mismatch == 1 and stats.first_indices == ((12, 3, 4),)


def test_the_plan_allows_the_largest_zstd_window_its_budget_holds():
    """Rows in step count each open chunk's decoder at the window they allow: 8 MiB when the
    budget holds it, down to 2 MiB (what orbax's zstd levels need) for smaller budgets,
    and no plan below that; the batches take what is left."""
    big_a = RowFormat(np.dtype("<f4"), (128, 82, 1024), "zstd", None)  # 43 MB chunks, as the 3x benchmark's
    big_b = RowFormat(np.dtype("<f4"), (512, 82, 256), "zstd", None)
    extent = (slice(0, 512), slice(0, 82), slice(0, 2048))
    windows = {}
    for mib in (256, 96, 48, 40, 24):
        plan = read_in_step.plan_in_step(extent, big_a, big_b, mib << 20)
        windows[mib] = None if plan is None else plan.fmt_a.window_log
        if plan is not None:
            assert plan.held <= mib << 20 and plan.fmt_b.window_log == plan.fmt_a.window_log
    # 5 chunks open (one of A's, four of B's): 4 MiB of input each, plus the decoder's window
    assert windows == {256: 23, 96: 23, 48: 22, 40: 21, 24: None}


def test_a_zstd_frame_needing_a_larger_window_than_allowed_is_not_streamable(tmp_path):
    values = np.random.default_rng(0).standard_normal((256, 4096)).astype("<f4")  # 4 MiB: a 2 MiB window at level 3
    _, meta = _write_zarr(tmp_path / "w", 2, "zstd", "<f4", values, (256, 4096))
    fetch = _fetcher(tmp_path / "w", "0.0")
    fmt = row_format(meta)
    if fmt is None:
        pytest.skip("no system libzstd")
    np.testing.assert_array_equal(ChunkRows(fmt.with_window_log(21), fetch, "w").read(256), values)
    with pytest.raises(NotStreamable):
        ChunkRows(fmt.with_window_log(20), fetch, "w").read(256)
