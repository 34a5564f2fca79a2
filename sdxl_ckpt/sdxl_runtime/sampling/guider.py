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


def make_guider(scale: float, cfg: bool) -> IdentityGuider | VanillaCFG:
    """diffusers' rule: classic CFG when the scale is above 1 and the UNet has no guidance embedding."""
    return VanillaCFG(scale) if cfg and scale > 1.0 else IdentityGuider()
