"""Core streaming IO against the safetensors library itself, atomic outputs, and the float-only casts."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdxl_ckpt.errors import CorruptFileError, OutputExistsError
from sdxl_ckpt.formats import halfwiden, nonfinite
from sdxl_ckpt.formats.atomic import atomic_output
from sdxl_ckpt.formats.dtypes import ST_TO_NUMPY, cast_array, target_dtype, to_float32
from sdxl_ckpt.formats.entries import entry_from_array
from sdxl_ckpt.formats.nonfinite import count_nonfinite
from sdxl_ckpt.formats.safetensors_io import read_safetensors, write_safetensors

TENSORS = {
    "b.weight": np.arange(6, dtype=np.float16).reshape(2, 3),
    "a.weight": np.linspace(-1, 1, 5, dtype=np.float32),
    "pos": np.arange(77, dtype=np.int64)[None],
    "flag": np.ones(3, dtype=np.uint8),
    "empty": np.zeros((0, 4), dtype=np.float32),
}
META = {"modelspec.title": "x", "a": "b"}
ONE_META = {"modelspec.title": "x"}  # the library writes metadata from a hash map: order is only fixed for one key


def test_writer_bytes_equal_library(tmp_path):
    save_file(TENSORS, tmp_path / "lib.safetensors", metadata=ONE_META)
    write_safetensors(tmp_path / "ours.safetensors", [entry_from_array(k, v) for k, v in TENSORS.items()], ONE_META)
    assert (tmp_path / "lib.safetensors").read_bytes() == (tmp_path / "ours.safetensors").read_bytes()


def test_reader_matches_library(tmp_path):
    save_file(TENSORS, tmp_path / "lib.safetensors", metadata=META)
    parsed = read_safetensors(tmp_path / "lib.safetensors")
    assert parsed.metadata == META
    reference = load_file(tmp_path / "lib.safetensors")
    assert set(parsed.by_name()) == set(reference)
    for entry in parsed.entries:
        got = entry.load()
        assert got.dtype == reference[entry.name].dtype and got.tobytes() == reference[entry.name].tobytes()


@pytest.mark.parametrize("cut", [3, 12, -1])
def test_truncated_file_is_corrupt(tmp_path, cut):
    save_file(TENSORS, tmp_path / "lib.safetensors")
    data = (tmp_path / "lib.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:cut])
    with pytest.raises(CorruptFileError, match="cut.safetensors"):
        read_safetensors(tmp_path / "cut.safetensors")


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_output(target) as handle:
        handle.write(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_refuses_existing(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"keep")
    with pytest.raises(OutputExistsError), atomic_output(target) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"keep"
    with atomic_output(target, overwrite=True) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new"


def test_casts_touch_floats_only():
    assert target_dtype("I64", "F16") == "I64"
    assert target_dtype("F32", "F16") == "F16"
    assert target_dtype("F16", None) == "F16"


def test_bf16_round_trip_matches_torch_rounding():
    torch = pytest.importorskip("torch")
    values = np.array([1.0, -2.5, 3.14159, 1e-3, 65504.0, 1.00390625, np.inf], dtype=np.float32)
    bits = cast_array(values, "F32", "BF16")
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bits, expected)
    assert np.array_equal(to_float32(bits, "BF16"), torch.from_numpy(values).to(torch.bfloat16).float().numpy())


def test_bf16_cast_keeps_scalars_scalar():
    assert cast_array(np.array(4.6052, dtype=np.float32), "F32", "BF16").shape == ()


def test_half_widening_is_bit_identical_for_every_half_value():
    every_half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    expected = every_half.astype(np.float32).view(np.uint32)  # numpy's own conversion: NaN payloads included
    assert np.array_equal(cast_array(every_half, "F16", "F32").view(np.uint32), expected)
    assert np.array_equal(to_float32(every_half, "F16").view(np.uint32), expected)


@pytest.mark.parametrize("shape", [(), (0, 3), (3, 1, 5), (3, 50, 60), (2 * halfwiden.CHUNK_ELEMENTS + 7,)])
def test_half_widening_keeps_shapes_across_chunk_edges(shape):
    values = np.random.default_rng(1).standard_normal(shape).astype(np.float16)
    if values.size > halfwiden.CHUNK_ELEMENTS:  # specials in a later chunk, and at the very end
        values.reshape(-1)[[halfwiden.CHUNK_ELEMENTS + 3, -1]] = [np.inf, -np.nan]
    widened = halfwiden.widen_half(values)
    assert widened.shape == shape and widened.dtype == np.float32 and widened.flags.c_contiguous
    assert np.array_equal(widened.view(np.uint32), values.astype(np.float32).view(np.uint32))
    strided = values[..., ::2] if values.ndim else values
    assert np.array_equal(halfwiden.widen_half(strided).view(np.uint32), strided.astype(np.float32).view(np.uint32))


def test_half_widening_into_slices_of_a_larger_result():
    values = np.random.default_rng(2).standard_normal(3 * halfwiden.CHUNK_ELEMENTS + 11).astype(np.float16)
    out = np.full(values.size, np.nan, dtype=np.float32)
    cut = halfwiden.CHUNK_ELEMENTS + 5
    for part in (slice(0, cut), slice(cut, None)):
        assert halfwiden.widen_half(values[part], out=out[part]).base is not None
    assert np.array_equal(out, values.astype(np.float32))
    small = values[:10].reshape(2, 5)  # numpy's conversion below BITS_MIN_ELEMENTS, into out as well
    assert np.array_equal(halfwiden.widen_half(small, out=np.empty(10, np.float32)), small.astype(np.float32))
    for wrong in (np.empty(9, np.float32), np.empty(10, np.float64), np.empty(20, np.float32)[::2]):
        with pytest.raises(ValueError):
            halfwiden.widen_half(small, out=wrong)


def test_half_widening_falls_back_where_subnormals_would_flush(monkeypatch):
    monkeypatch.setattr(halfwiden, "_subnormals_survive", lambda: False)
    monkeypatch.setattr(halfwiden, "_REBIAS", None)  # the bit path would fail outright if it were taken
    values = np.resize(np.array([6e-8, -6e-8, 1.0], dtype=np.float16), halfwiden.BITS_MIN_ELEMENTS)
    assert np.array_equal(halfwiden.widen_half(values), values.astype(np.float32))


@pytest.mark.parametrize("dtype", ["F32", "F64"])
@pytest.mark.parametrize("where", [0, 5, nonfinite.CHUNK_ELEMENTS, -1])
def test_float_nonfinite_counts_through_the_reduction_shortcut(dtype, where):
    values = np.random.default_rng(2).standard_normal(2 * nonfinite.CHUNK_ELEMENTS + 11).astype(ST_TO_NUMPY[dtype])
    assert count_nonfinite(values, dtype) == nonfinite.NonFinite()
    values[[where, 1]] = [np.nan, np.inf]
    values[2] = -np.inf
    assert count_nonfinite(values, dtype) == nonfinite.NonFinite(nan=1, inf=2)
    huge = np.array([np.finfo(values.dtype).max, -np.finfo(values.dtype).max], values.dtype)  # extremes, still finite
    assert count_nonfinite(huge, dtype) == nonfinite.NonFinite()


def test_a_reread_header_is_reused_only_while_its_bytes_and_size_are_the_same(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": np.zeros(4, np.float16), "b": np.ones(2, np.float32)}, path)
    first = read_safetensors(path)
    first.entries.clear()  # a caller's edits to its containers never reach the next caller
    first.metadata["x"] = "y"
    again = read_safetensors(path)
    assert [e.name for e in again.entries] == ["b", "a"] and again.metadata == {}
    renamed = path.read_bytes().replace(b'"a"', b'"c"')  # the same size, another header
    path.write_bytes(renamed)
    assert [e.name for e in read_safetensors(path).entries] == ["b", "c"]
    path.write_bytes(renamed + b"\0" * 8)  # one more tensor's worth of bytes: the size is part of the identity
    assert read_safetensors(path).file_size == len(renamed) + 8


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_nonfinite_by_bits_counts_every_pattern(dtype):
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    exponent = 0x7C00 if dtype == "F16" else 0x7F80
    magnitude = every & 0x7FFF
    expected = nonfinite.NonFinite(
        nan=int(np.count_nonzero(magnitude > exponent)), inf=int(np.count_nonzero(magnitude == exponent))
    )
    assert expected.inf == 2
    held = every.view(np.float16) if dtype == "F16" else every
    assert count_nonfinite(held, dtype) == expected
    finite = every[magnitude < exponent]
    for value in (exponent, exponent | 0x8000, exponent + 1, 0xFFFF):  # each special alone among finite values
        mixed = np.concatenate([finite, np.array([value], np.uint16)])
        assert count_nonfinite(mixed, dtype), hex(value)
    assert count_nonfinite(finite, dtype) == nonfinite.NonFinite()
