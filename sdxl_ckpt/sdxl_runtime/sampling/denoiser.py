"""DiscreteDenoiser with epsilon scaling: turns the UNet's noise prediction into ``D(x, sigma)``, the clean estimate.

generative-models (``denoiser.py``, ``denoiser_scaling.py``): the UNet was trained on 1000 discrete timesteps, so a
continuous sigma is first snapped to the nearest training sigma and the UNet is told that sigma's INDEX as its
timestep. With eps-prediction (``EpsScaling``): ``c_skip = 1``, ``c_out = -sigma``, ``c_in = 1/sqrt(sigma^2 + 1)``,
``D(x, sigma) = c_skip * x + c_out * UNet(c_in * x, t)``. ``c_in * x`` is exactly diffusers' ``scale_model_input``
(and the DDPM-space sample ``x_t``), and ``x - sigma * eps`` is exactly diffusers' ``pred_original_sample``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

# network(x_in, timesteps, cond) -> eps, where timesteps is an int64 array with one entry per batch row
Network = Callable[[np.ndarray, np.ndarray, dict[str, Any]], np.ndarray]


def eps_scalings(sigma: float) -> tuple[float, float, float]:
    """(c_skip, c_out, c_in) of an epsilon-predicting model in the EDM parameterisation."""
    return 1.0, -sigma, 1.0 / (sigma**2 + 1.0) ** 0.5


class DiscreteDenoiser:
    """Snap sigma to the training table, scale the input, call the network at the table index, combine."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = np.asarray(table)  # ascending: table[t] = sigma of training timestep t

    def sigma_to_idx(self, sigma: float) -> int:
        return int(np.abs(self.table.astype(np.float64) - float(sigma)).argmin())

    def __call__(self, network: Network, x: np.ndarray, sigma: float, cond: dict[str, Any]) -> np.ndarray:
        idx = self.sigma_to_idx(sigma)
        sigma_q = float(self.table[idx])
        c_skip, c_out, c_in = eps_scalings(sigma_q)
        t = np.full((x.shape[0],), idx, dtype=np.int64)
        eps = network((x * np.float32(c_in)).astype(x.dtype), t, cond)
        return (x * np.float32(c_skip) + eps * np.float32(c_out)).astype(x.dtype)
