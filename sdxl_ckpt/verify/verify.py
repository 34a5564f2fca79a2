"""``sdxl-ckpt verify``: run the MindSpore runtime on the reference's inputs and compare, stage by stage, in order.

No torch here. The network is built from the component configs stored in the reference, the checkpoint is checked
whole by the runtime's strict loader and filled in phases (the text encoders for the text stages, released before
the UNet is filled for the UNet stages, released before the VAE decodes: the stage order is the phase order), and
the MindSpore side gets
only what a user of the ckpt would have: token ids, size/crop scalars, the initial noise (and, for img2img, the
init image; for LCM the between-step noise; for inpainting the image and mask, for instruct-pix2pix the image,
from which OUR VAE encoder makes the extra UNet input channels). Every later stage is computed from OUR earlier
results, except ``unet.first``, which feeds the reference's own UNet inputs so a UNet fault is told apart from a
conditioning fault, and ``vae.decode``, which decodes the reference's own final latent.

Those two isolating stages cost a UNet evaluation and a decode each, the largest costs of a run. When every
earlier stage passed, the chain's own result stands in first (the chain's first UNet evaluation, the decoding of
our final latent: inputs that already agree with the reference's within tolerance); it is accepted only if it
passes the stage's check. Otherwise the stage is computed on the reference's inputs as always, so a fault is
pinned to the same stage either way and the work is done once on a passing run.

The stage table (``STAGES``) is data: name, which reference array, how the MindSpore side computes it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_ckpt.errors import InputError, KeyMismatchError
from sdxl_ckpt.formats.reference_npz import Reference
from sdxl_ckpt.sdxl.samplers import REFERENCE_SAMPLERS, reference_sampler
from sdxl_ckpt.sdxl.variants import CONCAT_KINDS, marker_values, stated_sampling
from sdxl_ckpt.sdxl_runtime.sampling import (
    SAMPLERS,
    DiscreteDenoiser,
    EDMDenoiser,
    EDMDiscretization,
    LegacyDDPMDiscretization,
    edm_noise_conditioning,
    img2img_sample,
    img2img_start,
    initial_sample,
    lcm_timesteps,
    make_denoise,
    make_guider,
)
from sdxl_ckpt.verify.compare import StageResult, Tolerances, compare, first_failure, report_dict


@dataclass(frozen=True)
class Schedule:
    """Our discretization, the timesteps of the steps run and their sigmas; ``note`` when they differ from the ref.

    Timesteps are the UNet's: training-timestep indices (DDPM) or float c_noise values (EDM).
    """

    disc: LegacyDDPMDiscretization | EDMDiscretization
    timesteps: np.ndarray
    sigmas: np.ndarray
    note: str


def schedule_record(ref: Reference) -> dict[str, Any]:
    """The reference's schedule record, with the defaults of references that predate v-prediction and EDM."""
    return {"kind": "ddpm", "prediction_type": "epsilon", "rescale_betas_zero_snr": False, **ref.meta["schedule"]}


def latents_record(ref: Reference) -> dict[str, Any]:
    """How sampler latents map to the VAE's, as the reference recorded it (else from its VAE config)."""
    if "latents" in ref.meta:
        return ref.meta["latents"]
    vae = ref.configs["vae"]
    return {"scaling_factor": float(vae.get("scaling_factor", 0.13025)), "mean": None, "std": None}


def marker_disagreement(stated: Mapping[str, Any], ref: Reference) -> str:
    """Where the checkpoint's marker tensors contradict how the reference sampled (empty when they agree).

    A ckpt carries its variant only in these markers: a reference run another way proves nothing about it, and
    a ckpt that lost its markers would be sampled wrongly by anyone reading it.
    """
    sched, lat = schedule_record(ref), latents_record(ref)
    said = {
        "prediction_type": (stated["prediction_type"], sched["prediction_type"]),
        "schedule": (stated["schedule"], sched["kind"]),
        "zero terminal SNR": (stated["zero_snr"], bool(sched.get("rescale_betas_zero_snr"))),
    }
    problems = [f"{name}: checkpoint markers say {a}, the reference ran {b}" for name, (a, b) in said.items() if a != b]
    for field in ("sigma_min", "sigma_max"):
        if field in stated and sched["kind"] == "edm" and not math.isclose(stated[field], sched[field], rel_tol=1e-6):
            problems.append(f"{field}: checkpoint markers say {stated[field]:g}, the reference ran {sched[field]:g}")
    for field, key in (("latents_mean", "mean"), ("latents_std", "std")):
        theirs = lat.get(key)
        if (field in stated) != (theirs is not None) or (
            theirs is not None and not np.allclose(stated[field], theirs, rtol=1e-6, atol=0)
        ):
            problems.append(f"{field}: checkpoint markers say {stated.get(field)}, the reference's VAE has {theirs}")
    return "; ".join(problems)


class Session:
    """The runtime, the reference, and our results, each computed once on first use.

    Every result is a cached property that names what it depends on, so the order of work is the order the
    stages ask for results, and each stage can be computed alone (``unet.first`` needs no text encoding).
    """

    def __init__(self, rt: Any, ref: Reference) -> None:
        self.rt = rt
        self.ref = ref
        self.first_evaluation: np.ndarray | None = None  # the chain's first UNet output, once the chain ran

    @property
    def s(self) -> dict[str, Any]:
        return self.ref.settings

    @property
    def refiner(self) -> bool:
        return self.rt.config.is_refiner

    @property
    def variant(self) -> str | None:
        return self.ref.meta.get("variant")

    @property
    def img2img(self) -> bool:
        """The run starts from an encoded image at a truncated schedule (refiner; inpainting below strength 1)."""
        return self.refiner or (self.variant == "inpaint" and self.s["strength"] < 1.0)

    @property
    def cfg(self) -> bool:
        """diffusers' rule: classic CFG when guidance > 1 and the UNet has no guidance embedding;
        instruct-pix2pix: guidance > 1 and image guidance >= 1."""
        if self.variant == "pix2pix":
            return self.s["guidance"] > 1 and self.s["image_guidance"] >= 1
        return self.s["guidance"] > 1 and self.rt.config.unet.time_cond_proj_dim is None

    def branches(self) -> list[str]:
        """Branches whose text is encoded, in reference order: cond, then uncond when it was encoded."""
        return ["cond", "uncond"] if self.cfg and self.s["uncond"] == "encoded" else ["cond"]

    def unet_branches(self) -> list[str]:
        """Text branches of the UNet batch, in the pipeline's order: [uncond, cond]; instruct-pix2pix
        [cond, uncond, uncond] (text + image, image only, neither)."""
        if not self.cfg:
            return ["cond"]
        return ["cond", "uncond", "uncond"] if self.variant == "pix2pix" else ["uncond", "cond"]

    @cached_property
    def schedule(self) -> Schedule:
        sched = schedule_record(self.ref)
        n = self.s["steps"]
        ref_timesteps = self.ref["timesteps"]
        if sched["kind"] == "edm":
            edm = EDMDiscretization(sched["sigma_min"], sched["sigma_max"], sched["rho"])
            sigmas = edm(n)
            timesteps = edm_noise_conditioning(sigmas[:-1])
            same = timesteps.shape == ref_timesteps.shape and np.allclose(
                timesteps, ref_timesteps, rtol=1e-5, atol=1e-6
            )
            note = "" if same else f"c_noise {timesteps.tolist()} vs reference {ref_timesteps.tolist()}"
            return Schedule(edm, timesteps, sigmas, note)
        disc = LegacyDDPMDiscretization(
            sched["beta_start"], sched["beta_end"], sched["num_train_timesteps"], sched["rescale_betas_zero_snr"]
        )
        timesteps = lcm_timesteps(n) if self.s["sampler"] == "lcm" else disc.timesteps(n)
        timesteps = timesteps[img2img_start(n, self.s["strength"]) if self.img2img else 0 :]
        note = (
            ""
            if timesteps.tolist() == ref_timesteps.tolist()
            else f"timesteps {timesteps.tolist()} vs reference {ref_timesteps.tolist()}"
        )
        return Schedule(disc, timesteps, disc.sigmas_for(timesteps), note)

    @cached_property
    def denoiser(self) -> DiscreteDenoiser | EDMDenoiser:
        """The reference's parameterisation: discrete DDPM (eps or v) or continuous EDM preconditioning."""
        sched = schedule_record(self.ref)
        if sched["kind"] == "edm":
            return EDMDenoiser(sched["sigma_data"], sched["prediction_type"])
        return DiscreteDenoiser(self.schedule.disc.table, sched["prediction_type"])

    def to_vae(self, z: np.ndarray) -> np.ndarray:
        """Sampler latent -> VAE latent: ``z * std / scaling + mean`` per channel, or ``z / scaling``."""
        lat = latents_record(self.ref)
        scaling = np.float32(lat["scaling_factor"])
        if lat.get("mean") is None:
            return z / scaling
        shape = (1, -1, 1, 1)
        mean = np.asarray(lat["mean"], np.float32).reshape(shape)
        std = np.asarray(lat["std"], np.float32).reshape(shape)
        return (z * std / scaling + mean).astype(np.float32)

    @cached_property
    def text(self) -> dict[str, tuple[Any, ...]]:
        """(CLIP-L hidden, OpenCLIP hidden, pooled) per encoded branch, from the reference's token ids."""
        return {
            b: self.rt.encode_text(None if self.refiner else self.ref[f"ids1_{b}"], self.ref[f"ids2_{b}"])
            for b in self.branches()
        }

    @cached_property
    def conditioning(self) -> dict[str, dict[str, np.ndarray]]:
        """context and y per UNet branch; the unconditional branch is zeros when the pipeline zeroed it."""
        time_ids = self.ref["time_ids"]  # [B, 6 | 5] rows in the UNet batch's order
        order = self.unet_branches()
        rows = {b: time_ids[order.index(b) : order.index(b) + 1] for b in order}
        result = {}
        for b in self.unet_branches():
            te = self.text.get(b)
            if te is None:  # force_zeros_for_empty_prompt: zero text embeddings, real size embeddings
                cl, cg, pooled = (np.zeros_like(x) if x is not None else None for x in self.text["cond"])
            else:
                cl, cg, pooled = te
            r = rows[b][0]
            sizes = (
                {"original_size": r[0:2], "crop_coords_top_left": r[2:4], "aesthetic_score": r[4:5]}
                if self.refiner
                else {"original_size": r[0:2], "crop_coords_top_left": r[2:4], "target_size": r[4:6]}
            )
            context, y = self.rt.conditioning(cl, cg, pooled, **sizes)
            result[b] = {"context": context, "y": y}
            if self.rt.config.unet.time_cond_proj_dim is not None:
                result[b]["w_cond"] = self.rt.guidance_embedding(self.s["guidance"], 1)
        return result

    @cached_property
    def init_latent(self) -> np.ndarray:
        return self.rt.encode(self.ref["init_image"]) * np.float32(self.rt.config.vae.scaling_factor)

    @cached_property
    def inputs(self) -> dict[str, np.ndarray]:
        """The extra UNet input channels, made from the stored image (and mask) with OUR VAE encoder, by diffusers'
        rules: inpainting binarises the mask, downsamples it (nearest) to the latent size and encodes
        ``image * (mask < 0.5)`` (scaled); instruct-pix2pix encodes the image (unscaled). ``concat`` joins them."""
        image = self.ref["init_image"]
        if self.variant == "inpaint":
            mask = (self.ref["inpaint_mask"] >= 0.5).astype(np.float32)
            h, w = self.ref["noise"].shape[-2:]
            fh, fw = mask.shape[-2] // h, mask.shape[-1] // w  # nearest: the pixel at (fh * i, fw * j)
            mask_latent = np.ascontiguousarray(mask[:, :, ::fh, ::fw])
            masked = (image * (mask < 0.5)).astype(np.float32)
            latent = self.rt.encode(masked) * np.float32(self.rt.config.vae.scaling_factor)
            return {
                "mask": mask_latent,
                "latent": latent,
                "concat": np.concatenate([mask_latent, latent], axis=1),
            }
        latent = self.rt.encode(image)
        return {"latent": latent, "concat": latent}

    @cached_property
    def states(self) -> list[np.ndarray]:
        """Our sampler from the reference's noise with our conditioning: the sample after every step."""
        sigmas, noise, conds = self.schedule.sigmas, self.ref["noise"], self.conditioning
        if self.variant in CONCAT_KINDS:  # every branch's UNet input gets the extra channels (sgm's "concat")
            conds = {b: {**c, "concat": self.inputs["concat"]} for b, c in conds.items()}

        def network(x: np.ndarray, t: np.ndarray, cond: dict[str, np.ndarray]) -> np.ndarray:
            if "concat" in cond:  # joined AFTER the input scaling, as diffusers joins it to scale_model_input's
                x = np.concatenate([x, cond["concat"].astype(x.dtype)], axis=1)
            out = self.rt.unet(x, t, cond["context"], cond["y"], cond.get("w_cond"))
            if self.first_evaluation is None:
                self.first_evaluation = out.copy()  # the whole guidance batch, as the reference's unet_out
            return out

        image_scale = self.s["image_guidance"] if self.variant == "pix2pix" else None
        guider = make_guider(self.s["guidance"], self.cfg, image_scale)
        denoise = make_denoise(network, self.denoiser, guider, conds["cond"], conds.get("uncond"))
        x = img2img_sample(self.init_latent, noise, float(sigmas[0])) if self.img2img else initial_sample(noise, sigmas)
        states: list[np.ndarray] = []
        extra: dict[str, Any] = {}
        if self.s["sampler"] == "lcm":
            step_noise = iter(self.ref["step_noise"]) if "step_noise" in self.ref else iter(())
            extra = {"timesteps": self.schedule.timesteps, "noise_sampler": lambda s, sn: next(step_noise)}
        SAMPLERS[self.s["sampler"]](denoise, x, sigmas, callback=lambda i, xi: states.append(xi), **extra)
        return states

    @cached_property
    def decoded(self) -> np.ndarray:
        return self.rt.decode(self.to_vae(self.states[-1]))

    @property
    def chain_first_unet(self) -> np.ndarray:
        """The chain's first UNet evaluation (runs the chain): ``unet.first`` on our own conditioning."""
        if not self.states or self.first_evaluation is None:
            raise RuntimeError("the sampler ran no UNet evaluation")
        return self.first_evaluation


# --- stage computations ----------------------------------------------------------------------------------------


def _stack(ss: Session, index: int) -> np.ndarray:
    return np.concatenate([ss.text[b][index] for b in ss.branches()], axis=0)


def _ref_stack(prefix: str) -> Callable[[Session], np.ndarray]:
    return lambda ss: np.concatenate([ss.ref[f"{prefix}_{b}"] for b in ss.branches()], axis=0)


def _batched(ss: Session, key: str) -> np.ndarray:
    return np.concatenate([ss.conditioning[b][key] for b in ss.unet_branches()])


def _unet_first(ss: Session) -> np.ndarray:
    r = ss.ref
    return ss.rt.unet(r["unet_in_x"], r["unet_in_t"], r["unet_in_context"], r["unet_in_y"], r.get("timestep_cond"))


def _decode_ref(ss: Session) -> np.ndarray:
    """The VAE alone: decode the reference's own final latent (tells a VAE fault from a sampling one)."""
    return ss.rt.decode(ss.to_vae(ss.ref["final_latent"]))


def _step(i: int) -> Callable[[Session], np.ndarray]:
    """The sample after step i in the reference's space (VP schedulers hold x / sqrt(1 + sigma^2))."""

    def compute(ss: Session) -> np.ndarray:
        x = ss.states[i]
        if ss.ref.meta["schedule"]["latent_space"] == "vp":
            sigma = float(ss.schedule.sigmas[i + 1])
            x = x * np.float32(1.0 / math.sqrt(1.0 + sigma * sigma))
        return x

    return compute


def _image(ss: Session) -> np.ndarray:
    img = np.clip(ss.decoded / np.float32(2) + np.float32(0.5), 0, 1)  # diffusers' denormalize
    return img.transpose(0, 2, 3, 1)


@dataclass(frozen=True)
class Stage:
    name: str
    reference: str  # the reference array(s), for the report
    ref: Callable[[Session], np.ndarray]
    ours: Callable[[Session], np.ndarray]
    image: bool = False
    # the chain's result that stands in for ``ours`` when no earlier stage failed and it passes this stage's check
    # (see the module docstring); ``shared_note`` says so in the report
    shared: Callable[[Session], np.ndarray] | None = None
    shared_note: str = ""


# every stage name ``stages_for`` can produce besides ``step i/n`` (kept in step by a test), for --rtol-override
STAGE_NAMES = (
    "schedule",
    "text_encoder_1",
    "text_encoder_2.hidden",
    "text_encoder_2.pooled",
    "context",
    "y",
    "guidance_embedding",
    "vae_encode",
    "vae_encode.init",
    "inpaint_mask",
    "unet.first",
    "vae.decode",
    "final_latent",
    "decoded",
    "image",
)


def resolve_sampler(name: str | None) -> str | None:
    """``--sampler`` as a sampler with a diffusers reference (case-insensitive); None stays None."""
    return None if name is None else reference_sampler(name)


def check_override_names(overrides: Mapping[str, float]) -> None:
    """An ``--rtol-override`` must name a stage, a stage group (``step``, ``unet``...) or ``image_levels``."""
    from sdxl_ckpt.verify.compare import IMAGE_LEVELS_KEY, group_of

    known = {*STAGE_NAMES, *(group_of(n) for n in STAGE_NAMES), "step", IMAGE_LEVELS_KEY}
    for name in overrides:
        if name in known or re.fullmatch(r"step \d+/\d+", name):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(
            f"--rtol-override: no stage {name!r}{hint} (stages: {', '.join(STAGE_NAMES)}, 'step i/n'; "
            f"groups: step, text_encoder_2, unet, vae; image_levels)"
        )


def stages_for(ref: Reference, refiner: bool, cond_proj: bool) -> list[Stage]:
    """The ordered stage table for this reference.

    First each component on the reference's own inputs (text encoders, context and y, VAE encoder, one UNet
    evaluation), so a fault is pinned to its component; then the chain a user runs, each stage from our previous
    results: every step's sample, the final latent. The VAE decoder on the reference's own final latent comes
    next, before our latent's decoding and the image: a VAE fault still fails at ``vae.decode`` first, and the
    decoder runs only once the UNet is done (phased loading never holds both). ``unet.first`` and ``vae.decode``
    carry the chain's result that may stand in for theirs (``Stage.shared``).
    """
    get = lambda key: lambda ss: ss.ref[key]  # noqa: E731
    table = [Stage("schedule", "sigmas", get("sigmas"), lambda ss: ss.schedule.sigmas)]
    if not refiner:
        table.append(Stage("text_encoder_1", "te1_hidden_*", _ref_stack("te1_hidden"), lambda ss: _stack(ss, 0)))
    table += [
        Stage("text_encoder_2.hidden", "te2_hidden_*", _ref_stack("te2_hidden"), lambda ss: _stack(ss, 1)),
        Stage("text_encoder_2.pooled", "te2_pooled_*", _ref_stack("te2_pooled"), lambda ss: _stack(ss, 2)),
        Stage("context", "context", get("context"), lambda ss: _batched(ss, "context")),
        Stage("y", "y", get("y"), lambda ss: _batched(ss, "y")),
    ]
    if cond_proj:
        table.append(
            Stage("guidance_embedding", "timestep_cond", get("timestep_cond"), lambda ss: _batched(ss, "w_cond"))
        )
    if refiner:
        table.append(Stage("vae_encode", "init_latent", get("init_latent"), lambda ss: ss.init_latent))
    table += _input_stages(ref)
    table.append(
        Stage(
            "unet.first",
            "unet_out",
            get("unet_out"),
            _unet_first,
            shared=lambda ss: ss.chain_first_unet,
            shared_note="the chain's first evaluation, on our conditioning",
        )
    )
    n = len(ref["timesteps"])
    table += [
        Stage(f"step {i + 1}/{n}", f"latents[{i}]", (lambda ss, i=i: ss.ref["latents"][i]), _step(i)) for i in range(n)
    ]
    table += [
        Stage("final_latent", "final_latent", get("final_latent"), _step(n - 1)),
        Stage(
            "vae.decode",
            "decoded",
            get("decoded"),
            _decode_ref,
            shared=lambda ss: ss.decoded,
            shared_note="our final latent decoded",
        ),
        Stage("decoded", "decoded", get("decoded"), lambda ss: ss.decoded),
        Stage("image", "image", get("image"), _image, image=True),
    ]
    return table


def _input_stages(ref: Reference) -> list[Stage]:
    """The extra UNet inputs: inpainting's latent-size mask and masked-image latent (and, below strength 1, the
    encoded init image); instruct-pix2pix's image latent."""
    get = lambda key: lambda ss: ss.ref[key]  # noqa: E731
    variant = ref.meta.get("variant")
    if variant == "inpaint":
        table = [
            Stage("inpaint_mask", "inpaint_mask_latent", get("inpaint_mask_latent"), lambda ss: ss.inputs["mask"]),
            Stage("vae_encode", "masked_image_latent", get("masked_image_latent"), lambda ss: ss.inputs["latent"]),
        ]
        if "init_latent" in ref:
            table.append(Stage("vae_encode.init", "init_latent", get("init_latent"), lambda ss: ss.init_latent))
        return table
    if variant == "pix2pix":
        return [Stage("vae_encode", "image_latent", get("image_latent"), lambda ss: ss.inputs["latent"])]
    return []


# --- the command ------------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    results: list[StageResult]
    context: dict[str, Any]

    @property
    def passed(self) -> bool:
        return first_failure(self.results) is None

    @property
    def first_failure(self) -> StageResult | None:
        return first_failure(self.results)

    def as_dict(self) -> dict[str, Any]:
        return report_dict(self.results, self.context)


FP32_UNIT_ROUNDOFF = 2.0**-24
CHAIN_STAGES = ("step", "final_latent", "decoded", "image")  # computed from our own previous samples


def chain_floor(ref: Reference, dtype: str) -> dict[str, float]:
    """fp32 tolerances of the Euler chain when float32 itself cannot meet the default: stage -> rel L2.

    Euler's first step ``x + (x - D) / sigma * (sigma_next - sigma)`` starts from a sample of magnitude sigma_0
    and cancels it down to an O(1) one; each float32 operation on it keeps only ``2**-24 * sigma_0`` absolute,
    on both sides, whichever side is right. For SDXL's sigma_0 of 14.6 that is 9e-7, far below the default 1e-4:
    nothing changes. For a schedule rescaled to zero terminal SNR (sigma_0 ~4096) it is 2.4e-4, so the chain
    stages get ``4 * 2**-24 * sigma_0`` (1e-3). DPM-Solver (``ratio * x + phi * D``) and LCM cancel nothing,
    the other dtypes' defaults are far above their rounding: no floor there. ``--rtol-override`` wins.
    """
    if dtype != "fp32" or ref.settings["sampler"] != "euler":
        return {}
    floor = 4 * FP32_UNIT_ROUNDOFF * float(np.max(ref["sigmas"]))
    if floor <= Tolerances(dtype).rtol(""):
        return {}
    return {name: float(f"{floor:.2g}") for name in CHAIN_STAGES}


def runtime_config(ref: Reference) -> Any:
    """The runtime's SDXLConfig from the component configs the reference stored."""
    from sdxl_ckpt.sdxl_runtime.config import from_diffusers_configs

    c = ref.configs
    return from_diffusers_configs(
        c["unet"], c["vae"], c.get("text_encoder"), c["text_encoder_2"], variant=ref.meta.get("variant")
    )


def verify_checkpoint(
    ckpt: str | os.PathLike,
    ref: Reference,
    *,
    sampler: str | None = None,
    device: str = "CPU",
    dtype: str = "fp32",
    overrides: dict[str, float] | None = None,
    quiet: bool = True,
    fail_fast: bool = False,
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Check ``ckpt`` strictly against a runtime built from ``ref``'s configs, then judge every stage, filling the
    runtime's components phase by phase as the stages need them.

    ``fail_fast``: stop at the first failing stage (the later ones are not computed, nor reported).
    """
    from sdxl_ckpt.progress import step_bar
    from sdxl_ckpt.sdxl_runtime.api import SDXLRuntime

    ref_sampler = ref.settings["sampler"]
    if ref_sampler not in REFERENCE_SAMPLERS:
        raise InputError(f"unknown sampler {ref_sampler!r} in the reference", path=ref.meta.get("path"))
    if sampler is not None and reference_sampler(sampler) != ref_sampler:
        raise InputError(
            f"the reference was made with --sampler {ref_sampler}; verify compares the same sampler "
            f"(make a {reference_sampler(sampler)} reference to check it)"
        )
    floor = chain_floor(ref, dtype)
    tol = Tolerances(dtype, {**floor, **(overrides or {})})
    start = time.perf_counter()
    try:
        rt = SDXLRuntime.from_checkpoint(
            ckpt, runtime_config(ref), device=device, dtype=dtype, quiet=quiet, phased=True
        )
    except KeyMismatchError as err:  # the usual cause: a ckpt of another variant than the reference's model
        raise KeyMismatchError(
            f"checkpoint does not fit the {ref.meta.get('variant')} model the reference was made with: {err}"
        ) from None
    from sdxl_ckpt.sdxl_runtime.loader import read_entries

    markers = marker_values(read_entries(ckpt)[0])  # headers, then only the few marker tensors
    disagreement = marker_disagreement(stated_sampling(markers), ref)
    session = Session(rt, ref)
    results = []
    table = stages_for(ref, rt.config.is_refiner, rt.config.unet.time_cond_proj_dim is not None)

    def judge(stage: Stage, ours: np.ndarray, note: str = "") -> StageResult:
        return compare(
            stage.name,
            stage.reference,
            ours,
            stage.ref(session),
            tol,
            image=stage.image,
            ref_u8=ref["image_u8"] if stage.image else None,
            note=note,
        )

    schedule_note = "; ".join(filter(None, (session.schedule.note, disagreement)))
    with step_bar(len(table), "verify", quiet) as bar:
        for stage in table:
            stage_start = time.perf_counter()
            result = None
            if stage.shared is not None and all(r.passed for r in results):
                result = judge(stage, stage.shared(session), stage.shared_note)
                if not result.passed:  # judged again on the reference's own inputs: that verdict is the stage's
                    result = None
            if result is None:
                note = schedule_note if stage.name == "schedule" else ""
                result = judge(stage, stage.ours(session), note)
                if note:
                    result.passed = False
            result.seconds = time.perf_counter() - stage_start
            results.append(result)
            if progress is not None:
                progress(stage.name)
            bar.update(1)
            if fail_fast and not result.passed:
                break
    context = {
        "checkpoint": str(Path(ckpt)),
        "reference": ref.meta.get("path"),
        "variant": ref.meta.get("variant"),
        "sampler": ref_sampler,
        "device": device,
        "dtype": dtype,
        "steps_run": len(ref["timesteps"]),
        "load_seconds": round(rt.load_seconds, 3),
        "load_phases": rt.phase_log,
        "total_seconds": round(time.perf_counter() - start, 3),
        "runtime_notes": rt.notes,
        "checkpoint_markers": sorted(markers),
        "stages_run": len(results),
        "stages_total": len(table),
        "tolerances": {
            "rel_l2": tol.rtol(""),
            "image_levels": tol.image_levels(),
            "overrides": tol.overrides,
            "chain_floor": floor,
        },
    }
    return VerifyReport(results, context)


TABLE_COLUMNS = ("stage", "rel_l2", "max_abs", "cosine", "tol", "levels_max", "levels_mean", "psnr", "ok", "note")


def render(report: VerifyReport) -> str:
    """The table, then one verdict line naming the first failing stage."""
    from sdxl_ckpt.report import render_table

    lines = [render_table([r.row() for r in report.results], TABLE_COLUMNS)]
    failed = report.first_failure
    if failed is None:
        lines.append(f"PASS: all {len(report.results)} stages within tolerance ({report.context['dtype']})")
    else:
        lines.append(
            f"FAIL: first failing stage: {failed.name} (rel L2 {failed.rel_l2:.3g} > {failed.tolerance:g}"
            + (f"; {failed.note}" if failed.note else "")
            + ") -- look there first"
        )
    return "\n".join(lines)
