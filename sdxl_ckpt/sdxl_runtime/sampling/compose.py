"""Compose network, denoiser and guider into the ``denoise(x, sigma)`` every sampler calls (sgm's split)."""

from __future__ import annotations

from typing import Any

import numpy as np

from sdxl_ckpt.sdxl_runtime.sampling.denoiser import Denoiser, Network
from sdxl_ckpt.sdxl_runtime.sampling.guider import IdentityGuider, ImageTextCFG, VanillaCFG
from sdxl_ckpt.sdxl_runtime.sampling.samplers import Denoise


def make_denoise(
    network: Network,
    denoiser: Denoiser,
    guider: IdentityGuider | VanillaCFG | ImageTextCFG,
    cond: dict[str, Any],
    uc: dict[str, Any] | None = None,
) -> Denoise:
    """``denoise(x, sigma)``: batch for guidance, run the scaled network, combine the guided clean estimate."""

    def denoise(x: np.ndarray, sigma: float) -> np.ndarray:
        x_in, c_in = guider.prepare_inputs(x, sigma, cond, uc)
        return guider(denoiser(network, x_in, sigma, c_in))

    return denoise
