"""``sdxl-ckpt reference``: run diffusers' SDXL pipeline (the independent reference) and store every stage.

What the reference does, and how it is aligned with our sampler (also written into the file's metadata):

1. Schedule: see reference_pipeline.configure_scheduler (trailing spacing = LegacyDDPM; LCM's own rule).
2. Initial noise: ``noise ~ N(0, 1)`` from ``torch.Generator().manual_seed(seed)``. Our sampler starts at
   ``x = noise * sqrt(1 + s0^2)``. A pipeline multiplies given latents by ``init_noise_sigma`` (Euler: s0, the
   VP schedulers: 1), so it is fed ``noise * sqrt(1 + s0^2) / s0`` (Euler) or ``noise`` (DPM-Solver, LCM: their
   DDPM-space start ``x / sqrt(1 + s0^2)`` is exactly ``noise``).
3. Refiner = img2img, diffusers' refiner semantics: a deterministic synthetic init image (smooth random colours
   from the seed) is VAE-encoded with the posterior MEAN (no sampling noise) and scaled; the pipeline gets that
   latent, runs the last ``int(steps * strength)`` steps of the ``steps``-step schedule, and adds its own noise at
   the first of them (``x = z + sigma * noise``), which is recorded.
4. LCM: the fresh noise LCMScheduler draws between steps is recorded. A UNet with ``time_cond_proj`` gets the
   guidance embedding of w = guidance - 1 and no CFG batch; without it (lcm-sdxl) the pipeline runs classic CFG.
5. Unconditional branch: as the pipeline decides. Base with no negative prompt: zero embeddings
   (``force_zeros_for_empty_prompt``); with one, or for the refiner: the encoded negative prompt.
6. Inpainting (9-channel UNet): StableDiffusionXLInpaintPipeline gets the synthetic image (as [0, 1]; it
   normalises to [-1, 1]) and a synthetic rectangular mask (1 = repaint). It binarises the mask, encodes the
   masked image ``image * (mask < 0.5)`` with the VAE (posterior MEAN here: the pipeline's own posterior sample is
   replaced by the mean, see capture.py), scales it, downsamples the mask (nearest) to the latent size and feeds
   the UNet ``[scale_model_input(x), mask, masked-image latent]``; a 9-channel UNet is never blended with the image.
   Strength 1 (default) starts from pure noise as txt2img (step 2); below 1 it is img2img on the encoded
   (unmasked) image, noise recorded.
7. instruct-pix2pix (8-channel UNet): StableDiffusionXLInstructPix2PixPipeline encodes the image (posterior mean,
   UNSCALED) and feeds ``[scale_model_input(x), image latent]``; with guidance > 1 and image guidance >= 1 the batch
   is [text + image, uncond + image, uncond + zero image], combined as
   ``u + g (text - image) + g_img (image - u)``. It takes no explicit timesteps: the trailing spacing must equal
   LegacyDDPM's (step counts that divide 1000).
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_ckpt import __version__
from sdxl_ckpt.errors import InputError
from sdxl_ckpt.formats.atomic import check_output
from sdxl_ckpt.formats.reference_npz import Reference, save_reference
from sdxl_ckpt.sdxl.samplers import reference_sampler
from sdxl_ckpt.sdxl.variants import CONCAT_KINDS

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
DEFAULT_STRENGTH = {"refiner": 0.5, "inpaint": 1.0}  # --strength when not given (only these kinds use it)


def _sha256_file(path: Path, h: Any = None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def source_sha256(src: Path) -> str:
    """sha256 of a file; of a folder: sha256 over each file's relative path and sha256, in sorted order."""
    if src.is_file():
        return _sha256_file(src)
    h = hashlib.sha256()
    for p in sorted(q for q in src.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(f"{p.relative_to(src).as_posix()}\0{_sha256_file(p)}\n".encode())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {
        "sdxl_ckpt": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _config_dict(config: Any) -> dict[str, Any]:
    """A component config as plain JSON data (diffusers FrozenDict or a transformers PretrainedConfig)."""
    import json

    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data = {
        k: v
        for k, v in data.items()
        if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_use_default_values")
    }
    return json.loads(json.dumps(data, default=str))


def synthetic_init_image(seed: int, height: int, width: int) -> Any:
    """A smooth, deterministic RGB image in [-1, 1] (1, 3, H, W): bilinear upsampling of random colours."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    coarse = torch.rand((1, 3, max(height // 32, 2), max(width // 32, 2)), generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def synthetic_mask(height: int, width: int) -> Any:
    """A deterministic inpainting mask (1, 1, H, W): 1 (repaint) in the rectangle of rows H/4..3H/4, columns
    W/2..W, 0 elsewhere; lopsided, so a transposed or flipped mask is told apart."""
    import torch

    mask = torch.zeros((1, 1, height, width), dtype=torch.float32)
    mask[:, :, height // 4 : (3 * height) // 4, width // 2 :] = 1.0
    return mask


@dataclass
class _Run:
    """One reference run as it is prepared: the loaded pipeline, its scheduler, the call and the inputs fed."""

    loaded: Any
    scheduler: Any
    explicit_timesteps: list[int] | None
    schedule_note: str
    height: int
    width: int
    lora: dict[str, Any] | None = None  # what ``load_lora`` applied, for the metadata
    call: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _load(
    src: Path,
    unet: Any,
    config_dir: Any,
    sampler: str,
    steps: int,
    height: int | None,
    width: int | None,
    lora: Any = None,
    lora_scale: float = 1.0,
    phased: bool = True,
) -> _Run:
    """The pipeline (with the LoRA loaded, if any) and our sampler's scheduler, and the image size (default: the
    UNet's native size). ``phased`` (without a LoRA, which is injected into the loaded UNet): the UNet is filled
    only after the prompt is encoded and the text encoders are released."""
    from sdxl_ckpt.reference.pipeline import configure_scheduler, load_lora, load_pipeline, quiet_libraries

    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    loaded = load_pipeline(src, unet, config_dir, phased=phased and lora is None)
    pipe = loaded.pipe
    lora_meta = load_lora(pipe, lora, lora_scale) if lora is not None else None
    pipe.set_progress_bar_config(disable=True)
    with quiet_libraries():
        scheduler, explicit_timesteps, schedule_note = configure_scheduler(
            pipe, sampler, steps, loaded.scheduler_config
        )
    scale = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * scale  # the img2img pipeline has no default_sample_size
    height, width = height or native, width or native
    if height % scale or width % scale:
        raise InputError(f"--height and --width must be multiples of {scale}, got {height}x{width}")
    return _Run(loaded, scheduler, explicit_timesteps, schedule_note, height, width, lora_meta)


def _prepare_inputs(
    run: _Run,
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    seed: int,
    guidance: float,
    strength: float,
    image_guidance: float = 1.5,
) -> None:
    """The pipeline call and what it is fed: the seeded noise, and the init image (img2img) or initial latent;
    inpainting: the image and mask; instruct-pix2pix: the image and its guidance scale."""
    import torch

    from sdxl_ckpt.reference.pipeline import latent_space, sigmas_of

    pipe, scheduler, variant = run.loaded.pipe, run.scheduler, run.loaded.variant
    scale = pipe.vae_scale_factor
    latent_shape = (1, pipe.vae.config.latent_channels, run.height // scale, run.width // scale)
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    run.call = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "guidance_scale": guidance,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(seed),
    }
    if run.explicit_timesteps is not None:
        if variant == "pix2pix":
            raise InputError(
                f"--steps {steps}: the instruct-pix2pix pipeline takes no explicit timesteps and its trailing "
                "spacing differs from LegacyDDPM's for this count (use a step count that divides 1000)"
            )
        run.call["timesteps"] = run.explicit_timesteps
    else:
        run.call["num_inference_steps"] = steps
    run.arrays["noise"] = noise.numpy().copy()
    if variant in CONCAT_KINDS:
        image01 = synthetic_init_image(seed, run.height, run.width) * 0.5 + 0.5  # [0, 1], as a user passes it
        run.arrays["init_image"] = (2.0 * image01 - 1.0).numpy().copy()  # diffusers' normalize: what it encodes
        run.call.update(image=image01, height=run.height, width=run.width)
        if variant == "inpaint":
            mask = synthetic_mask(run.height, run.width)
            run.arrays["inpaint_mask"] = mask.numpy().copy()
            if not 0.0 < strength <= 1.0:
                raise InputError(f"--strength must be in (0, 1], got {strength}")
            run.call.update(mask_image=mask, strength=strength)
            if strength < 1.0:  # img2img on the encoded image: the pipeline draws and adds the noise (recorded)
                return
        else:
            run.call["image_guidance_scale"] = image_guidance
    if run.loaded.refiner:
        init_image = synthetic_init_image(seed, run.height, run.width)
        with torch.no_grad():
            init_latent = pipe.vae.encode(init_image).latent_dist.mode() * pipe.vae.config.scaling_factor
        if getattr(pipe.vae.config, "latents_mean", None) is not None:
            raise InputError("VAEs with latents_mean/latents_std are not supported")
        run.call.update(image=init_latent, strength=strength)
        run.arrays.update(init_image=init_image.numpy().copy(), init_latent=init_latent.numpy().copy())
    else:
        first_t = scheduler.timesteps[0] if run.explicit_timesteps is None else run.explicit_timesteps[0]
        s0 = float(sigmas_of(scheduler, [first_t])[0])
        start = noise * math.sqrt(1.0 + s0 * s0) if latent_space(scheduler) == "ve" else noise
        # divided in float64, so the pipeline's float32 product with init_noise_sigma gives back ``start`` exactly
        # (at sigma ~4096, zero terminal SNR, one float32 ulp of the start is visible after the first step)
        latents = (start.double() / float(scheduler.init_noise_sigma)).float()
        run.call.update(latents=latents, height=run.height, width=run.width)


def _run_recorded(run: _Run) -> Any:
    """Run the pipeline once with the recording hooks; collect what it computed into ``run.arrays``."""
    import torch

    from sdxl_ckpt.reference.capture import Recording, legacy_step_callback, record, step_callback
    from sdxl_ckpt.reference.deferred import fill_after_encoding
    from sdxl_ckpt.reference.pipeline import quiet_libraries, sigmas_of

    pipe, variant = run.loaded.pipe, run.loaded.variant
    rec = Recording()
    if variant == "pix2pix":  # this pipeline has only the old per-step callback
        callbacks: dict[str, Any] = {"callback": legacy_step_callback(rec), "callback_steps": 1}
    else:
        callbacks = {"callback_on_step_end": step_callback(rec), "callback_on_step_end_tensor_inputs": ["latents"]}
    with quiet_libraries(), record(pipe, rec), fill_after_encoding(pipe, run.loaded.deferred), torch.no_grad():
        out = pipe(**run.call, **callbacks)
    if rec.add_noise:  # img2img (refiner, inpainting below strength 1): the noise actually added, and to what
        run.arrays["noise"] = rec.add_noise["noise"]
        if variant == "inpaint":
            run.arrays["init_latent"] = rec.add_noise["init_latent"]
    _collect(run.arrays, rec, run.scheduler, sigmas_of, np.asarray(out.images, dtype=np.float32))
    _collect_inputs(run.arrays, rec, variant, int(pipe.vae.config.latent_channels))
    return rec


def _collect_inputs(arrays: dict[str, np.ndarray], rec: Any, variant: str, latent_channels: int) -> None:
    """The extra UNet input channels the pipeline fed at its first call (conditional row), and the masked image
    its VAE encoded: what our side must rebuild from the stored image and mask."""
    x, c = rec.unet_first["unet_in_x"], latent_channels
    if variant == "inpaint":
        arrays["masked_image"] = rec.vae_encode[-1]["image"]  # prepare_mask_latents encodes last
        arrays["inpaint_mask_latent"] = x[-1:, c : c + 1].copy()
        arrays["masked_image_latent"] = x[-1:, c + 1 :].copy()
    elif variant == "pix2pix":
        arrays["image_latent"] = x[:1, c:].copy()


def _metadata(run: _Run, rec: Any, src: Path, unet: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Settings, schedule, every component config, provenance and the alignment notes stored with the arrays."""
    from sdxl_ckpt.reference.pipeline import latent_space, recorded_schedule

    pipe, scheduler, refiner, variant = run.loaded.pipe, run.scheduler, run.loaded.refiner, run.loaded.variant
    cfg = run.arrays["context"].shape[0] > 1
    space = latent_space(scheduler)
    truncated = refiner or variant == "inpaint"  # the kinds whose schedule strength shortens
    return {
        "variant": _variant(run.loaded, settings["sampler"]),
        "structure": "refiner" if refiner else "base",
        "settings": {
            **settings,
            "steps_run": len(rec.timesteps),
            "height": run.height,
            "width": run.width,
            "strength": settings["strength"] if truncated else None,
            "image_guidance": settings["image_guidance"] if variant == "pix2pix" else None,
            "cfg": cfg,
            "uncond": "none" if not cfg else ("encoded" if len(rec.te2) == 2 else "zeros"),
            "img2img_start": settings["steps"] - len(rec.timesteps) if truncated else 0,
        },
        "schedule": {
            **recorded_schedule(scheduler),
            "latent_space": space,
            "scheduler": type(scheduler).__name__,
            "alignment": run.schedule_note,
        },
        "latents": vae_latents(pipe.vae.config),
        "configs": {
            "unet": _config_dict(pipe.unet.config),
            "vae": _config_dict(pipe.vae.config),
            "text_encoder": _config_dict(pipe.text_encoder.config) if getattr(pipe, "text_encoder", None) else None,
            "text_encoder_2": _config_dict(pipe.text_encoder_2.config),
            "scheduler": _config_dict(scheduler.config),
        },
        "source": {
            "path": str(src),
            "kind": run.loaded.kind,
            "sha256": source_sha256(src),
            "unet": str(unet) if unet is not None else None,
            "unet_sha256": source_sha256(Path(unet)) if unet is not None else None,
            "lora": run.lora,
        },
        "versions": _versions(),
        "dtype": "fp32",
        "device": "cpu",
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "alignment": [
            run.schedule_note,
            "initial latent: ours x = noise*sqrt(1+s0^2); pipeline given noise*sqrt(1+s0^2)/init_noise_sigma (Euler,"
            " EDM) or noise (DPM-Solver/LCM, DDPM space)"
            if not refiner
            else "img2img: init latent = VAE posterior mean * scaling_factor; x = z + sigma_start * recorded noise",
            f"latents stored in the scheduler's space ({space}); VP latents = x / sqrt(1+sigma^2)",
            *_input_notes(variant),
            _denoiser_note(run.scheduler),
        ],
    }


def _input_notes(variant: str) -> list[str]:
    """How the extra UNet input channels were made (inpainting, instruct-pix2pix)."""
    if variant == "inpaint":
        return [
            "inpainting: UNet input [scale_model_input(x), mask, masked-image latent]; mask = synthetic rectangle "
            "(1 = repaint), binarised, nearest-downsampled; masked image = image * (mask < 0.5), VAE posterior "
            "mean (not a sample) * scaling_factor; no blending (9-channel UNet)"
        ]
    if variant == "pix2pix":
        return [
            "instruct-pix2pix: UNet input [scale_model_input(x), image latent]; image latent = VAE posterior mean, "
            "unscaled; CFG batch [text+image, uncond+image, uncond+zeros], "
            "eps = u + g (text - image) + g_img (image - u)"
        ]
    return []


def make_reference(
    src: str | os.PathLike,
    *,
    prompt: str = DEFAULT_PROMPT,
    negative_prompt: str | None = None,
    steps: int = 4,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    guidance: float = 5.0,
    sampler: str = "euler",
    strength: float | None = None,
    unet: str | os.PathLike | None = None,
    config_dir: str | os.PathLike | None = None,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    image_guidance: float = 1.5,
    phased: bool = True,
) -> Reference:
    """Run the pipeline with recording hooks and return the reference (arrays + metadata), in memory.

    The steps: load the pipeline with our sampler's scheduler, prepare its inputs from the seed, run it once
    with the hooks, then store what it computed together with everything needed to repeat it.
    ``strength`` None: the variant's default (refiner 0.5, inpainting 1.0 = from pure noise). ``phased``: the
    text encoders are freed before the UNet is filled (same arrays; one model in memory at a time).
    """
    from sdxl_ckpt.reference.pipeline import require_torch

    require_torch()
    src, sampler = Path(src), reference_sampler(sampler)
    run = _load(src, unet, config_dir, sampler, steps, height, width, lora, lora_scale, phased)
    if strength is None:
        strength = DEFAULT_STRENGTH.get(run.loaded.variant, 0.5)
    _prepare_inputs(run, prompt, negative_prompt, steps, seed, guidance, strength, image_guidance)
    rec = _run_recorded(run)
    settings = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "steps": steps,
        "seed": seed,
        "guidance": guidance,
        "sampler": sampler,
        "strength": strength,
        "image_guidance": image_guidance,
    }
    return Reference(run.arrays, _metadata(run, rec, src, unet, settings))


def _variant(loaded: Any, sampler: str) -> str:
    """The variant row (sdxl.variants) of the model that ran, as the one detector found it when the pipeline was
    loaded; a base-structured model sampled with the lcm sampler is lcm (an LCM UNet has the base's configs)."""
    return "lcm" if loaded.variant == "base" and sampler == "lcm" else loaded.variant


def _denoiser_note(scheduler: Any) -> str:
    """One line on how the UNet output becomes the clean estimate, for the alignment notes."""
    from sdxl_ckpt.reference.pipeline import recorded_schedule

    sched = recorded_schedule(scheduler)
    if sched["kind"] == "edm":
        return (
            f"EDM preconditioning, sigma_data {sched['sigma_data']:g}, {sched['prediction_type']}: UNet timestep "
            "c_noise = ln(sigma)/4, no snapping to training sigmas"
        )
    zero = ", schedule rescaled to zero terminal SNR (last abar 2**-24)" if sched["rescale_betas_zero_snr"] else ""
    return f"discrete DDPM denoiser, {sched['prediction_type']} prediction{zero}"


def vae_latents(vae_config: Any) -> dict[str, Any]:
    """How sampler latents map to the VAE's: ``z_vae = z * std / scaling_factor + mean`` (per channel) when the
    VAE config has latents_mean / latents_std (Playground v2.5), else ``z / scaling_factor``: diffusers' rule."""
    config = dict(vae_config)
    mean, std = config.get("latents_mean"), config.get("latents_std")
    both = mean is not None and std is not None
    return {
        "scaling_factor": float(config["scaling_factor"]),
        "mean": [float(v) for v in mean] if both else None,
        "std": [float(v) for v in std] if both else None,
    }


def _collect(arrays: dict[str, np.ndarray], rec: Any, scheduler: Any, sigmas_of: Any, image: np.ndarray) -> None:
    """Recorded calls -> the named arrays of refdata's list."""
    for prefix, calls in (("te1", rec.te1), ("te2", rec.te2)):
        for branch, call in zip(("cond", "uncond"), calls):
            n = "1" if prefix == "te1" else "2"
            arrays[f"ids{n}_{branch}"] = call["ids"].astype(np.int64)
            arrays[f"{prefix}_hidden_{branch}"] = call["hidden"]
            if "pooled" in call:
                arrays[f"te2_pooled_{branch}"] = call["pooled"]
    first = rec.unet_first
    arrays.update({k: first[k] for k in ("unet_in_x", "unet_in_t", "unet_in_context", "unet_out", "time_ids")})
    arrays["context"] = first["unet_in_context"]
    arrays["unet_in_y"] = arrays["y"] = rec.y
    if "timestep_cond" in first:
        arrays["timestep_cond"] = first["timestep_cond"]
    arrays["timesteps"] = np.asarray(rec.timesteps, dtype=np.float32 if rec.continuous else np.int64)
    arrays["sigmas"] = sigmas_of(scheduler, rec.timesteps)
    arrays["latents"] = np.stack(rec.latents)
    arrays["final_latent"] = rec.latents[-1]
    if rec.step_noise:
        arrays["step_noise"] = np.stack(rec.step_noise)
    arrays["decoded"] = rec.decoded
    arrays["image"] = image
    arrays["image_u8"] = (image * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil rule


def run_reference(
    src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, **kwargs: Any
) -> tuple[Path, Reference]:
    """The CLI command: check the output first, compute, write the npz atomically."""
    check_output(out, overwrite, inputs=(src, kwargs.get("unet"), kwargs.get("config_dir")))
    ref = make_reference(src, **kwargs)
    return save_reference(out, ref, overwrite), ref


def summary_rows(ref: Reference) -> list[dict[str, Any]]:
    """A short table of what was stored (name, shape, dtype), for the command's output."""
    return [
        {"array": k, "shape": "x".join(str(d) for d in v.shape) or "scalar", "dtype": str(v.dtype)}
        for k, v in sorted(ref.arrays.items())
    ]
