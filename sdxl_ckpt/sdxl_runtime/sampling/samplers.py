"""The samplers, one short function each over ``denoise(x, sigma) -> D`` (k-diffusion's style, EDM parameterisation).

``x`` is the variance-exploding sample ``x0 + sigma * eps`` (see discretization.py); ``sigmas`` descends and ends
with 0. Each function is the loop of its paper, so a reader can check it line by line:

- euler, heun: Karras et al. 2022 ("EDM"), Algorithm 2 (stochastic "churn" optional; 0 gives the ODE solvers)
- euler_a: ancestral Euler (k-diffusion ``sample_euler_ancestral``; DDPM-like noise re-injection, eta = 1)
- dpmpp_2m: DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 in k-diffusion's sigma form
- lcm: Latent Consistency Models, Luo et al. 2023, multistep sampling (Algorithm 1) with the skip/out boundary
  scalings of consistency models (Song et al. 2023)

``callback(i, x)`` sees the sample after step i. ``noise_sampler(sigma, sigma_next)`` supplies fresh noise for the
stochastic samplers, so a test or verify can feed the exact noise the reference drew.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Denoise = Callable[[np.ndarray, float], np.ndarray]
NoiseSampler = Callable[[float, float], np.ndarray]
Callback = Callable[[int, np.ndarray], None] | None


def initial_sample(noise: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """txt2img start: ``x = noise * sqrt(1 + sigma_0^2)`` (generative-models' prepare_sampling_loop).

    ``sqrt(1 + s^2)`` rather than ``s`` because the DDPM-space sample ``x_T = x / sqrt(1 + s^2)`` is then exactly
    unit Gaussian, as in training. (diffusers' Euler multiplies by ``s`` alone; the reference compensates.)
    """
    return (noise * np.float32(math.sqrt(1.0 + float(sigmas[0]) ** 2))).astype(noise.dtype)


def img2img_sample(init_latent: np.ndarray, noise: np.ndarray, sigma: float) -> np.ndarray:
    """img2img start: the clean latent plus noise at the first sigma, ``x = z + sigma * noise``."""
    return (init_latent + noise * np.float32(sigma)).astype(init_latent.dtype)


def to_d(x: np.ndarray, sigma: float, denoised: np.ndarray) -> np.ndarray:
    """The probability-flow ODE's derivative ``dx/dsigma = (x - D(x, sigma)) / sigma``."""
    return (x - denoised) / np.float32(sigma)


def _churn(
    x: np.ndarray,
    sigma: float,
    sigma_next: float,
    n_steps: int,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    noise_sampler: NoiseSampler,
) -> tuple[np.ndarray, float]:
    """EDM's churn: inside [s_tmin, s_tmax] raise the noise level to sigma_hat = sigma * (1 + gamma) by adding noise.

    Returns the (possibly noised) sample and sigma_hat; with s_churn 0 it is ``(x, sigma)`` unchanged.
    """
    gamma = min(s_churn / n_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1.0)
    if gamma > 0:
        x = x + noise_sampler(sigma, sigma_next) * np.float32(s_noise * (sigma_hat**2 - sigma**2) ** 0.5)
    return x, sigma_hat


def _gaussian(x: np.ndarray, seed: int = 0) -> NoiseSampler:
    rng = np.random.default_rng(seed)
    return lambda s, s_next: rng.standard_normal(x.shape).astype(x.dtype)


def sample_euler(
    denoise: Denoise,
    x: np.ndarray,
    sigmas: np.ndarray,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback = None,
) -> np.ndarray:
    """EDM Algorithm 2 with a first-order step (generative-models' EulerEDMSampler)."""
    noise_sampler = noise_sampler or _gaussian(x)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, sigma_hat = _churn(x, sigma, sigma_next, n, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        d = to_d(x, sigma_hat, denoise(x, sigma_hat))
        x = x + d * np.float32(sigma_next - sigma_hat)
        if callback is not None:
            callback(i, x)
    return x


def sample_heun(
    denoise: Denoise,
    x: np.ndarray,
    sigmas: np.ndarray,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback = None,
) -> np.ndarray:
    """EDM Algorithm 2: Euler predictor, trapezoidal corrector (skipped on the last step, where sigma_next = 0)."""
    noise_sampler = noise_sampler or _gaussian(x)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, sigma_hat = _churn(x, sigma, sigma_next, n, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        d = to_d(x, sigma_hat, denoise(x, sigma_hat))
        dt = np.float32(sigma_next - sigma_hat)
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, denoise(x_2, sigma_next))
            x = x + (d + d_2) * np.float32(0.5) * dt
        if callback is not None:
            callback(i, x)
    return x


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split the move to sigma_next into a deterministic step to sigma_down and fresh noise of std sigma_up."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def sample_euler_ancestral(
    denoise: Denoise,
    x: np.ndarray,
    sigmas: np.ndarray,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback = None,
) -> np.ndarray:
    """Euler to sigma_down, then add noise of std sigma_up (sigma_down^2 + sigma_up^2 = sigma_next^2)."""
    noise_sampler = noise_sampler or _gaussian(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = to_d(x, sigma, denoise(x, sigma))
        x = x + d * np.float32(sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * np.float32(s_noise * sigma_up)
        if callback is not None:
            callback(i, x)
    return x


def sample_dpmpp_2m(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, callback: Callback = None) -> np.ndarray:
    """DPM-Solver++(2M) in log-sigma time ``t = -log(sigma)``; first order on the first and the final (sigma=0) step."""
    old_denoised = None
    h_last = 0.0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        h = math.inf if sigma_next == 0 else math.log(sigma) - math.log(sigma_next)
        ratio, phi = np.float32(sigma_next / sigma), np.float32(-math.expm1(-h))
        if old_denoised is None or sigma_next == 0:
            x = ratio * x + phi * denoised
        else:
            r = h_last / h
            denoised_d = np.float32(1 + 1 / (2 * r)) * denoised - np.float32(1 / (2 * r)) * old_denoised
            x = ratio * x + phi * denoised_d
        old_denoised, h_last = denoised, h
        if callback is not None:
            callback(i, x)
    return x


def lcm_boundary_scalings(
    timestep: int, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[float, float]:
    """Consistency-model boundary condition at a DISCRETE timestep: f(x, t) = c_skip x_t + c_out x0_pred.

    ``c_skip = s^2 / ((t k)^2 + s^2)``, ``c_out = t k / sqrt((t k)^2 + s^2)`` with sigma_data s, timestep scaling k:
    c_skip -> 1, c_out -> 0 at t = 0, so f is the identity on clean samples.
    """
    scaled = timestep * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def sample_lcm(
    denoise: Denoise,
    x: np.ndarray,
    sigmas: np.ndarray,
    timesteps: np.ndarray,
    noise_sampler: NoiseSampler | None = None,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
    callback: Callback = None,
) -> np.ndarray:
    """LCM multistep sampling: predict x0 with the consistency function, re-noise it to the next sigma.

    The consistency function is applied to the DDPM-space sample ``x_t = x / sqrt(1 + sigma^2)``; re-noising
    ``sqrt(abar') x0 + sqrt(1 - abar') z`` is ``x0 + sigma' z`` in our parameterisation. The last step returns x0.
    """
    noise_sampler = noise_sampler or _gaussian(x)
    n = len(sigmas) - 1
    if len(timesteps) != n:
        raise ValueError(f"LCM needs one timestep per step: {len(timesteps)} for {n} steps")
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        c_skip, c_out = lcm_boundary_scalings(int(timesteps[i]), sigma_data, timestep_scaling)
        x_t = x * np.float32(1.0 / (1.0 + sigma**2) ** 0.5)
        x0 = np.float32(c_out) * denoise(x, sigma) + np.float32(c_skip) * x_t
        x = x0 + noise_sampler(sigma, sigma_next) * np.float32(sigma_next) if i < n - 1 else x0
        if callback is not None:
            callback(i, x)
    return x


SAMPLERS: dict[str, Callable[..., np.ndarray]] = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "lcm": sample_lcm,
}
