"""Noise schedules: which sigmas a sampler visits (generative-models' ``discretizer.py``, as plain numpy).

Every sampler in this package works in the "variance exploding" parameterisation of Karras et al. (EDM):
``x = x0 + sigma * eps``. SDXL was trained as a discrete DDPM (``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``);
the two are the same process with ``sigma_t = sqrt((1 - abar_t) / abar_t)`` and ``x = x_t / sqrt(abar_t)``.

Precision follows generative-models: ``abar`` in float64, the ratio cast to float32 before the square root, so the
sigma table is float32 (diffusers computes ``abar`` in float32; the two tables differ by about 3e-6 relative).
"""

from __future__ import annotations

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
SDXL_LINEAR_START = 0.00085
SDXL_LINEAR_END = 0.012


def append_zero(sigmas: np.ndarray) -> np.ndarray:
    """Samplers end at sigma = 0 (the clean sample): one more entry than steps."""
    return np.concatenate([sigmas, np.zeros(1, dtype=sigmas.dtype)])


def scaled_linear_alphas_cumprod(
    num_timesteps: int = NUM_TRAIN_TIMESTEPS,
    linear_start: float = SDXL_LINEAR_START,
    linear_end: float = SDXL_LINEAR_END,
) -> np.ndarray:
    """``abar_t`` of the "scaled linear" betas SDXL was trained with: ``beta = linspace(sqrt(b0), sqrt(b1), T)**2``."""
    betas = np.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


ZERO_SNR_LAST_ALPHA_CUMPROD = 2.0**-24  # diffusers' stand-in for 0: the first sigma is then ~4096, not infinite


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Zero terminal SNR (Lin et al. 2023, Algorithm 1): shift ``sqrt(abar)`` so its last entry is 0 and scale it
    so its first is unchanged; the last ``abar`` is then ``2**-24`` (diffusers' rule, so sigma_max is finite).

    Computed on ``abar`` directly (the betas round trip of the paper gives the same values), in float64.
    """
    root = np.sqrt(np.asarray(alphas_cumprod, dtype=np.float64))
    first, last = root[0], root[-1]
    rescaled = ((root - last) * (first / (first - last))) ** 2
    rescaled[-1] = ZERO_SNR_LAST_ALPHA_CUMPROD
    return rescaled


def legacy_ddpm_timesteps(n: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The n training timesteps LegacyDDPM visits, ASCENDING: ``linspace(T-1, 0, n, endpoint=False)`` truncated.

    For n dividing T this is diffusers' "trailing" spacing (999, 974, ..., 24 for n = 40).
    """
    if not 1 <= n <= num_timesteps:
        raise ValueError(f"number of steps must be in 1..{num_timesteps}, got {n}")
    return np.linspace(num_timesteps - 1, 0, n, endpoint=False).astype(np.int64)[::-1].copy()


def lcm_timesteps(n: int, original_steps: int = 50, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """LCM's timesteps, DESCENDING: n of the distillation grid ``k*(1..original_steps) - 1``, evenly by index.

    This is the rule of diffusers' LCMScheduler (k = T // original_steps; 999, 759, 499, 259 for n = 4).
    """
    if not 1 <= n <= original_steps:
        raise ValueError(f"LCM steps must be in 1..{original_steps}, got {n}")
    k = num_timesteps // original_steps
    grid = (np.arange(1, original_steps + 1, dtype=np.int64) * k - 1)[::-1]
    picks = np.floor(np.linspace(0, original_steps, num=n, endpoint=False)).astype(np.int64)
    return grid[picks].copy()


class LegacyDDPMDiscretization:
    """SDXL's default schedule: n of the 1000 training sigmas, descending, then 0.

    ``table`` holds all training sigmas ascending, so ``table[t]`` is the sigma of timestep t (the DiscreteDenoiser's
    quantisation table). ``zero_terminal_snr``: the schedule rescaled to zero terminal SNR (v-prediction models
    trained so, ComfyUI's ``ztsnr``).
    """

    def __init__(
        self,
        linear_start: float = SDXL_LINEAR_START,
        linear_end: float = SDXL_LINEAR_END,
        num_timesteps: int = NUM_TRAIN_TIMESTEPS,
        zero_terminal_snr: bool = False,
    ) -> None:
        self.num_timesteps = num_timesteps
        self.alphas_cumprod = scaled_linear_alphas_cumprod(num_timesteps, linear_start, linear_end)
        if zero_terminal_snr:
            self.alphas_cumprod = rescale_zero_terminal_snr(self.alphas_cumprod)
        self.table = np.sqrt(((1.0 - self.alphas_cumprod) / self.alphas_cumprod).astype(np.float32))

    def timesteps(self, n: int) -> np.ndarray:
        """Timesteps in sampling order (descending), one per step."""
        return legacy_ddpm_timesteps(n, self.num_timesteps)[::-1].copy()

    def sigmas_for(self, timesteps: np.ndarray, do_append_zero: bool = True) -> np.ndarray:
        """Sigmas of given timesteps in the order given (+ 0): for LCM or custom schedules on the same table."""
        sigmas = self.table[np.asarray(timesteps, dtype=np.int64)]
        return append_zero(sigmas) if do_append_zero else sigmas

    def __call__(self, n: int, do_append_zero: bool = True) -> np.ndarray:
        return self.sigmas_for(self.timesteps(n), do_append_zero)


class EDMDiscretization:
    """Karras et al. 2022, eq. 5: ``sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``, then 0."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> None:
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def __call__(self, n: int, do_append_zero: bool = True) -> np.ndarray:
        ramp = np.linspace(0.0, 1.0, n)
        lo, hi = self.sigma_min ** (1.0 / self.rho), self.sigma_max ** (1.0 / self.rho)
        sigmas = ((hi + ramp * (lo - hi)) ** self.rho).astype(np.float32)
        return append_zero(sigmas) if do_append_zero else sigmas


def img2img_start(n: int, strength: float) -> int:
    """Index of the first step an img2img run of strength s takes from an n-step schedule (diffusers' rule).

    ``int(n * s)`` steps are run: the last ones. (generative-models' Img2ImgDiscretizationWrapper keeps
    ``int(s * (n + 1))`` sigmas counting the final 0 instead; we follow diffusers so the refiner reference and our
    sampler visit the same sigmas.)
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    run = min(int(n * strength), n)
    if run < 1:
        raise ValueError(f"strength {strength} of {n} steps runs no step")
    return n - run
