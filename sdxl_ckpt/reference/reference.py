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

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"


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
        scheduler, explicit_timesteps, schedule_note = configure_scheduler(pipe, sampler, steps)
    scale = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * scale  # the img2img pipeline has no default_sample_size
    height, width = height or native, width or native
    if height % scale or width % scale:
        raise InputError(f"--height and --width must be multiples of {scale}, got {height}x{width}")
    return _Run(loaded, scheduler, explicit_timesteps, schedule_note, height, width, lora_meta)


def _prepare_inputs(
    run: _Run, prompt: str, negative_prompt: str | None, steps: int, seed: int, guidance: float, strength: float
) -> None:
    """The pipeline call and what it is fed: the seeded noise, and the init image (img2img) or initial latent."""
    import torch

    from sdxl_ckpt.reference.pipeline import latent_space, sigmas_of

    pipe, scheduler = run.loaded.pipe, run.scheduler
    scale = pipe.vae_scale_factor
    latent_shape = (1, pipe.unet.config.in_channels, run.height // scale, run.width // scale)
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    run.call = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "guidance_scale": guidance,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(seed),
    }
    if run.explicit_timesteps is not None:
        run.call["timesteps"] = run.explicit_timesteps
    else:
        run.call["num_inference_steps"] = steps
    run.arrays["noise"] = noise.numpy().copy()
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
        s0 = float(sigmas_of(scheduler, [int(first_t)])[0])
        start = noise * math.sqrt(1.0 + s0 * s0) if latent_space(scheduler) == "ve" else noise
        run.call.update(latents=start / scheduler.init_noise_sigma, height=run.height, width=run.width)


def _run_recorded(run: _Run) -> Any:
    """Run the pipeline once with the recording hooks; collect what it computed into ``run.arrays``."""
    import torch

    from sdxl_ckpt.reference.capture import Recording, record, step_callback
    from sdxl_ckpt.reference.deferred import fill_after_encoding
    from sdxl_ckpt.reference.pipeline import quiet_libraries, sigmas_of

    pipe = run.loaded.pipe
    rec = Recording()
    with quiet_libraries(), record(pipe, rec), fill_after_encoding(pipe, run.loaded.deferred), torch.no_grad():
        out = pipe(**run.call, callback_on_step_end=step_callback(rec), callback_on_step_end_tensor_inputs=["latents"])
    if run.loaded.refiner:
        run.arrays["noise"] = rec.add_noise["noise"]  # the noise img2img actually added
    _collect(run.arrays, rec, run.scheduler, sigmas_of, np.asarray(out.images, dtype=np.float32))
    return rec


def _metadata(run: _Run, rec: Any, src: Path, unet: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Settings, schedule, every component config, provenance and the alignment notes stored with the arrays."""
    from sdxl_ckpt.reference.pipeline import latent_space

    pipe, scheduler, refiner = run.loaded.pipe, run.scheduler, run.loaded.refiner
    cfg = run.arrays["context"].shape[0] == 2
    space = latent_space(scheduler)
    return {
        "variant": _variant(run.loaded, settings["sampler"]),
        "structure": "refiner" if refiner else "base",
        "settings": {
            **settings,
            "steps_run": len(rec.timesteps),
            "height": run.height,
            "width": run.width,
            "strength": settings["strength"] if refiner else None,
            "cfg": cfg,
            "uncond": "none" if not cfg else ("encoded" if len(rec.te2) == 2 else "zeros"),
            "img2img_start": settings["steps"] - len(rec.timesteps) if refiner else 0,
        },
        "schedule": {
            **{k: dict(scheduler.config)[k] for k in ("beta_start", "beta_end", "num_train_timesteps")},
            "beta_schedule": "scaled_linear",
            "latent_space": space,
            "scheduler": type(scheduler).__name__,
            "alignment": run.schedule_note,
        },
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
            "initial latent: ours x = noise*sqrt(1+s0^2); pipeline given noise*sqrt(1+s0^2)/init_noise_sigma (Euler)"
            " or noise (DPM-Solver/LCM, DDPM space)"
            if not refiner
            else "img2img: init latent = VAE posterior mean * scaling_factor; x = z + sigma_start * recorded noise",
            f"latents stored in the scheduler's space ({space}); VP latents = x / sqrt(1+sigma^2)",
        ],
    }


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
    strength: float = 0.5,
    unet: str | os.PathLike | None = None,
    config_dir: str | os.PathLike | None = None,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    phased: bool = True,
) -> Reference:
    """Run the pipeline with recording hooks and return the reference (arrays + metadata), in memory.

    The steps: load the pipeline with our sampler's scheduler, prepare its inputs from the seed, run it once
    with the hooks, then store what it computed together with everything needed to repeat it. ``phased``: the
    text encoders are freed before the UNet is filled (same arrays; one model in memory at a time).
    """
    from sdxl_ckpt.reference.pipeline import require_torch

    require_torch()
    src, sampler = Path(src), reference_sampler(sampler)
    run = _load(src, unet, config_dir, sampler, steps, height, width, lora, lora_scale, phased)
    _prepare_inputs(run, prompt, negative_prompt, steps, seed, guidance, strength)
    rec = _run_recorded(run)
    settings = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "steps": steps,
        "seed": seed,
        "guidance": guidance,
        "sampler": sampler,
        "strength": strength,
    }
    return Reference(run.arrays, _metadata(run, rec, src, unet, settings))


def _variant(loaded: Any, sampler: str) -> str:
    """base | refiner | lcm: the SD file's own label when it has one, else the structure (lcm when sampled so)."""
    label = loaded.metadata.get("sdxl_ckpt.variant")
    if label in ("base", "refiner", "lcm"):
        return label
    if loaded.refiner:
        return "refiner"
    return "lcm" if sampler == "lcm" else "base"


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
    arrays["timesteps"] = np.asarray(rec.timesteps, dtype=np.int64)
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
