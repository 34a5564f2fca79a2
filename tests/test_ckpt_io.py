"""The streaming .ckpt writer and reader against MindSpore itself: same bytes as save_checkpoint, same arrays as
load_checkpoint, records split like MindSpore's, and corrupt files rejected with the file and key named."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdxl_ckpt.errors import CorruptFileError, InputError, OutputExistsError
from sdxl_ckpt.formats import ckpt_io
from sdxl_ckpt.formats.ckpt_io import checkpoint_class, record_header, scan_ckpt, verify_crc, write_ckpt
from sdxl_ckpt.formats.dtypes import cast_array
from sdxl_ckpt.formats.entries import TensorEntry, entry_from_array

ms = pytest.importorskip("mindspore")

RNG = np.random.default_rng(0)
F32 = RNG.standard_normal((5, 7)).astype(np.float32)
TENSORS = {  # name -> (storage array, safetensors dtype)
    "model.a.weight": (RNG.standard_normal((3, 4)).astype(np.float16), "F16"),
    "model.b.bias": (RNG.standard_normal(200).astype(np.float32), "F32"),
    "pos.position_ids": (np.arange(77, dtype=np.int64)[None], "I64"),
    "logit_scale": (np.array(4.6052, dtype=np.float32), "F32"),  # 0-d, as in the SD layout
    "x" * 300: (RNG.standard_normal((2, 2, 3, 3)).astype(np.float32), "F32"),  # tag length needs a 2-byte varint
    "bf": (cast_array(F32, "F32", "BF16"), "BF16"),
}


def _ms_params() -> dict:
    out = {}
    for name, (array, dtype) in TENSORS.items():
        tensor = ms.Tensor(F32).astype(ms.bfloat16) if dtype == "BF16" else ms.Tensor(array)
        out[name] = ms.Parameter(tensor, name=name)
    return out


def _entries() -> list[TensorEntry]:
    return [entry_from_array(name, array, dtype) for name, (array, dtype) in TENSORS.items()]


@pytest.mark.parametrize("crc", [False, True])
def test_bytes_equal_save_checkpoint(tmp_path, crc):
    ms.save_checkpoint(_ms_params(), str(tmp_path / "ms.ckpt"), crc_check=crc)
    write_ckpt(tmp_path / "ours.ckpt", _entries(), crc=crc)
    assert (tmp_path / "ours.ckpt").read_bytes() == (tmp_path / "ms.ckpt").read_bytes()


def test_bf16_bits_equal_mindspore_cast():
    # our F32 -> BF16 rounding equals MindSpore's: the bit patterns saved above are MindSpore's own
    ours = cast_array(F32, "F32", "BF16")
    theirs = ms.Tensor(F32).astype(ms.bfloat16).astype(ms.float32).asnumpy().view(np.uint32) >> 16
    assert np.array_equal(ours, theirs.astype(np.uint16))


def test_scan_and_load_equal_load_checkpoint(tmp_path):
    path = tmp_path / "ms.ckpt"
    ms.save_checkpoint(_ms_params(), str(path), crc_check=True)
    ckpt = scan_ckpt(path)
    reference = ms.load_checkpoint(str(path))
    assert [e.name for e in ckpt.entries] == list(TENSORS)
    assert ckpt.crc is not None and verify_crc(ckpt)
    for entry in ckpt.entries:
        array, dtype = TENSORS[entry.name]
        assert (entry.dtype, entry.shape) == (dtype, array.shape)
        loaded = entry.load()
        assert loaded.dtype == array.dtype and np.array_equal(loaded, array)
        expect = reference[entry.name]
        if dtype == "BF16":
            expect = expect.astype(ms.float32).asnumpy().view(np.uint32) >> 16
        else:
            expect = expect.asnumpy()
        assert np.array_equal(loaded, expect)


def test_ours_loads_in_mindspore(tmp_path):
    write_ckpt(tmp_path / "ours.ckpt", _entries())
    loaded = ms.load_checkpoint(str(tmp_path / "ours.ckpt"))
    assert list(loaded) == list(TENSORS)
    for name, (array, dtype) in TENSORS.items():
        if dtype != "BF16":
            assert np.array_equal(loaded[name].asnumpy(), array)


@pytest.mark.parametrize("content_len", [0, 1, 127, 128, 16383, 16384, 2**21 + 3])
def test_record_header_equals_protobuf_class(content_len):
    content = bytes(range(256)) * (content_len // 256) + bytes(content_len % 256)
    dims = [content_len, 1, 300, 2**40]
    message = checkpoint_class()()
    value = message.value.add()
    value.tag = "n" * (content_len % 200 + 1)
    value.tensor.dims.extend(dims)
    value.tensor.tensor_type = "UInt8"
    value.tensor.tensor_content = content
    assert record_header(value.tag, dims, "UInt8", content_len) + content == message.SerializeToString()


def test_split_records_like_mindspore(tmp_path, monkeypatch):
    """save_checkpoint cuts a tensor into 512 MiB records; with the slice shrunk to 1 KiB on both sides the files
    (12 records for one tensor) must still be identical and read back whole."""
    from mindspore.train import serialization

    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)  # KiB
    monkeypatch.setattr(ckpt_io, "SLICE_BYTES", 1024)
    big = RNG.standard_normal((30, 100)).astype(np.float32)  # 12000 bytes -> 12 records
    params = {
        "big": ms.Parameter(ms.Tensor(big), name="big"),
        "small": ms.Parameter(ms.Tensor(big[0, :3]), name="small"),
    }
    ms.save_checkpoint(params, str(tmp_path / "ms.ckpt"))
    write_ckpt(tmp_path / "ours.ckpt", [entry_from_array("big", big), entry_from_array("small", big[0, :3])])
    assert (tmp_path / "ours.ckpt").read_bytes() == (tmp_path / "ms.ckpt").read_bytes()
    ckpt = scan_ckpt(tmp_path / "ours.ckpt")
    assert ckpt.records == 13 and [e.name for e in ckpt.entries] == ["big", "small"]
    assert np.array_equal(ckpt.entries[0].load(), big)
    assert np.array_equal(ms.load_checkpoint(str(tmp_path / "ours.ckpt"))["big"].asnumpy(), big)


def test_loader_reads_only_its_record(tmp_path):
    path = tmp_path / "x.ckpt"
    write_ckpt(path, _entries())
    ckpt = scan_ckpt(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # inside the last record's content
    path.write_bytes(bytes(raw))
    first = ckpt.entries[0]
    assert np.array_equal(first.load(), TENSORS[first.name][0])


def test_writer_refuses_and_leaves_nothing(tmp_path):
    out = tmp_path / "x.ckpt"
    with pytest.raises(InputError, match="zero-size"):
        write_ckpt(out, [entry_from_array("e", np.zeros((0, 3), np.float32))])
    with pytest.raises(InputError, match="same output name"):
        write_ckpt(out, [entry_from_array("a", F32), entry_from_array("a", F32)])

    def boom() -> np.ndarray:
        raise RuntimeError("source vanished")

    with pytest.raises(RuntimeError):
        write_ckpt(out, [entry_from_array("a", F32), TensorEntry("b", "F32", (2,), boom)])
    assert list(tmp_path.iterdir()) == []
    write_ckpt(out, [entry_from_array("a", F32)])
    with pytest.raises(OutputExistsError):
        write_ckpt(out, [entry_from_array("a", F32)])


@pytest.mark.timeout(60)
def test_truncation_names_file_and_key(tmp_path):
    path = tmp_path / "x.ckpt"
    write_ckpt(path, _entries())
    raw = path.read_bytes()
    cut_path = tmp_path / "cut.ckpt"
    for name, start, end in scan_ckpt(path).spans:
        for cut in (start + 1, start + 6, (start + end) // 2, end - 1):
            cut_path.write_bytes(raw[:cut])
            with pytest.raises(CorruptFileError) as info:
                scan_ckpt(cut_path)
            assert str(cut_path) in str(info.value)
            if cut >= start + 6 + len(name):  # the tag has been read: the message names it
                assert repr(name) in str(info.value), (cut, str(info.value))
        # a cut exactly at a record boundary is a valid, shorter ckpt: the keymap check reports what is missing
        cut_path.write_bytes(raw[:end])
        assert scan_ckpt(cut_path).entries[-1].name == name


def test_not_a_ckpt(tmp_path):
    for name, data in (("json.ckpt", b'{"a": 1}' * 10), ("zeros.ckpt", bytes(64)), ("st.ckpt", b"\x08" + bytes(40))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CorruptFileError, match="ckpt|truncated"):
            scan_ckpt(tmp_path / name)
    with pytest.raises(InputError, match="no such file"):
        scan_ckpt(tmp_path / "missing.ckpt")


def test_crc_mismatch_detected(tmp_path):
    path = tmp_path / "x.ckpt"
    write_ckpt(path, _entries(), crc=True)
    raw = bytearray(path.read_bytes())
    raw[40] ^= 0x01  # inside the first record's content
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="crc32 mismatch"):
        verify_crc(scan_ckpt(path))


@pytest.mark.timeout(120)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_fail_cleanly(tmp_path, data):
    """Any byte changes: scanning and loading either succeed or raise CorruptFileError; never hang or crash."""
    path = tmp_path / "m.ckpt"
    if not path.exists():
        write_ckpt(path, _entries())
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(1, len(raw)))]
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(bytes(raw))
    try:
        ckpt = scan_ckpt(bad)
    except CorruptFileError:
        return
    for entry in ckpt.entries:
        try:
            array = entry.load()
        except CorruptFileError:
            continue
        assert array.shape == entry.shape
