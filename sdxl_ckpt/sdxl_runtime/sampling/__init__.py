"""Sampling for the MindSpore runtime, as plain numpy math over a ``network(x, t, cond) -> eps`` callable.

discretization (which sigmas) -> denoiser (sigma -> UNet input/timestep, eps -> clean estimate) -> guider (CFG)
-> samplers (the step loops). No framework import here: the network callable hides MindSpore.
"""

from sdxl_ckpt.sdxl_runtime.sampling.compose import make_denoise
from sdxl_ckpt.sdxl_runtime.sampling.denoiser import (
    DiscreteDenoiser,
    EDMDenoiser,
    edm_noise_conditioning,
    edm_scalings,
    eps_scalings,
    v_scalings,
)
from sdxl_ckpt.sdxl_runtime.sampling.discretization import (
    EDMDiscretization,
    LegacyDDPMDiscretization,
    img2img_start,
    lcm_timesteps,
    legacy_ddpm_timesteps,
)
from sdxl_ckpt.sdxl_runtime.sampling.guider import (
    IdentityGuider,
    ImageTextCFG,
    VanillaCFG,
    make_guider,
    pix2pix_guidance,
)
from sdxl_ckpt.sdxl_runtime.sampling.samplers import (
    SAMPLERS,
    ancestral_step,
    img2img_sample,
    initial_sample,
    lcm_boundary_scalings,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
)

__all__ = [
    "SAMPLERS",
    "DiscreteDenoiser",
    "EDMDenoiser",
    "EDMDiscretization",
    "IdentityGuider",
    "ImageTextCFG",
    "LegacyDDPMDiscretization",
    "VanillaCFG",
    "ancestral_step",
    "edm_noise_conditioning",
    "edm_scalings",
    "eps_scalings",
    "img2img_sample",
    "img2img_start",
    "initial_sample",
    "lcm_boundary_scalings",
    "lcm_timesteps",
    "legacy_ddpm_timesteps",
    "make_denoise",
    "make_guider",
    "pix2pix_guidance",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "v_scalings",
]
