"""Sampler math against closed forms, and schedules/trajectories against diffusers' schedulers (torch tests)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.sdxl_runtime.sampling import (
    DiscreteDenoiser,
    EDMDiscretization,
    IdentityGuider,
    LegacyDDPMDiscretization,
    VanillaCFG,
    ancestral_step,
    img2img_start,
    initial_sample,
    lcm_boundary_scalings,
    lcm_timesteps,
    make_denoise,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
)

DISC = LegacyDDPMDiscretization()

# --- closed forms -----------------------------------------------------------------------------------------------


def test_legacy_ddpm_40_steps_matches_published_schedule():
    assert DISC.timesteps(40).tolist() == list(range(999, 0, -25))  # 999, 974, ..., 24
    sigmas = DISC(40)
    assert sigmas.shape == (41,) and sigmas[-1] == 0
    np.testing.assert_allclose(sigmas[:3], [14.6147, 12.5908, 10.9042], atol=1e-4)
    np.testing.assert_allclose(sigmas[-3:-1], [0.2230, 0.1515], atol=1e-4)
    assert np.all(np.diff(sigmas) < 0)


def test_sigma_table_is_the_ddpm_noise_to_signal_ratio():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(DISC.table, np.sqrt((1 - abar) / abar), rtol=1e-6)
    assert DISC.table[0] == pytest.approx(0.0292, abs=1e-4)


def test_lcm_timesteps_and_boundary_conditions():
    assert lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    assert lcm_timesteps(1).tolist() == [999]
    c_skip, c_out = lcm_boundary_scalings(0)
    assert (c_skip, c_out) == (1.0, 0.0)
    c_skip, c_out = lcm_boundary_scalings(999)
    assert c_skip == pytest.approx(0.25 / (9990**2 + 0.25)) and c_out == pytest.approx(1.0, abs=1e-8)


def test_edm_discretization_endpoints():
    sigmas = EDMDiscretization(0.002, 80.0, 7.0)(10)
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002) and sigmas[-1] == 0
    # rho-spaced: sigma^(1/rho) is linear in the step index
    inner = sigmas[:-1].astype(np.float64) ** (1 / 7)
    np.testing.assert_allclose(np.diff(inner), np.diff(inner)[0], rtol=1e-4)


def test_img2img_start_follows_strength():
    assert img2img_start(8, 0.5) == 4
    assert img2img_start(4, 1.0) == 0
    with pytest.raises(ValueError):
        img2img_start(4, 0.1)


def test_denoiser_quantizes_sigma_and_passes_index_as_timestep():
    seen = {}

    def network(x_in, t, cond):
        seen["x_in"], seen["t"] = x_in, t
        return np.full_like(x_in, 0.5)

    den = DiscreteDenoiser(DISC.table)
    x = np.ones((1, 4, 2, 2), np.float32) * 3
    sigma = float(DISC.table[500]) * 1.0004  # off the table: snaps to index 500
    out = den(network, x, sigma, {})
    s = float(DISC.table[500])
    assert seen["t"].tolist() == [500]
    np.testing.assert_allclose(seen["x_in"], 3 / math.sqrt(1 + s * s), rtol=1e-6)
    np.testing.assert_allclose(out, 3 - s * 0.5, rtol=1e-6)  # c_skip = 1, c_out = -sigma


def test_cfg_combines_uncond_first():
    def network(x_in, t, cond):  # the "eps" reveals which branch a batch row came from
        return np.broadcast_to(cond["tag"][:, None, None, None], x_in.shape).astype(np.float32)

    den = DiscreteDenoiser(DISC.table)
    x = np.zeros((1, 4, 2, 2), np.float32)
    sigma = float(DISC.table[999])
    cond, uc = {"tag": np.array([2.0], np.float32)}, {"tag": np.array([-1.0], np.float32)}
    d = make_denoise(network, den, VanillaCFG(5.0), cond, uc)(x, sigma)
    d_u, d_c = -sigma * -1.0, -sigma * 2.0
    np.testing.assert_allclose(d, d_u + 5.0 * (d_c - d_u), rtol=1e-6)
    d_id = make_denoise(network, den, IdentityGuider(), cond, uc)(x, sigma)
    np.testing.assert_allclose(d_id, d_c, rtol=1e-6)


def test_euler_step_on_known_denoised_value():
    x0 = np.full((1, 4, 2, 2), 0.7, np.float32)
    sigmas = DISC(4)
    x = initial_sample(np.full_like(x0, 1.5), sigmas)
    assert x[0, 0, 0, 0] == pytest.approx(1.5 * math.sqrt(1 + sigmas[0] ** 2), rel=1e-6)
    states = []
    out = sample_euler(lambda x, s: x0, x.copy(), sigmas, callback=lambda i, xi: states.append(xi))
    for i, xi in enumerate(states):  # x_{i+1} = x0 + (x_i - x0) * sigma_{i+1} / sigma_i, telescoping
        np.testing.assert_allclose(xi, x0 + (x - x0) * sigmas[i + 1] / sigmas[0], rtol=1e-5)
    np.testing.assert_allclose(out, x0, rtol=1e-6)


def test_dpmpp_2m_on_known_denoised_values():
    sigmas = np.array([10.0, 4.0, 1.0, 0.0], np.float32)
    x = np.full((1, 1, 1, 1), 5.0, np.float32)
    ds = iter([2.0, 3.0, 7.0])  # D at each call
    states = []
    sample_dpmpp_2m(lambda x, s: np.full_like(x, next(ds)), x, sigmas, callback=lambda i, xi: states.append(xi.item()))
    # step 0 (first order): x1 = s1/s0 x0 + (1 - s1/s0) D0
    x1 = 0.4 * 5 + 0.6 * 2
    # step 1: h = ln 4, h_last = ln 2.5, r = h_last/h; D' = (1 + 1/2r) D1 - (1/2r) D0
    r = math.log(2.5) / math.log(4.0)
    x2 = 0.25 * x1 + 0.75 * ((1 + 1 / (2 * r)) * 3 - 1 / (2 * r) * 2)
    # step 2 to sigma 0: first order, x = D2
    np.testing.assert_allclose(states, [x1, x2, 7.0], rtol=1e-6)


def _gaussian_errors(sampler, steps_list):
    """Data ~ N(0, 1): D(x, s) = x / (1 + s^2) and the ODE solution is x(s) = x(s0) sqrt(1+s^2) / sqrt(1+s0^2)."""
    errs = []
    for n in steps_list:
        sigmas = EDMDiscretization(0.05, 10.0, 7.0)(n, do_append_zero=False)  # stop at sigma_min: exact value known
        x = np.full((1,), 2.0, np.float64)
        out = sampler(lambda x, s: x / (1 + s * s), x, sigmas)
        exact = 2.0 * math.sqrt(1 + float(sigmas[-1]) ** 2) / math.sqrt(1 + float(sigmas[0]) ** 2)
        errs.append(abs(float(out[0]) - exact))
    return errs


@pytest.mark.parametrize(("sampler", "order"), [(sample_euler, 1), (sample_heun, 2), (sample_dpmpp_2m, 2)])
def test_convergence_order_on_gaussian_data(sampler, order):
    e1, e2 = _gaussian_errors(sampler, [20, 40])
    assert e2 < e1
    assert math.log2(e1 / e2) == pytest.approx(order, abs=0.3)


def test_ancestral_step_splits_variance():
    down, up = ancestral_step(10.0, 4.0)
    assert down**2 + up**2 == pytest.approx(16.0)
    assert up == pytest.approx(math.sqrt(16 * (100 - 16) / 100))
    assert ancestral_step(10.0, 0.0) == (0.0, 0.0)


def test_euler_ancestral_with_zero_noise_is_euler_to_sigma_down():
    sigmas = np.array([10.0, 4.0, 0.0], np.float32)
    x0 = np.full((1, 1), 0.5, np.float32)
    out = sample_euler_ancestral(
        lambda x, s: x0, np.full((1, 1), 8.0, np.float32), sigmas, noise_sampler=lambda s, sn: np.zeros((1, 1))
    )
    np.testing.assert_allclose(out, x0, rtol=1e-6)


def test_lcm_with_known_denoised_values():
    ts = lcm_timesteps(2)
    sigmas = DISC.sigmas_for(ts)
    x = np.full((1, 1), 3.0, np.float32)
    z = np.full((1, 1), -0.25, np.float32)
    out = sample_lcm(lambda x, s: np.full_like(x, 0.5), x, sigmas, ts, noise_sampler=lambda s, sn: z)
    # step 0: x0 = c_out D + c_skip x / sqrt(1+s0^2); x1 = x0 + s1 z; step 1 returns its x0
    cs0, co0 = lcm_boundary_scalings(int(ts[0]))
    x1 = co0 * 0.5 + cs0 * 3.0 / math.sqrt(1 + float(sigmas[0]) ** 2) + float(sigmas[1]) * -0.25
    cs1, co1 = lcm_boundary_scalings(int(ts[1]))
    np.testing.assert_allclose(out, co1 * 0.5 + cs1 * x1 / math.sqrt(1 + float(sigmas[1]) ** 2), rtol=1e-6)


# --- agreement with diffusers' schedulers ------------------------------------------------------------------------

SDXL_SCHED = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def _fake_eps(x_in: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A smooth, timestep-dependent stand-in for the UNet's noise prediction."""
    return np.tanh(0.7 * x_in + t.reshape(-1, 1, 1, 1) / 1000.0).astype(np.float32)


def _our_trajectory(name, n, noise, noises=None):
    den = DiscreteDenoiser(DISC.table)
    denoise = make_denoise(lambda x, t, c: _fake_eps(x, t), den, IdentityGuider(), {})
    ts = lcm_timesteps(n) if name == "lcm" else DISC.timesteps(n)
    sigmas = DISC.sigmas_for(ts)
    states = []
    x = initial_sample(noise, sigmas)
    cb = lambda i, xi: states.append(xi)  # noqa: E731
    if name == "euler":
        sample_euler(denoise, x, sigmas, callback=cb)
    elif name == "euler_a":
        it = iter(noises)
        sample_euler_ancestral(denoise, x, sigmas, noise_sampler=lambda s, sn: next(it), callback=cb)
    elif name == "dpmpp_2m":
        sample_dpmpp_2m(denoise, x, sigmas, callback=cb)
    else:
        it = iter(noises)
        sample_lcm(denoise, x, sigmas, ts, noise_sampler=lambda s, sn: next(it), callback=cb)
    return ts, sigmas, states


def _scheduler(name):
    diffusers = pytest.importorskip("diffusers")
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**SDXL_SCHED, timestep_spacing="trailing")
    if name == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**SDXL_SCHED, timestep_spacing="trailing")
    if name == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(
            **SDXL_SCHED, timestep_spacing="trailing", algorithm_type="dpmsolver++", solver_order=2
        )
    return diffusers.LCMScheduler(**SDXL_SCHED, timestep_scaling=10.0, original_inference_steps=50)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 10, 20, 25, 40, 50, 100])
def test_schedule_equals_diffusers_trailing(name, n):
    sched = _scheduler(name)
    sched.set_timesteps(n)
    assert sched.timesteps.numpy().astype(np.int64).tolist() == DISC.timesteps(n).tolist()
    np.testing.assert_allclose(sched.sigmas.numpy(), DISC(n), rtol=1e-5, atol=0)


@pytest.mark.torch
@pytest.mark.parametrize("n", range(1, 9))
def test_lcm_schedule_equals_diffusers(n):
    sched = _scheduler("lcm")
    sched.set_timesteps(n)
    assert sched.timesteps.numpy().tolist() == lcm_timesteps(n).tolist()


@pytest.mark.torch
@pytest.mark.parametrize(
    ("name", "n"), [("euler", 4), ("euler", 10), ("euler_a", 4), ("dpmpp_2m", 4), ("dpmpp_2m", 10), ("lcm", 4)]
)
def test_trajectory_equals_diffusers_scheduler(name, n):
    """The same fake model stepped by diffusers and by our sampler: every latent agrees (VP latents rescaled)."""
    torch = pytest.importorskip("torch")
    sched = _scheduler(name)
    sched.set_timesteps(n)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    noises = [rng.standard_normal(noise.shape).astype(np.float32) for _ in range(n)]
    ts, sigmas, ours = _our_trajectory(name, n, noise, noises)
    # diffusers' start: Euler (VE) expects latents * init_noise_sigma = noise * sqrt(1+s0^2); VP schedulers x_T = noise
    ve = name in ("euler", "euler_a")
    s0 = float(sigmas[0])
    start = noise * math.sqrt(1 + s0 * s0) if ve else noise
    # what a pipeline does with given latents: multiply by init_noise_sigma (s0 for Euler, 1 for the VP ones)
    latents = torch.from_numpy(start / float(sched.init_noise_sigma)) * sched.init_noise_sigma
    it = iter(noises)
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea
    import diffusers.schedulers.scheduling_lcm as lcm_mod

    def fake_randn(shape, **kwargs):
        return torch.from_numpy(next(it))

    saved = ea.randn_tensor, lcm_mod.randn_tensor
    ea.randn_tensor = lcm_mod.randn_tensor = fake_randn
    try:
        for i, t in enumerate(sched.timesteps):
            model_in = sched.scale_model_input(latents, t)
            eps = torch.from_numpy(_fake_eps(model_in.numpy(), np.array([int(t)])))
            latents = sched.step(eps, t, latents).prev_sample
            s_next = float(sigmas[i + 1])
            ref = latents.numpy() if ve else latents.numpy() * math.sqrt(1 + s_next * s_next)
            rel = np.linalg.norm(ours[i] - ref) / np.linalg.norm(ref)
            assert rel < 2e-6, (name, i, rel)
    finally:
        ea.randn_tensor, lcm_mod.randn_tensor = saved


def test_sampler_table_names_every_runtime_sampler() -> None:
    """The functions and the table that says which diffusers scheduler checks each one name the same samplers."""
    from sdxl_ckpt.sdxl.samplers import REFERENCE_SAMPLERS, SAMPLERS, reference_sampler
    from sdxl_ckpt.sdxl_runtime.sampling import SAMPLERS as FUNCTIONS

    assert set(FUNCTIONS) == set(SAMPLERS)
    assert REFERENCE_SAMPLERS == ("euler", "dpmpp_2m", "lcm")
    assert reference_sampler("Euler") == "euler"
    with pytest.raises(InputError, match="no diffusers reference"):
        reference_sampler("euler_a")
    with pytest.raises(InputError, match="unknown sampler"):
        reference_sampler("ddim")
