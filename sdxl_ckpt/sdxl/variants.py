"""The SDXL-family variants, how each is recognised, what differs, and the ONE detector every command uses.

A variant is not a key structure: every row here has the base or the refiner key structure (``structure``); its
widths and depths are read from the weights (``sdxl.architecture``). What tells the rows apart is the UNet's
input channels, its transformer depths, the guidance embedding, and marker tensors other tools save beside the
weights (ComfyUI's ``v_pred`` / ``ztsnr`` / ``edm_vpred.*``, Playground's ``edm_mean`` / ``edm_std``), or the
metadata this tool writes. Fine-tunes that change only values (Turbo, Lightning, LCM-merged, Pony) have nothing
to detect and are ``base``.

Sentinels are diffusers' own (``single_file_utils``): the OpenCLIP block 9 MLP bias sits under embedder 1 in
base (CLIP-L is embedder 0) and under embedder 0 in the refiner (its only encoder).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sdxl_ckpt.errors import InputError

UNET_PREFIX = "model.diffusion_model."
BASE_SENTINEL = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
REFINER_SENTINEL = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"
COND_PROJ_KEY = UNET_PREFIX + "time_cond_proj.weight"  # the LCM guidance embedding (no bias); this project's name
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"  # (model_channels, in_channels, 3, 3)
VARIANT_METADATA = "sdxl_ckpt.variant"
SDXL_VAE_SCALING = 0.13025
PLAYGROUND_VAE_SCALING = 0.5  # with per-channel latents_mean / latents_std (diffusers' PLAYGROUND_VAE_SCALING_FACTOR)

# Tensors that carry a fact, not weights: kept as they are in every format (a ckpt has no metadata, so they are
# the only way it can say so) and restored by ms-to-st because they are never renamed.
MARKERS: dict[str, str] = {
    "edm_mean": "Playground v2.5: per-channel latent mean (EDM schedule, VAE scaling 0.5)",
    "edm_std": "Playground v2.5: per-channel latent std (EDM schedule, VAE scaling 0.5)",
    "v_pred": "ComfyUI's v-prediction marker",
    "ztsnr": "ComfyUI's zero-terminal-SNR marker",
    "edm_vpred.sigma_max": "ComfyUI's EDM v-prediction sigma_max",
    "edm_vpred.sigma_min": "ComfyUI's EDM v-prediction sigma_min",
}

# markers whose presence is the fact: ComfyUI saves them empty (shape [0]); a ckpt cannot hold an empty tensor, so
# they travel through it as one zero [1] and come back empty
PRESENCE_MARKERS = frozenset({"v_pred", "ztsnr"})

# marker tensor -> the VAE config field it carries (Playground v2.5's per-channel latent statistics)
LATENT_MARKERS = {"edm_mean": "latents_mean", "edm_std": "latents_std"}

# Tensors trainers leave in a checkpoint that no SDXL network reads: dropped, each with its reason.
_DDPM = (
    "betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    "|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    "|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar"
)
LEFTOVERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"(?:{_DDPM})"), "DDPM schedule buffer a trainer saved; the schedule is recomputed, never read"),
    (re.compile(r"denoiser\.sigmas"), "sgm denoiser buffer (the discretization's sigmas); recomputed, never read"),
    (re.compile(r"model_ema\..*"), "EMA copy of the UNet a trainer saved; SDXL runs the main weights"),
)

_DDPM_SCHEDULE = "DDPM scaled_linear betas 0.00085..0.012, 1000 steps"
_EDM_SCHEDULE = "EDM sigmas 0.002..80, sigma_data 0.5"
EDM_SCHEDULER: dict[str, Any] = {  # Playground v2.5's scheduler (diffusers' edm_dpm_solver_multistep defaults)
    "_class_name": "EDMDPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rho": 7.0,
    "sample_max_value": 1.0,
    "sigma_data": 0.5,
    "sigma_max": 80.0,
    "sigma_min": 0.002,
    "solver_order": 2,
    "solver_type": "midpoint",
    "thresholding": False,
}

# EDM v-prediction (ComfyUI's V_PREDICTION_EDM, e.g. CosXL): EDM sigmas, v-prediction, and ComfyUI's default
# sigma_data of 1.0 for it (its ``edm_vpred.*`` markers carry only the sigma range)
EDM_VPRED_SCHEDULER: dict[str, Any] = {
    "_class_name": "EDMEulerScheduler",
    "final_sigmas_type": "zero",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rho": 7.0,
    "sigma_data": 1.0,
    "sigma_max": 120.0,
    "sigma_min": 0.002,
    "sigma_schedule": "karras",
}


@dataclass(frozen=True)
class Variant:
    """One row of the table: how a file of this kind is recognised and what differs from SDXL base."""

    name: str
    structure: str  # base | refiner: which encoders, which SD prefixes
    recognised: str
    in_channels: int = 4
    prediction_type: str = "epsilon"
    schedule: str = "ddpm"  # ddpm: the discrete 1000-step training schedule; edm: continuous EDM sigmas
    discretization: str = _DDPM_SCHEDULE
    vae_scaling: str = f"{SDXL_VAE_SCALING}"
    encoders: tuple[str, ...] = ("CLIP-L", "OpenCLIP bigG")
    diffusers_type: str | None = None  # diffusers' infer_diffusers_model_type name, when it knows the kind
    pipeline: str = "StableDiffusionXLPipeline"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("base", "base", f"sentinel {BASE_SENTINEL!r}; none of the rows below", diffusers_type="xl_base"),
        Variant(
            "refiner",
            "refiner",
            f"sentinel {REFINER_SENTINEL!r}",
            encoders=("OpenCLIP bigG",),
            diffusers_type="xl_refiner",
            pipeline="StableDiffusionXLImg2ImgPipeline",
        ),
        Variant(
            "lcm",
            "base",
            f"metadata {VARIANT_METADATA}=lcm, or the guidance embedding {COND_PROJ_KEY!r}",
            discretization="LCM consistency steps on the DDPM schedule",
        ),
        Variant(
            "inpaint",
            "base",
            f"{CONV_IN_KEY!r} with 9 input channels (latent + mask + masked-image latent)",
            in_channels=9,
            diffusers_type="xl_inpaint",
            pipeline="StableDiffusionXLInpaintPipeline",
        ),
        Variant(
            "pix2pix",
            "base",
            f"{CONV_IN_KEY!r} with 8 input channels (latent + image latent)",
            in_channels=8,
            pipeline="StableDiffusionXLInstructPix2PixPipeline",
        ),
        Variant(
            "playground-v2.5",
            "base",
            "marker tensors 'edm_mean' and 'edm_std'",
            schedule="edm",
            discretization=_EDM_SCHEDULE,
            vae_scaling=f"{PLAYGROUND_VAE_SCALING} with per-channel latents mean/std (edm_mean, edm_std)",
            diffusers_type="playground-v2-5",
        ),
        Variant(
            "v-pred",
            "base",
            "marker tensor 'v_pred' ('ztsnr' too: zero terminal SNR)",
            prediction_type="v_prediction",
            discretization=_DDPM_SCHEDULE + " (rescaled to zero terminal SNR when 'ztsnr' is present)",
        ),
        Variant(
            "v-pred-edm",
            "base",
            "marker tensor 'edm_vpred.sigma_max' ('edm_vpred.sigma_min' too)",
            prediction_type="v_prediction",
            schedule="edm",
            discretization="EDM sigmas between edm_vpred.sigma_min and edm_vpred.sigma_max",
        ),
        Variant("ssd-1b", "base", "UNet down transformer depths [0, 0, 2, 2, 4, 4] (Segmind SSD-1B)"),
        Variant("vega", "base", "UNet down transformer depths [0, 0, 1, 1, 2, 2] (Segmind Vega)"),
        Variant("distilled", "base", "UNet transformer depths unlike SDXL base's [0, 0, 2, 2, 10, 10] (e.g. KOALA)"),
    )
}
VARIANT_NAMES = tuple(VARIANTS)
# the kinds whose official configs, generated keymaps and runtime samplers exist (the others convert by structure)
MODEL_KINDS = ("base", "refiner", "lcm")
# the kinds whose UNet takes extra input channels beside the latent (inpainting's mask + masked-image latent,
# instruct-pix2pix's image latent): their configs say the width, the sampler feeds the extra channels
CONCAT_KINDS = tuple(v.name for v in VARIANTS.values() if v.in_channels != 4)
# the distilled UNets named by their down-path transformer depths, one entry per down layer
DEPTH_PATTERNS: dict[tuple[int, ...], str] = {(0, 0, 2, 2, 4, 4): "ssd-1b", (0, 0, 1, 1, 2, 2): "vega"}
SDXL_BASE_DEPTHS = (0, 0, 2, 2, 10, 10)


@dataclass(frozen=True)
class Detection:
    variant: str
    reason: str
    note: str | None = None  # shown to the user (e.g. "treated as base")


def leftover_reason(name: str) -> str | None:
    """Why a trainer leftover is dropped, or None when ``name`` is not one."""
    for pattern, reason in LEFTOVERS:
        if pattern.fullmatch(name):
            return reason
    return None


def structure_from_keys(names: Mapping[str, Any], path: object | None = None) -> str:
    """base or refiner, from the sentinel keys (SD and MindSpore names alike)."""
    is_base, is_refiner = BASE_SENTINEL in names, REFINER_SENTINEL in names
    if is_base == is_refiner:
        found = "both" if is_base else "neither"
        raise InputError(
            f"not an SDXL checkpoint: {found} of the sentinel keys {BASE_SENTINEL!r} (base) and "
            f"{REFINER_SENTINEL!r} (refiner) found",
            path=path,
        )
    return "base" if is_base else "refiner"


MODELSPEC_ARCHITECTURE = {"base": "stable-diffusion-xl-v1-base", "refiner": "stable-diffusion-xl-v1-refiner"}
# SDXL's added conditioning: base (original size, crop, target size) = 6 numbers; refiner (size, crop, aesthetic) = 5
TIME_IDS = {"base": 6, "refiner": 5}


def structure_from_configs(unet: Mapping[str, Any], text_encoder_2: Mapping[str, Any], path: object) -> str:
    """base or refiner, from diffusers configs (diffusers' own criterion: the added-conditioning width)."""
    if unet.get("addition_embed_type") != "text_time":
        raise InputError(
            f"not an SDXL UNet: addition_embed_type is {unet.get('addition_embed_type')!r}, SDXL has 'text_time'",
            path=path,
        )
    try:
        extra = int(unet["projection_class_embeddings_input_dim"]) - int(text_encoder_2["projection_dim"])
        ids, rest = divmod(extra, int(unet["addition_time_embed_dim"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise InputError(
            "UNet / text_encoder_2 config lacks projection_class_embeddings_input_dim, "
            "addition_time_embed_dim or projection_dim",
            path=path,
        ) from None
    by_ids = {n: s for s, n in TIME_IDS.items()}
    if rest or ids not in by_ids:
        count = extra / int(unet["addition_time_embed_dim"])
        raise InputError(
            f"not an SDXL base or refiner UNet: its added conditioning holds {count:g} time ids (base 6, refiner 5)",
            path=path,
        )
    return by_ids[ids]


def markers_from_scheduler(scheduler: Mapping[str, Any], vae: Mapping[str, Any] | None) -> set[str]:
    """The marker tensors an SD file of a diffusers folder with this scheduler / VAE config should carry."""
    markers = set()
    if vae and all(vae.get(field) is not None for field in LATENT_MARKERS.values()):
        markers |= set(LATENT_MARKERS)
    elif "EDM" in str(scheduler.get("_class_name", "")) and scheduler.get("prediction_type") == "v_prediction":
        markers |= {"edm_vpred.sigma_max", "edm_vpred.sigma_min"}
    elif scheduler.get("prediction_type") == "v_prediction":
        markers.add("v_pred")
        if scheduler.get("rescale_betas_zero_snr"):
            markers.add("ztsnr")
    return markers


# the marker tensors that name a variant, in the order they are tested (Playground's statistics first)
MARKER_VARIANTS: tuple[tuple[str, frozenset[str]], ...] = (
    ("playground-v2.5", frozenset({"edm_mean", "edm_std"})),
    ("v-pred-edm", frozenset({"edm_vpred.sigma_max"})),
    ("v-pred", frozenset({"v_pred"})),
)


def marker_variant(markers: set[str] | frozenset[str]) -> str | None:
    """The variant the marker tensors name, or None when they name none."""
    return next((name for name, keys in MARKER_VARIANTS if keys <= markers), None)


def marker_values(entries: Iterable[Any]) -> dict[str, list[float]]:
    """The marker tensors among ``entries`` (lazy TensorEntry objects), name -> values as floats (a presence
    marker has none, or one zero in a ckpt). Loads only these few tiny tensors."""
    from sdxl_ckpt.formats.dtypes import to_float32

    return {e.name: [float(v) for v in to_float32(e.load(), e.dtype).reshape(-1)] for e in entries if e.name in MARKERS}


def stated_sampling(markers: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint's marker tensors (name -> values, a list of floats) say about how it is sampled.

    A ckpt has no metadata: these facts are all a user of it has (ComfyUI reads them the same way), so verify
    checks the reference against them. Keys: prediction_type, schedule (ddpm | edm), zero_snr, and the values
    the markers carry (sigma_min / sigma_max of EDM v-prediction, Playground's latents_mean / latents_std).
    """
    variant = marker_variant(frozenset(markers)) or "base"
    row = VARIANTS[variant]
    facts: dict[str, Any] = {
        "prediction_type": row.prediction_type,
        "schedule": row.schedule,
        "zero_snr": variant == "v-pred" and "ztsnr" in markers,
    }
    carried = {**LATENT_MARKERS, "edm_vpred.sigma_max": "sigma_max", "edm_vpred.sigma_min": "sigma_min"}
    for name, field in carried.items():
        if name in markers and variant in ("playground-v2.5", "v-pred-edm"):
            values = [float(v) for v in markers[name]]
            facts[field] = values if name in LATENT_MARKERS else values[0]
    return facts


def _down_depths(unet: Mapping[str, Any]) -> tuple[int, ...]:
    types = unet.get("down_block_types") or ()
    layers = unet.get("layers_per_block", 2)
    depth = unet.get("transformer_layers_per_block", 1)
    out: list[int] = []
    for i, kind in enumerate(types):
        count = layers if isinstance(layers, int) else layers[i]
        value = depth if isinstance(depth, int) else depth[i]
        for j in range(count):
            d = value if isinstance(value, int) else value[j]
            out.append(int(d) if kind.startswith("CrossAttn") else 0)
    return tuple(out)


def detect_variant(
    structure: str,
    unet: Mapping[str, Any],
    markers: set[str] | frozenset[str],
    metadata: Mapping[str, str] | None = None,
    path: object | None = None,
) -> Detection:
    """The variant of a model with this structure, UNet config and marker tensors (and this tool's metadata).

    A file that is none of the rows (another input-channel count, a refiner with extra channels or markers) is
    refused with one line naming what was found.
    """
    declared = (metadata or {}).get(VARIANT_METADATA)
    if declared is not None and declared not in VARIANTS:
        raise InputError(f"metadata says {VARIANT_METADATA}={declared}, which is no known variant", path=path)
    channels = int(unet.get("in_channels", 4))
    by_channels = {v.in_channels: v.name for v in VARIANTS.values() if v.in_channels != 4}
    if structure == "refiner":
        if channels != 4 or markers or unet.get("time_cond_proj_dim"):
            if channels != 4:
                found = f"{channels} input channels"
            else:
                found = f"marker tensors {sorted(markers)}" if markers else f"a guidance embedding {COND_PROJ_KEY!r}"
            raise InputError(f"an SDXL refiner with {found}: no such SDXL variant is known", path=path)
        if declared not in (None, "refiner"):
            raise InputError(f"metadata says {VARIANT_METADATA}={declared} but the keys are the refiner's", path=path)
        return Detection("refiner", VARIANTS["refiner"].recognised)
    found: list[str] = []
    if channels != 4:
        if channels not in by_channels:
            raise InputError(
                f"{CONV_IN_KEY!r} has {channels} input channels: not SDXL (4), inpainting (9) or instruct-pix2pix (8)",
                path=path,
            )
        found.append(by_channels[channels])
    by_marker = marker_variant(markers)
    found += [by_marker] if by_marker else []
    if unet.get("time_cond_proj_dim"):
        found.append("lcm")
    elif declared == "lcm":
        found.append("lcm")
    depths = _down_depths(unet)
    depth_note = None
    if depths != SDXL_BASE_DEPTHS and depths:
        distilled = DEPTH_PATTERNS.get(depths, "distilled")
        if found:  # e.g. an LCM-distilled SSD-1B: the schedule decides the variant, the depths are a note
            depth_note = f"UNet depths of {distilled} ({VARIANTS[distilled].recognised})"
        else:
            found.append(distilled)
    if len(found) > 1:
        raise InputError(
            f"this file is several variants at once ({' + '.join(found)}): not a known SDXL model", path=path
        )
    if found:
        variant = found[0]
        if declared not in (None, variant):
            raise InputError(
                f"metadata says {VARIANT_METADATA}={declared} but the weights say {variant} "
                f"({VARIANTS[variant].recognised})",
                path=path,
            )
        reason = VARIANTS[variant].recognised
        if declared is not None:
            reason += f"; metadata {VARIANT_METADATA}={declared} agrees"
        return Detection(variant, reason, depth_note)
    if declared not in (None, "base"):
        raise InputError(f"metadata says {VARIANT_METADATA}={declared} but the keys are the base's", path=path)
    if declared == "base":
        return Detection("base", f"{VARIANTS['base'].recognised}; metadata {VARIANT_METADATA}=base agrees")
    note = "base structure: treated as SDXL base (an LCM UNet has the same keys; pass --keys lcm if it is one)"
    return Detection("base", VARIANTS["base"].recognised, note)


def scheduler_for(
    variant: str,
    sdxl_scheduler: Mapping[str, Any],
    markers: set[str] | frozenset[str] | None = None,
    marker_values: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The diffusers scheduler config of a variant: ``sdxl_scheduler`` (SDXL's own) unless the variant differs.

    EDM v-prediction takes its sigmas from ``marker_values`` (``edm_vpred.sigma_max`` / ``sigma_min``) when given.
    """
    if variant == "playground-v2.5":
        return copy.deepcopy(EDM_SCHEDULER)
    if variant == "v-pred-edm":
        config = copy.deepcopy(EDM_VPRED_SCHEDULER)
        for field in ("sigma_max", "sigma_min"):
            if marker_values and f"edm_vpred.{field}" in marker_values:
                config[field] = float(marker_values[f"edm_vpred.{field}"])
        return config
    config = copy.deepcopy(dict(sdxl_scheduler))
    if VARIANTS[variant].prediction_type == "v_prediction":
        config["prediction_type"] = "v_prediction"
    if markers and "ztsnr" in markers:
        config["rescale_betas_zero_snr"] = True
        config["timestep_spacing"] = "trailing"
    return config


def structure_of(variant: str) -> str:
    """The key structure of a variant (LCM, inpainting... have the base structure)."""
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r} (expected one of {', '.join(VARIANT_NAMES)})")
    return VARIANTS[variant].structure


def detect_from_configs(
    unet: Mapping[str, Any],
    text_encoder_2: Mapping[str, Any],
    scheduler: Mapping[str, Any] | None = None,
    vae: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    path: object | None = None,
) -> tuple[str, Detection]:
    """(structure, variant) of a diffusers pipeline from its component and scheduler configs."""
    structure = structure_from_configs(unet, text_encoder_2, path)
    markers = markers_from_scheduler(scheduler or {}, vae)
    return structure, detect_variant(structure, unet, markers, metadata, path)
