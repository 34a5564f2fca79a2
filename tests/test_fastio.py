"""fastio: memory-mapped tensor views, in-kernel span copies with a write fallback, the ordered worker thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sdxl_ckpt.errors import CorruptFileError
from sdxl_ckpt.formats import fastio
from sdxl_ckpt.formats.entries import entry_from_array
from sdxl_ckpt.formats.safetensors_io import read_safetensors, write_safetensors


def test_map_bytes_is_a_read_only_view_and_checks_the_size(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(bytes(range(256)) * 40)
    view = fastio.map_bytes(path, 5000, 300, "k")
    assert bytes(view) == (bytes(range(256)) * 40)[5000:5300] and not view.flags.writeable
    assert fastio.map_bytes(path, 10, 0, "k").size == 0
    with pytest.raises(CorruptFileError, match="truncated: expected 300 bytes, got 240"):
        fastio.map_bytes(path, 10000, 300, "k")


@pytest.mark.parametrize("kernel", [True, False])
def test_span_copy_gives_the_same_bytes_with_or_without_the_kernel(tmp_path, monkeypatch, kernel):
    if not kernel:  # a filesystem pair copy_file_range cannot handle: every byte goes through write()

        def refuse(*args, **kwargs):
            raise OSError(fastio.errno.EXDEV, "cross-device")

        monkeypatch.setattr(fastio.os, "copy_file_range", refuse)
    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.standard_normal((i + 1, 700)).astype(np.float16) for i in range(6)}
    arrays["s"] = np.array(1.5, dtype=np.float32)
    src = tmp_path / "src.safetensors"
    write_safetensors(src, [entry_from_array(k, v) for k, v in arrays.items()])
    source = read_safetensors(src)
    assert all(e.span is not None for e in source.entries)
    write_safetensors(tmp_path / "copy.safetensors", source.entries)
    assert (tmp_path / "copy.safetensors").read_bytes() == src.read_bytes()
    with open(tmp_path / "part.bin", "wb") as handle:
        handle.write(b"head")
        copied = fastio.copy_span(handle, src, 8, 100)
        assert copied == (100 if kernel else 0)
        handle.write(src.read_bytes()[8 + copied : 108])
    assert (tmp_path / "part.bin").read_bytes() == b"head" + src.read_bytes()[8:108]


def test_background_runs_in_order_and_reports_errors():
    seen: list[int] = []
    with fastio.Background() as worker:
        for i in range(50):
            worker.put(seen.append, i)
    assert seen == list(range(50))

    def boom(_: int) -> None:
        raise ValueError("worker failed")

    worker = fastio.Background()
    worker.put(boom, 1)
    with pytest.raises(ValueError, match="worker failed"):
        worker.close()
    before = threading.active_count()
    with pytest.raises(KeyError), fastio.Background() as worker:
        worker.put(seen.append, 99)
        raise KeyError("caller failed")
    assert threading.active_count() <= before  # the thread ended with the failed block
