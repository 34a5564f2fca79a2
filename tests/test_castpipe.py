"""The chunked cast: pieces cast on worker threads and written as they come give exactly the whole-tensor bytes."""

from __future__ import annotations

import numpy as np
import pytest

from sdxl_ckpt.formats import castpipe, ckpt_io
from sdxl_ckpt.formats import workers as workers_module
from sdxl_ckpt.formats.ckpt_io import write_ckpt
from sdxl_ckpt.formats.dtypes import cast_array
from sdxl_ckpt.formats.entries import entry_from_array
from sdxl_ckpt.formats.safetensors_io import write_safetensors


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 1,000 elements, streaming from 4 KB: tiny arrays take the pipelined path."""
    monkeypatch.setattr(castpipe, "PIECE_ELEMENTS", 1000)
    monkeypatch.setattr(castpipe, "STREAM_MIN_BYTES", 4000)


def _values(dtype: str, n: int = 10_007) -> np.ndarray:
    rng = np.random.default_rng(3)
    values = (rng.standard_normal(n) * 1e3).astype(np.float32)
    values[[5, n // 5, n - 8]] = [np.inf, -np.inf, np.nan]
    values[n // 3] = 1e-7  # subnormal in fp16
    return cast_array(values, "F32", dtype)


@pytest.mark.parametrize(("src", "dst"), [("F16", "F32"), ("F32", "BF16"), ("BF16", "F32"), ("F32", "F16")])
def test_pieces_join_to_the_whole_cast(small_pieces, src, dst):
    array = _values(src).reshape(-1, 1)[:10_000].reshape(100, 100)
    entry = castpipe.cast_entry(entry_from_array("t", array, src), "t", dst)
    assert entry.streamed_pieces is not None
    joined = b"".join(bytes(p) for p in entry.streamed_pieces())
    assert joined == cast_array(array, src, dst).tobytes() == entry.load().tobytes()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_threaded_widening_is_the_whole_widening(monkeypatch, workers):
    """Every half value (NaN payloads, subnormals, Inf), split over the workers at uneven edges, in any shape."""
    monkeypatch.setattr(workers_module, "worker_count", lambda: workers)
    monkeypatch.setattr(workers_module, "SPLIT_MIN_BYTES", 1024)
    every_half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    values = np.concatenate([every_half, every_half[:12_346]]).reshape(-1, 7)  # 77,882 elements
    widened = castpipe.widen_half_threaded(values)
    assert widened.shape == values.shape and widened.flags.c_contiguous
    assert np.array_equal(widened.view(np.uint32), values.astype(np.float32).view(np.uint32))
    strided = values[:, ::3]
    expected = strided.astype(np.float32).view(np.uint32)
    assert np.array_equal(castpipe.widen_half_threaded(strided).view(np.uint32), expected)


@pytest.mark.parametrize("workers", [1, 2])
def test_widening_straight_from_a_file(monkeypatch, tmp_path, workers):
    """``widen_half_span`` reads the tensor at its offset in chunks (a last short one included) on the workers."""
    from sdxl_ckpt.errors import CorruptFileError

    monkeypatch.setattr(workers_module, "worker_count", lambda: workers)
    monkeypatch.setattr(workers_module, "SPLIT_MIN_BYTES", 1024)
    monkeypatch.setattr(castpipe, "CHUNK_ELEMENTS", 1000)
    every_half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    values = every_half[: 3 * 5 * 1303].reshape(3, 5, 1303)
    path = tmp_path / "t.bin"
    path.write_bytes(b"0123456" + values.tobytes() + b"tail")
    out = np.full(values.shape, np.nan, dtype=np.float32)
    assert castpipe.widen_half_span(path, 7, out, "t") is out
    assert np.array_equal(out.view(np.uint32), values.astype(np.float32).view(np.uint32))
    path.write_bytes(b"0123456" + values.tobytes()[:-10])
    with pytest.raises(CorruptFileError, match="truncated"):
        castpipe.widen_half_span(path, 7, out, "t")


def test_small_tensors_are_cast_whole():
    entry = castpipe.cast_entry(entry_from_array("t", np.ones(10, np.float16)), "t", "F32")
    assert entry.streamed_pieces is None and entry.load().dtype == np.float32


@pytest.mark.parametrize("crc", [False, True])
def test_ckpt_records_from_pieces_equal_the_whole_array_path(small_pieces, monkeypatch, tmp_path, crc):
    monkeypatch.setattr(ckpt_io, "SLICE_BYTES", 6000)  # records end inside pieces and pieces inside records
    arrays = {"a": _values("F16", 7_001), "b": _values("F16", 3_000).reshape(30, 100), "c": _values("F16", 10)}
    src = [entry_from_array(k, v, "F16") for k, v in arrays.items()]
    streamed = [castpipe.cast_entry(e, e.name, "F32") for e in src]
    whole = [entry_from_array(e.name, cast_array(arrays[e.name], "F16", "F32")) for e in src]
    assert [e.streamed_pieces is not None for e in streamed] == [True, True, False]
    write_ckpt(tmp_path / "streamed.ckpt", streamed, crc=crc)
    write_ckpt(tmp_path / "whole.ckpt", whole, crc=crc)
    assert (tmp_path / "streamed.ckpt").read_bytes() == (tmp_path / "whole.ckpt").read_bytes()


def test_safetensors_from_pieces_and_one_warning_per_tensor(small_pieces, tmp_path, capsys):
    array = _values("F16")
    streamed = castpipe.cast_entry(entry_from_array("w", array, "F16"), "w", "F32")
    write_safetensors(tmp_path / "s.safetensors", [streamed])
    write_safetensors(tmp_path / "w.safetensors", [entry_from_array("w", cast_array(array, "F16", "F32"))])
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "w.safetensors").read_bytes()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: key 'w': 1 NaN, 2 Inf values (written as they are)"] * 2  # streamed, then whole
