"""Guidance: how the conditional and unconditional predictions are combined (generative-models' ``guiders.py``).

A guider has two halves: ``prepare_inputs`` builds the network batch, ``__call__`` combines the network's denoised
outputs. VanillaCFG runs one batch ``[uncond, cond]`` (the order diffusers uses too) and returns
``D_u + scale * (D_c - D_u)``; because ``D`` is affine in the UNet output this equals diffusers' guidance on the
noise prediction.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _concat_cond(uc: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    """Stack every array of the two condition dicts along the batch axis, unconditional first."""
    if uc.keys() != c.keys():
        raise ValueError(f"cond and uncond differ in keys: {sorted(c)} vs {sorted(uc)}")
    return {k: np.concatenate([uc[k], c[k]], axis=0) for k in c}


class IdentityGuider:
    """No guidance: one batch, the conditional prediction as is (LCM UNets with a guidance embedding, refiner tests)."""

    def prepare_inputs(
        self, x: np.ndarray, sigma: float, cond: dict[str, Any], uc: dict[str, Any] | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        return x, cond

    def __call__(self, denoised: np.ndarray) -> np.ndarray:
        return denoised


class VanillaCFG:
    """Classifier-free guidance (Ho & Salimans 2022): ``D = D_u + scale * (D_c - D_u)``."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def prepare_inputs(
        self, x: np.ndarray, sigma: float, cond: dict[str, Any], uc: dict[str, Any] | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if uc is None:
            raise ValueError("classifier-free guidance needs an unconditional branch")
        return np.concatenate([x, x], axis=0), _concat_cond(uc, cond)

    def __call__(self, denoised: np.ndarray) -> np.ndarray:
        d_u, d_c = np.split(denoised, 2, axis=0)
        return (d_u + np.float32(self.scale) * (d_c - d_u)).astype(denoised.dtype)


def pix2pix_guidance(
    d_text: np.ndarray, d_image: np.ndarray, d_uncond: np.ndarray, scale: float, image_scale: float
) -> np.ndarray:
    """InstructPix2Pix's rule (Brooks et al. 2023, eq. 3): ``u + s_T (text - image) + s_I (image - u)``, where
    text is conditioned on text and image, image on the image alone, u on neither. The weights sum to 1, so it
    holds on D as on the noise prediction."""
    out = d_uncond + np.float32(scale) * (d_text - d_image) + np.float32(image_scale) * (d_image - d_uncond)
    return out.astype(d_text.dtype)


class ImageTextCFG:
    """Guidance on text and on an input image (instruct-pix2pix): one batch of three, in diffusers' order
    [text + image, image only, neither]. ``cond`` and ``uc`` carry the image latent as ``concat`` (sgm's key for
    channels joined to the UNet input); the third branch is ``uc`` with that latent zeroed."""

    def __init__(self, scale: float, image_scale: float) -> None:
        self.scale, self.image_scale = float(scale), float(image_scale)

    def prepare_inputs(
        self, x: np.ndarray, sigma: float, cond: dict[str, Any], uc: dict[str, Any] | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if uc is None or "concat" not in uc:
            raise ValueError("image guidance needs an unconditional branch carrying the image latent as 'concat'")
        neither = {**uc, "concat": np.zeros_like(uc["concat"])}
        batch = [cond, uc, neither]
        if not all(b.keys() == cond.keys() for b in batch):
            raise ValueError(f"cond and uncond differ in keys: {sorted(cond)} vs {sorted(uc)}")
        return np.concatenate([x, x, x], axis=0), {k: np.concatenate([b[k] for b in batch], axis=0) for k in cond}

    def __call__(self, denoised: np.ndarray) -> np.ndarray:
        d_text, d_image, d_uncond = np.split(denoised, 3, axis=0)
        return pix2pix_guidance(d_text, d_image, d_uncond, self.scale, self.image_scale)


def make_guider(
    scale: float, cfg: bool, image_scale: float | None = None
) -> IdentityGuider | VanillaCFG | ImageTextCFG:
    """diffusers' rule: classic CFG when the scale is above 1 and the UNet has no guidance embedding;
    ``image_scale`` given (instruct-pix2pix, whose caller decides ``cfg`` by both scales): the three branches."""
    if cfg and image_scale is not None:
        return ImageTextCFG(scale, image_scale)
    return VanillaCFG(scale) if cfg and scale > 1.0 else IdentityGuider()
