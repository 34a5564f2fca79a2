"""Denoisers: turn the UNet's output into ``D(x, sigma)``, the clean estimate (generative-models' ``denoiser.py``,
``denoiser_scaling.py``), as data: one scalings function per parameterisation.

``D(x, sigma) = c_skip * x + c_out * UNet(c_in * x, c_noise)``.

- Discrete (SDXL, trained on 1000 DDPM timesteps): a continuous sigma is first snapped to the nearest training
  sigma and the UNet is told that sigma's INDEX as its timestep. Epsilon prediction (``EpsScaling``):
  ``c_skip = 1``, ``c_out = -sigma``, ``c_in = 1/sqrt(sigma^2 + 1)``; ``c_in * x`` is exactly diffusers'
  ``scale_model_input`` (the DDPM-space sample ``x_t``) and ``x - sigma * eps`` its ``pred_original_sample``.
  v-prediction (``VScaling``): ``c_skip = 1/(sigma^2 + 1)``, ``c_out = -sigma/sqrt(sigma^2 + 1)``, same ``c_in``:
  diffusers' ``pred_original_sample = v * (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1)``.
- EDM (Karras et al. 2022, Playground v2.5, EDM v-prediction): continuous, no snapping; ``c_noise = ln(sigma)/4``
  is the UNet's timestep. With sigma_data ``sd``: ``c_skip = sd^2/(sigma^2 + sd^2)``,
  ``c_out = +-sigma sd/sqrt(sigma^2 + sd^2)`` (+ for diffusers' "epsilon", i.e. EDM's F-prediction; - for
  v-prediction), ``c_in = 1/sqrt(sigma^2 + sd^2)``: diffusers' ``precondition_inputs / _outputs / _noise``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

# network(x_in, timesteps, cond) -> model output, where timesteps has one entry per batch row (int64 training
# timesteps for the discrete denoiser, float32 c_noise for EDM)
Network = Callable[[np.ndarray, np.ndarray, dict[str, Any]], np.ndarray]
Scalings = Callable[[float], tuple[float, float, float]]


def eps_scalings(sigma: float) -> tuple[float, float, float]:
    """(c_skip, c_out, c_in) of an epsilon-predicting model in the EDM parameterisation."""
    return 1.0, -sigma, 1.0 / (sigma**2 + 1.0) ** 0.5


def v_scalings(sigma: float) -> tuple[float, float, float]:
    """(c_skip, c_out, c_in) of a v-predicting model (Salimans & Ho 2022) on the DDPM schedule."""
    return 1.0 / (sigma**2 + 1.0), -sigma / (sigma**2 + 1.0) ** 0.5, 1.0 / (sigma**2 + 1.0) ** 0.5


DISCRETE_SCALINGS: dict[str, Scalings] = {"epsilon": eps_scalings, "v_prediction": v_scalings}


def edm_scalings(sigma: float, sigma_data: float, prediction_type: str = "epsilon") -> tuple[float, float, float]:
    """(c_skip, c_out, c_in) of EDM preconditioning (``epsilon``: EDM's F-prediction, as diffusers names it)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"EDM prediction type {prediction_type!r} is not supported (epsilon, v_prediction)")
    total = sigma**2 + sigma_data**2
    c_out = sigma * sigma_data / total**0.5
    return sigma_data**2 / total, c_out if prediction_type == "epsilon" else -c_out, 1.0 / total**0.5


def edm_noise_conditioning(sigmas: np.ndarray | float) -> np.ndarray:
    """EDM's UNet timestep ``c_noise = ln(sigma) / 4`` (float32), one per sigma."""
    values = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    return np.asarray([0.25 * math.log(float(s)) for s in values], dtype=np.float32)


def _combine(x: np.ndarray, out: np.ndarray, c_skip: float, c_out: float) -> np.ndarray:
    return (x * np.float32(c_skip) + out * np.float32(c_out)).astype(x.dtype)


class DiscreteDenoiser:
    """Snap sigma to the training table, scale the input, call the network at the table index, combine."""

    def __init__(self, table: np.ndarray, prediction_type: str = "epsilon") -> None:
        if prediction_type not in DISCRETE_SCALINGS:
            raise ValueError(f"prediction type {prediction_type!r} is not supported ({', '.join(DISCRETE_SCALINGS)})")
        self.table = np.asarray(table)  # ascending: table[t] = sigma of training timestep t
        self.scalings = DISCRETE_SCALINGS[prediction_type]

    def sigma_to_idx(self, sigma: float) -> int:
        return int(np.abs(self.table.astype(np.float64) - float(sigma)).argmin())

    def __call__(self, network: Network, x: np.ndarray, sigma: float, cond: dict[str, Any]) -> np.ndarray:
        idx = self.sigma_to_idx(sigma)
        c_skip, c_out, c_in = self.scalings(float(self.table[idx]))
        t = np.full((x.shape[0],), idx, dtype=np.int64)
        out = network((x * np.float32(c_in)).astype(x.dtype), t, cond)
        return _combine(x, out, c_skip, c_out)


class EDMDenoiser:
    """Continuous EDM preconditioning: no snapping, the UNet's timestep is ``c_noise`` of sigma itself."""

    def __init__(self, sigma_data: float = 0.5, prediction_type: str = "epsilon") -> None:
        edm_scalings(1.0, sigma_data, prediction_type)  # refuses an unknown prediction type now
        self.sigma_data, self.prediction_type = float(sigma_data), prediction_type

    def __call__(self, network: Network, x: np.ndarray, sigma: float, cond: dict[str, Any]) -> np.ndarray:
        c_skip, c_out, c_in = edm_scalings(float(sigma), self.sigma_data, self.prediction_type)
        t = np.repeat(edm_noise_conditioning(sigma), x.shape[0])
        out = network((x * np.float32(c_in)).astype(x.dtype), t, cond)
        return _combine(x, out, c_skip, c_out)


Denoiser = DiscreteDenoiser | EDMDenoiser
