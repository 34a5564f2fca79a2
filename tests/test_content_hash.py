"""``--hash``: the conversions' content hash is what ``inspect --hash`` computes for the written file, and asking for
it changes no tensor byte; without it nothing is hashed and no stale ModelSpec hash is carried over."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from sdxl_ckpt.convert.diffusers_to_sd import convert_diffusers_to_sd
from sdxl_ckpt.convert.sd_ms import ms_to_st, st_to_ms
from sdxl_ckpt.formats.ckpt_io import scan_ckpt
from sdxl_ckpt.formats.digest import MODELSPEC_HASH, ContentDigest
from sdxl_ckpt.formats.entries import TensorEntry, entry_from_array
from sdxl_ckpt.formats.safetensors_io import read_safetensors, write_safetensors
from sdxl_ckpt.manage.hashing import hash_entries, hash_safetensors


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


@pytest.fixture(scope="module")
def sd_file(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hash") / "base.safetensors"
    convert_diffusers_to_sd(tiny_base, out)
    return out


def test_diffusers_to_sd_hash_is_the_modelspec_hash_and_changes_no_tensor_byte(tiny_base, sd_file, tmp_path):
    hashed = tmp_path / "hashed.safetensors"
    report = convert_diffusers_to_sd(tiny_base, hashed, hash_content=True)
    header, data = _split(hashed)
    plain_header, plain_data = _split(sd_file)
    assert data == plain_data
    expected = "0x" + hashlib.sha256(data).hexdigest()
    assert report["content_sha256"] == header["__metadata__"][MODELSPEC_HASH] == expected
    assert hash_safetensors(read_safetensors(hashed)).content_sha256 == expected
    assert MODELSPEC_HASH not in plain_header["__metadata__"]
    assert {k: v for k, v in header.items() if k != "__metadata__"} == {
        k: v for k, v in plain_header.items() if k != "__metadata__"
    }


def test_st_to_ms_hash_equals_inspect_hash_of_the_ckpt(sd_file, tmp_path):
    plain, hashed = tmp_path / "plain.ckpt", tmp_path / "hashed.ckpt"
    assert st_to_ms(sd_file, plain)["content_sha256"] is None
    report = st_to_ms(sd_file, hashed, hash_content=True)
    assert hashed.read_bytes() == plain.read_bytes()  # a ckpt has no header: the hash lives in the report only
    assert report["content_sha256"] == hash_entries(scan_ckpt(hashed).entries).content_sha256


def test_ms_to_st_hash_and_round_trip(sd_file, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    st_to_ms(sd_file, ckpt)
    plain, hashed = tmp_path / "plain.safetensors", tmp_path / "hashed.safetensors"
    ms_to_st(ckpt, plain)
    report = ms_to_st(ckpt, hashed, hash_content=True)
    header, data = _split(hashed)
    assert data == _split(plain)[1] == _split(sd_file)[1]
    assert report["content_sha256"] == header["__metadata__"][MODELSPEC_HASH] == "0x" + hashlib.sha256(data).hexdigest()


def test_st_to_ms_safetensors_drops_the_sources_modelspec_hash(sd_file, tmp_path):
    source = tmp_path / "with-hash.safetensors"
    original = read_safetensors(sd_file)
    write_safetensors(
        source,
        original.entries,
        {**original.metadata, MODELSPEC_HASH: "0x" + "ab" * 32},
    )
    plain, hashed = tmp_path / "ms.safetensors", tmp_path / "ms-hashed.safetensors"
    st_to_ms(source, plain, fmt="safetensors")
    assert MODELSPEC_HASH not in read_safetensors(plain).metadata  # it described the source's bytes, not these
    report = st_to_ms(source, hashed, fmt="safetensors", hash_content=True)
    stored = read_safetensors(hashed).metadata[MODELSPEC_HASH]
    assert stored == report["content_sha256"] == "0x" + hashlib.sha256(_split(hashed)[1]).hexdigest()


def test_a_failed_write_ends_the_hash_thread_and_leaves_no_file(tmp_path):
    def broken() -> np.ndarray:
        raise OSError("disk went away")

    entries = [
        entry_from_array("a", np.ones((600, 600), dtype=np.float32)),  # 1.4 MB: hashed on the worker thread
        TensorEntry("b", "F32", (4,), broken),
    ]
    before = threading.active_count()
    with pytest.raises(OSError, match="disk went away"), ContentDigest() as digest:
        write_safetensors(tmp_path / "out.safetensors", entries, digest=digest)
    assert threading.active_count() <= before
    assert list(tmp_path.iterdir()) == []
