"""Record what diffusers' pipeline computes, without changing it: forward hooks and thin recording wrappers.

Everything recorded is what the pipeline itself used (token ids from its tokenizers, the UNet's own inputs, the
noise its scheduler drew), so the reference is diffusers' computation, not our re-derivation of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().float().numpy().copy() if t.is_floating_point() else t.detach().cpu().numpy().copy()


@dataclass
class Recording:
    te1: list[dict[str, np.ndarray]] = field(default_factory=list)  # one per call: ids, hidden
    te2: list[dict[str, np.ndarray]] = field(default_factory=list)  # ids, hidden, pooled
    unet_calls: int = 0
    unet_first: dict[str, np.ndarray] = field(default_factory=dict)
    y: np.ndarray | None = None
    latents: list[np.ndarray] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    step_noise: list[np.ndarray] = field(default_factory=list)
    add_noise: dict[str, np.ndarray] = field(default_factory=dict)
    decoded: np.ndarray | None = None
    vae_encode: list[dict[str, np.ndarray]] = field(default_factory=list)  # per call: image, posterior mean
    continuous: bool = False  # EDM: the timesteps are c_noise floats, not training-timestep indices


def _timesteps(timestep: Any, batch: int, continuous: bool) -> np.ndarray:
    """The UNet's timestep per batch row: float32 c_noise (EDM) or the int64 training timestep."""
    value = float(timestep.reshape(-1)[0]) if hasattr(timestep, "reshape") else float(timestep)
    if continuous:
        return np.full((batch,), value, dtype=np.float32)
    return np.full((batch,), int(value), dtype=np.int64)


def _text_hook(store: list[dict[str, np.ndarray]], pooled: bool):
    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        entry = {"ids": _np(ids), "hidden": _np(output.hidden_states[-2])}  # what SDXL's pipeline takes
        if pooled:
            entry["pooled"] = _np(output.text_embeds)
        store.append(entry)

    return hook


def _unet_hook(rec: Recording):
    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        rec.unet_calls += 1
        if rec.unet_calls > 1:
            return
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        added = kwargs.get("added_cond_kwargs") or {}
        first = {
            "unet_in_x": _np(sample),
            "unet_in_t": _timesteps(timestep, sample.shape[0], rec.continuous),
            "unet_in_context": _np(kwargs["encoder_hidden_states"]),
            "time_ids": _np(added["time_ids"]),
            "pooled": _np(added["text_embeds"]),
            "unet_out": _np(output[0] if isinstance(output, tuple) else output.sample),
        }
        if kwargs.get("timestep_cond") is not None:
            first["timestep_cond"] = _np(kwargs["timestep_cond"])
        rec.unet_first = first

    return hook


def _y_hook(rec: Recording):
    def hook(module: Any, args: tuple) -> None:
        if rec.y is None:  # add_embedding's input IS sgm's y: [pooled | sinusoidal(time_ids)]
            rec.y = _np(args[0])

    return hook


def step_callback(rec: Recording):
    """callback_on_step_end: the latents right after each scheduler step."""

    def callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        rec.latents.append(_np(kwargs["latents"]))
        rec.timesteps.append(float(t) if rec.continuous else int(t))
        return kwargs

    return callback


def legacy_step_callback(rec: Recording):
    """The old ``callback(step, t, latents)`` (instruct-pix2pix has no callback_on_step_end): the same record."""
    on_step_end = step_callback(rec)

    def callback(i: int, t: Any, latents: Any) -> None:
        on_step_end(None, i, t, {"latents": latents})

    return callback


def _mean_encoder(vae_encode: Any, rec: Recording):
    """``vae.encode`` recording its input and posterior mean, and returning a posterior whose ``sample`` IS the mean.

    Inpainting's ``_encode_vae_image`` draws a posterior sample from the pipeline's generator; a reference is
    deterministic and comparable only with the mean (what instruct-pix2pix's ``argmax`` and our encoder give).
    """

    def encode(x: Any, *args: Any, **kwargs: Any) -> Any:
        out = vae_encode(x, *args, **kwargs)
        dist = out[0] if isinstance(out, tuple) else out.latent_dist
        rec.vae_encode.append({"image": _np(x), "mean": _np(dist.mode())})
        dist.sample = lambda generator=None: dist.mode()
        return out

    return encode


@contextlib.contextmanager
def record(pipe: Any, rec: Recording) -> Iterator[Recording]:
    """Install hooks on the encoders, UNet, add_embedding, VAE encode / decode, scheduler noise; remove them after.

    The one change to the computation: a VAE posterior is taken at its mean, never sampled (``_mean_encoder``).
    """
    import diffusers.schedulers.scheduling_lcm as lcm_module

    from sdxl_ckpt.reference.pipeline import is_edm

    rec.continuous = is_edm(pipe.scheduler)
    handles = []
    if getattr(pipe, "text_encoder", None) is not None:
        handles.append(pipe.text_encoder.register_forward_hook(_text_hook(rec.te1, False), with_kwargs=True))
    handles.append(pipe.text_encoder_2.register_forward_hook(_text_hook(rec.te2, True), with_kwargs=True))
    handles.append(pipe.unet.register_forward_hook(_unet_hook(rec), with_kwargs=True))
    handles.append(pipe.unet.add_embedding.register_forward_pre_hook(_y_hook(rec)))

    vae_decode = pipe.vae.decode

    def decode(z: Any, *args: Any, **kwargs: Any) -> Any:
        out = vae_decode(z, *args, **kwargs)
        rec.decoded = _np(out[0] if isinstance(out, tuple) else out.sample)
        return out

    scheduler = pipe.scheduler
    add_noise = scheduler.add_noise

    def recording_add_noise(original: Any, noise: Any, timesteps: Any) -> Any:
        rec.add_noise = {"init_latent": _np(original), "noise": _np(noise), "timestep": _np(timesteps)}
        return add_noise(original, noise, timesteps)

    lcm_randn = lcm_module.randn_tensor

    def recording_randn(*args: Any, **kwargs: Any) -> Any:
        out = lcm_randn(*args, **kwargs)
        rec.step_noise.append(_np(out))
        return out

    pipe.vae.decode = decode
    pipe.vae.encode = _mean_encoder(pipe.vae.encode, rec)
    scheduler.add_noise = recording_add_noise
    lcm_module.randn_tensor = recording_randn
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
        del pipe.vae.decode
        del pipe.vae.encode
        del scheduler.add_noise
        lcm_module.randn_tensor = lcm_randn
