"""Core streaming IO against the safetensors library itself, atomic outputs, and the float-only casts."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdxl_ckpt.errors import CorruptFileError, OutputExistsError
from sdxl_ckpt.formats.atomic import atomic_output
from sdxl_ckpt.formats.dtypes import cast_array, target_dtype, to_float32
from sdxl_ckpt.formats.entries import entry_from_array
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
