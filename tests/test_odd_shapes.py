"""SDXL-structured models whose proportions are not SDXL's convert in every direction, bit for bit.

Built with the real diffusers / transformers classes: non-monotonic channels (32, 96, 64), a time embedding
(100) equal to no channel count, odd head counts, a conv-projection refiner.
Each goes diffusers -> SD -> ckpt -> SD; the SD file is also converted with its metadata stripped (a community
file: the architecture comes from the shapes alone).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdxl_ckpt.cli import main

pytest.importorskip("diffusers")
ms = pytest.importorskip("mindspore")

NAMES = ("odd", "odd-refiner")  # the SSD-1B- and Vega-like depths: tests/test_variants.py


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory) -> dict[str, Path]:
    from sdxl_ckpt.convert.diffusers_to_sd import convert_diffusers_to_sd
    from sdxl_ckpt.testmodels.tiny import build_shape_model

    folder = tmp_path_factory.mktemp("odd")
    out = {}
    for name in NAMES:
        pipe = build_shape_model(name, folder / name)
        out[name] = folder / f"{name}.safetensors"
        convert_diffusers_to_sd(pipe, out[name])
    return out


def _run(args, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _same(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert list(x) and set(x) == set(y)
    for key, array in x.items():
        assert y[key].dtype == array.dtype and y[key].tobytes() == array.tobytes(), key


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("metadata", [True, False])
def test_round_trip(sd_files, tmp_path, capsys, name, metadata):
    sd = sd_files[name]
    if not metadata:
        stripped = tmp_path / "community.safetensors"
        tensors = load_file(sd)
        save_file(dict(reversed(list(tensors.items()))), stripped)  # keys in another order, no metadata
        sd = stripped
    ckpt, back = tmp_path / "m.ckpt", tmp_path / "back.safetensors"
    rc, out, err = _run(["st-to-ms", sd, "-o", ckpt, "-q"], capsys)
    assert rc == 0, err
    assert "checked exactly" in out
    assert ("SDXL convention" in out) != metadata  # head counts: from metadata, or by the 64-channel convention
    rc, _out, err = _run(["ms-to-st", ckpt, "-o", back, "-q"], capsys)
    assert rc == 0, err
    _same(sd, back)
    loaded = ms.load_checkpoint(str(ckpt))
    original = load_file(sd)
    assert len(loaded) == len(original)  # every tensor, position_ids included (int32, as mindone declares it)
    assert all(np.array_equal(loaded[k].asnumpy(), original[k]) for k in loaded if k in original)


def test_a_shape_that_does_not_fit_is_named(sd_files, tmp_path, capsys):
    tensors = load_file(sd_files["odd"])
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_k.weight"
    tensors[key] = np.zeros((96, 97), np.float32)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad)
    rc, _out, err = _run(["st-to-ms", bad, "-o", tmp_path / "x.ckpt", "-q"], capsys)
    assert rc == 2 and repr(key) in err and "[96, 96]" in err
    assert not (tmp_path / "x.ckpt").exists()
