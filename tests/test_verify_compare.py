"""The comparison routine, tolerances and the reference file format, without any model (fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdxl_ckpt.errors import CorruptFileError, InputError, OutputExistsError
from sdxl_ckpt.formats.reference_npz import REQUIRED, Reference, load_reference, save_reference
from sdxl_ckpt.verify.compare import Tolerances, compare, metrics, parse_overrides, to_uint8


def test_metrics_closed_forms():
    b = np.array([3.0, 4.0])
    assert metrics(b, b) == (0.0, 0.0, 1.0)
    rel, max_abs, cos = metrics(np.array([3.0, 4.5]), b)
    assert rel == pytest.approx(0.5 / 5) and max_abs == pytest.approx(0.5)
    assert cos == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))
    assert metrics(-b, b)[2] == pytest.approx(-1.0)
    assert metrics(np.zeros(2), np.zeros(2)) == (0.0, 0.0, 1.0)


def test_stage_passes_within_tolerance_only():
    tol = Tolerances("fp32")
    ref = np.linspace(1, 2, 100)
    assert compare("context", "context", ref * (1 + 5e-5), ref, tol).passed
    bad = compare("context", "context", ref * (1 + 2e-4), ref, tol)
    assert not bad.passed and bad.rel_l2 == pytest.approx(2e-4, rel=1e-3)
    nan = compare("context", "context", ref * np.nan, ref, tol)
    assert not nan.passed


def test_wrong_shape_or_missing_result_fails_with_a_note():
    tol = Tolerances("fp32")
    r = compare("y", "y", np.zeros((1, 3)), np.zeros((2, 3)), tol)
    assert not r.passed and "shape [1, 3]" in r.note
    assert r.row()["rel_l2"] is None and r.row()["ok"] == "FAIL"  # strict JSON: no Infinity
    assert not compare("y", "y", None, np.zeros(3), tol).passed


def test_image_levels_and_psnr():
    tol = Tolerances("fp32")
    ref = np.full((1, 4, 4, 3), 0.4, np.float32)  # 102 levels: no rounding tie
    one_level = ref.copy()
    one_level[0, 0, 0, 0] += 1 / 255
    r = compare("image", "image", one_level, ref, tol, image=True)
    assert r.levels_max == 1 and r.levels_mean == pytest.approx(1 / 48)
    assert r.psnr == pytest.approx(10 * math.log10(48 * 255**2))
    two_levels = ref.copy()
    two_levels[0, 0, 0, 0] += 2 / 255
    r2 = compare("image", "image", two_levels, ref, Tolerances("fp32", {"image": 1.0}), image=True)
    assert r2.rel_l2 < 1.0 and not r2.passed and "2 levels > 1" in r2.note
    assert to_uint8(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]


def test_overrides_by_name_then_group_then_default():
    tol = Tolerances("fp32", parse_overrides(["step=1e-3", "step 2/4=5e-3", "image_levels=3"]))
    assert tol.rtol("step 1/4") == 1e-3 and tol.rtol("step 2/4") == 5e-3
    assert tol.rtol("text_encoder_2.pooled") == 1e-4
    assert tol.image_levels() == 3
    assert Tolerances("fp16").rtol("context") > Tolerances("fp32").rtol("context")
    with pytest.raises(InputError, match="STAGE=VALUE"):
        parse_overrides(["step=abc"])
    with pytest.raises(InputError):
        Tolerances("int8")


def _minimal_reference() -> Reference:
    arrays = {k: np.zeros((1, 2), np.float32) for k in REQUIRED}
    return Reference(arrays, {"settings": {"sampler": "euler"}, "configs": {}})


def test_reference_file_round_trip_and_refusals(tmp_path):
    path = tmp_path / "ref.npz"
    save_reference(path, _minimal_reference())
    back = load_reference(path)
    assert sorted(back.arrays) == sorted(REQUIRED) and back.settings == {"sampler": "euler"}
    with pytest.raises(OutputExistsError):
        save_reference(path, _minimal_reference())
    with pytest.raises(InputError, match="no array 'nope'"):
        back["nope"]
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CorruptFileError):
        load_reference(tmp_path / "junk.npz")
    partial = _minimal_reference()
    del partial.arrays["unet_out"]
    save_reference(tmp_path / "partial.npz", partial)
    with pytest.raises(CorruptFileError, match="unet_out"):
        load_reference(tmp_path / "partial.npz")
    with pytest.raises(InputError, match="not found"):
        load_reference(tmp_path / "missing.npz")
