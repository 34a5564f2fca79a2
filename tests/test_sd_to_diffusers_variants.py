"""sd-to-diffusers on every row of the variants table: each tensor back bit for bit, configs that say the variant.

The tiny models are those of ``test_variants`` (inpainting 9-ch, instruct-pix2pix 8-ch, Playground v2.5 with its
EDM tensors, v-prediction with zero terminal SNR, SSD-1B- and Vega-like depths), built with the real diffusers
classes. The exported folder must hold the same tensors, a UNet config with the same input channels and depths,
the VAE's latent statistics (Playground's ``edm_mean`` / ``edm_std`` tensors become ``latents_mean`` /
``latents_std``), the scheduler of the variant (EDM for Playground v2.5, v-prediction for the v-pred row), and load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_sd_to_diffusers import _assert_same_tensors, _component_dirs

pytest.importorskip("diffusers")
pytestmark = [pytest.mark.slow, pytest.mark.torch]

ROWS = ("inpaint", "pix2pix", "playground-v2.5", "v-pred", "ssd-1b", "vega")


@pytest.mark.parametrize("name", ROWS)
def test_variant_row_exports_bit_exact_with_its_scheduler(name: str, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    from sdxl_ckpt.convert.diffusers_to_sd import convert_diffusers_to_sd
    from sdxl_ckpt.convert.sd_to_diffusers import convert_sd_to_diffusers
    from sdxl_ckpt.testmodels.tiny import build_shape_model

    pipe = build_shape_model(name, tmp_path / "pipe")
    sd, out = tmp_path / "model.safetensors", tmp_path / "back"
    convert_diffusers_to_sd(pipe, sd)
    report = convert_sd_to_diffusers(sd, out)
    assert report["variant"] == name
    _assert_same_tensors(_component_dirs("base", pipe), out)

    original = json.loads((pipe / "unet" / "config.json").read_text())
    written = json.loads((out / "unet" / "config.json").read_text())
    for field in ("in_channels", "block_out_channels", "transformer_layers_per_block", "layers_per_block"):
        assert written[field] == original[field], field
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    if name == "playground-v2.5":
        assert scheduler["_class_name"] == "EDMDPMSolverMultistepScheduler"
        vae_in = json.loads((pipe / "vae" / "config.json").read_text())
        vae_out = json.loads((out / "vae" / "config.json").read_text())
        for field in ("latents_mean", "latents_std", "scaling_factor"):
            assert vae_out[field] == vae_in[field], field
        assert {d["key"] for d in report["dropped"]} >= {"edm_mean", "edm_std"}
    else:
        expected = "v_prediction" if name == "v-pred" else "epsilon"
        assert scheduler["_class_name"] == "EulerDiscreteScheduler" and scheduler["prediction_type"] == expected
    if name == "v-pred":
        assert scheduler["rescale_betas_zero_snr"] is True
    unet = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True)
    assert unet.config.in_channels == original["in_channels"]
