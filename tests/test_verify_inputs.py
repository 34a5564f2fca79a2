"""The UNets with extra input channels, end to end through the CLI: inpainting (9) and instruct-pix2pix (8).

Each tiny model: diffusers folder -> ``diffusers-to-sd`` -> ``st-to-ms`` -> ``reference`` (diffusers' own
StableDiffusionXLInpaintPipeline / StableDiffusionXLInstructPix2PixPipeline) -> ``verify`` PASS with every stage
within rel L2 1e-4 and the image within 1 level (fp32, CPU, 32x32, 2 steps, CFG 5); ``ms-to-st`` gives the SD file
back bit for bit. The reference from the SD file equals the one from the folder. Faults that must be caught: a
ckpt whose mask-channel input weights were changed fails at ``unet.first``; a ckpt of another kind than the
reference's is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import verify_support as vs
from verify_support import BASE_SIZE

from sdxl_ckpt.cli import main
from sdxl_ckpt.formats.reference_npz import load_reference
from sdxl_ckpt.sdxl.variants import CONV_IN_KEY

pytestmark = [pytest.mark.torch, pytest.mark.slow]

STEPS = 2
SIZE = ["--height", str(BASE_SIZE["height"]), "--width", str(BASE_SIZE["width"])]


def _cli(args: list[object], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _chain(name: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """folder -> SD file -> ckpt -> reference (from the folder), all through the CLI."""
    from sdxl_ckpt.testmodels.tiny import build_shape_model

    out = tmp_path_factory.mktemp(name)
    folder = build_shape_model(name, out / "pipe")
    paths = {"folder": folder, "sd": out / f"{name}.safetensors", "ckpt": out / f"{name}.ckpt", "ref": out / "ref.npz"}
    for args in (
        ["diffusers-to-sd", folder, "-o", paths["sd"], "-q"],
        ["st-to-ms", paths["sd"], "-o", paths["ckpt"], "-q"],
        ["reference", folder, "-o", paths["ref"], "--steps", STEPS, *SIZE, "-q"],
    ):
        assert main([str(a) for a in args]) == 0, args
    return paths


@pytest.fixture(scope="module")
def inpaint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _chain("inpaint", tmp_path_factory)


@pytest.fixture(scope="module")
def pix2pix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _chain("pix2pix", tmp_path_factory)


def _verify(ckpt: Path, ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, dict]:
    report = tmp_path / "report.json"
    rc, out, _err = _cli(["verify", ckpt, "--reference", ref, "-q", "--json", report, *extra], capsys)
    assert ("PASS" in out) == (rc == 0), out
    return rc, json.loads(report.read_text())


def _assert_all_within(report: dict, steps: int, *expected: str) -> list[str]:
    assert report["passed"] and report["first_failure"] is None, report["first_failure"]
    names = [s["stage"] for s in report["stages"]]
    assert [f"step {i}/{steps}" for i in range(1, steps + 1)] == [n for n in names if n.startswith("step")]
    assert names[-4:] == ["final_latent", "vae.decode", "decoded", "image"]
    for name in ("unet.first", "vae.decode", "context", "y", *expected):
        assert name in names, name
    for s in report["stages"]:
        assert s["rel_l2"] <= 1e-4, s
    assert report["stages"][-1]["levels_max"] <= 1, report["stages"][-1]
    return names


def _round_trip_and_reference_from_sd_file(case: dict[str, Path], name: str, tmp_path: Path, capsys) -> None:
    """ms-to-st gives the SD file back bit for bit; diffusers' from_single_file on it gives the folder's reference."""
    from safetensors.numpy import load_file

    back = tmp_path / "back.safetensors"
    assert _cli(["ms-to-st", case["ckpt"], "-o", back, "-q"], capsys)[0] == 0
    original, again = load_file(case["sd"]), load_file(back)
    assert set(original) == set(again)
    for key, array in original.items():
        assert again[key].dtype == array.dtype and again[key].tobytes() == array.tobytes(), key
    from_file = tmp_path / "ref_sd.npz"
    rc, _out, err = _cli(["reference", case["sd"], "-o", from_file, "--steps", STEPS, *SIZE, "-q"], capsys)
    assert rc == 0, err
    a, b = load_reference(case["ref"]), load_reference(from_file)
    assert b.meta["source"]["kind"] == "single_file" and b.meta["variant"] == name
    assert sorted(a.arrays) == sorted(b.arrays)
    for array in a.arrays:
        np.testing.assert_allclose(b[array], a[array], rtol=1e-6, atol=1e-6, err_msg=array)


# --- inpainting: the full sampling chain --------------------------------------------------------------------------


def test_inpaint_reference_records_what_the_pipeline_fed(inpaint):
    ref = load_reference(inpaint["ref"])
    assert ref.meta["variant"] == "inpaint" and ref.settings["strength"] == 1.0 and ref.settings["cfg"]
    x = ref["unet_in_x"]
    assert x.shape == (2, 9, 4, 4)  # CFG batch of [latent, mask, masked-image latent]
    mask = ref["inpaint_mask"]
    assert mask.shape == (1, 1, 32, 32) and set(np.unique(mask)) == {0.0, 1.0}
    assert np.array_equal(ref["masked_image"], ref["init_image"] * (mask < 0.5))  # diffusers' masking rule
    np.testing.assert_array_equal(ref["inpaint_mask_latent"], mask[:, :, ::8, ::8])  # nearest downsampling
    for row in x:  # both CFG rows carry the same mask and masked-image latent
        np.testing.assert_array_equal(row[4:5], ref["inpaint_mask_latent"][0])
        np.testing.assert_array_equal(row[5:], ref["masked_image_latent"][0])
    assert np.abs(ref["masked_image_latent"]).max() > 0.01


def test_inpaint_verify_passes_every_stage(inpaint, tmp_path, capsys):
    rc, report = _verify(inpaint["ckpt"], inpaint["ref"], tmp_path, capsys)
    assert rc == 0
    names = _assert_all_within(report, STEPS, "inpaint_mask", "vae_encode", "text_encoder_1")
    assert names.index("vae_encode") < names.index("unet.first") and "vae_encode.init" not in names


def test_inpaint_round_trip_and_reference_from_sd_file(inpaint, tmp_path, capsys):
    _round_trip_and_reference_from_sd_file(inpaint, "inpaint", tmp_path, capsys)


def test_inpaint_below_full_strength_is_img2img(inpaint, tmp_path, capsys):
    """Strength 0.5 of 2 steps: the last step from the encoded (unmasked) image plus the pipeline's noise."""
    ref = tmp_path / "ref.npz"
    args = ["reference", inpaint["folder"], "-o", ref, "--steps", 2, "--strength", 0.5, *SIZE, "-q"]
    assert _cli(args, capsys)[0] == 0
    data = load_reference(ref)
    assert data["timesteps"].tolist() == [499] and data.settings["img2img_start"] == 1
    # the noise the pipeline added is the seed's first draw (the posterior mean consumed none of the generator)
    assert np.array_equal(data["noise"], load_reference(inpaint["ref"])["noise"])
    assert data["init_latent"].shape == data["masked_image_latent"].shape
    rc, report = _verify(inpaint["ckpt"], ref, tmp_path, capsys)
    assert rc == 0
    _assert_all_within(report, 1, "vae_encode.init", "vae_encode", "inpaint_mask")


def test_altered_mask_channel_weights_fail_at_unet_first(inpaint, tmp_path, capsys):
    """conv_in's weights on the mask channel (input channel 4) changed: the conditioning and the encoder still
    pass; the first UNet evaluation does not."""

    def alter(by):
        w = by[CONV_IN_KEY].load().copy()
        w[:, 4] = -w[:, 4] + 0.05
        return w

    bad = vs.plant(inpaint["ckpt"], tmp_path / "bad.ckpt", {CONV_IN_KEY: alter})
    rc, report = _verify(bad, inpaint["ref"], tmp_path, capsys, "--fail-fast")
    assert rc == 1 and report["first_failure"] == "unet.first"
    passed = [s["stage"] for s in report["stages"] if s["ok"] == "ok"]
    assert {"context", "y", "inpaint_mask", "vae_encode"} <= set(passed)


def test_ckpt_of_another_kind_is_refused_in_one_line(inpaint, pix2pix, tiny_base, tmp_path, capsys):
    base_ref = vs.reference(tiny_base, tmp_path / "base.npz", steps=STEPS, **BASE_SIZE)
    for ckpt, ref, ours, theirs in (
        (inpaint["ckpt"], base_ref, "inpaint", "base"),
        (pix2pix["ckpt"], inpaint["ref"], "pix2pix", "inpaint"),
    ):
        rc, _out, err = _cli(["verify", ckpt, "--reference", ref, "-q"], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert f"this {ours} checkpoint does not fit the {theirs} model" in err


# --- instruct-pix2pix ---------------------------------------------------------------------------------------------


def test_pix2pix_reference_has_three_branches(pix2pix):
    ref = load_reference(pix2pix["ref"])
    assert ref.meta["variant"] == "pix2pix" and ref.settings["image_guidance"] == 1.5
    x = ref["unet_in_x"]
    assert x.shape == (3, 8, 4, 4) and ref["context"].shape[0] == 3
    np.testing.assert_array_equal(x[0, 4:], ref["image_latent"][0])  # [text + image, image only, neither]
    np.testing.assert_array_equal(x[1, 4:], ref["image_latent"][0])
    assert not x[2, 4:].any()
    context = ref["context"]
    assert np.array_equal(context[1], context[2]) and not np.array_equal(context[0], context[1])


def test_pix2pix_verify_passes_every_stage(pix2pix, tmp_path, capsys):
    rc, report = _verify(pix2pix["ckpt"], pix2pix["ref"], tmp_path, capsys)
    assert rc == 0
    _assert_all_within(report, STEPS, "vae_encode", "text_encoder_1", "text_encoder_2.pooled")


def test_pix2pix_round_trip_and_reference_from_sd_file(pix2pix, tmp_path, capsys):
    _round_trip_and_reference_from_sd_file(pix2pix, "pix2pix", tmp_path, capsys)


def test_pix2pix_refuses_a_step_count_its_spacing_cannot_give(pix2pix, tmp_path, capsys):
    rc, _out, err = _cli(["reference", pix2pix["folder"], "-o", tmp_path / "r.npz", "--steps", 3, *SIZE], capsys)
    assert rc == 2 and "takes no explicit timesteps" in err


def test_three_branch_guider_batches_and_combines_in_diffusers_order():
    from sdxl_ckpt.sdxl_runtime.sampling import make_guider

    guider = make_guider(5.0, True, 1.5)
    x = np.ones((1, 4, 2, 2), np.float32)
    cond = {"context": np.full((1, 3), 1.0, np.float32), "concat": np.full((1, 4, 2, 2), 7.0, np.float32)}
    uc = {"context": np.full((1, 3), 2.0, np.float32), "concat": cond["concat"]}
    x_in, c_in = guider.prepare_inputs(x, 1.0, cond, uc)
    assert x_in.shape[0] == 3 and c_in["context"][:, 0].tolist() == [1.0, 2.0, 2.0]
    assert [float(c_in["concat"][i].max()) for i in range(3)] == [7.0, 7.0, 0.0]
    text, image, uncond = (np.full((1, 4, 2, 2), v, np.float32) for v in (3.0, 2.0, 1.0))
    combined = guider(np.concatenate([text, image, uncond]))
    np.testing.assert_allclose(combined, 1.0 + 5.0 * (3.0 - 2.0) + 1.5 * (2.0 - 1.0))
