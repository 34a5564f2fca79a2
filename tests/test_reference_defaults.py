"""``reference`` needs neither --height/--width on a refiner nor sdxl_ckpt.* metadata in an SD file."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

pytest.importorskip("diffusers")


def test_refiner_without_size_uses_the_unet_sample_size(tiny_refiner: Path) -> None:
    """The img2img pipeline has no default_sample_size: the UNet's sample_size (16 latents -> 128 px) is used."""
    from sdxl_ckpt.reference.reference import make_reference

    ref = make_reference(tiny_refiner, steps=2, strength=0.5)
    assert (ref.meta["settings"]["height"], ref.meta["settings"]["width"]) == (128, 128)


def test_sd_file_without_metadata_gets_its_configs_from_the_shapes(tiny_base: Path, tmp_path: Path) -> None:
    from sdxl_ckpt.convert.diffusers_to_sd import convert_diffusers_to_sd
    from sdxl_ckpt.reference.reference import make_reference

    sd = tmp_path / "base.safetensors"
    convert_diffusers_to_sd(tiny_base, sd)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(sd), bare)  # no metadata at all
    ref = make_reference(bare, steps=1, height=64, width=64)
    assert list(ref.meta["configs"]["unet"]["block_out_channels"]) == [32, 64, 128]
    assert list(ref.meta["configs"]["unet"]["attention_head_dim"]) == [1, 1, 2]  # 64-channel heads: the convention
