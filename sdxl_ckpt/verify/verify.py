"""``sdxl-ckpt verify``: run the MindSpore runtime on the reference's inputs and compare, stage by stage, in order.

No torch here. The network is built from the component configs stored in the reference, the checkpoint is checked
whole by the runtime's strict loader and filled in phases (the text encoders for the text stages, released before
the UNet and the VAE are filled for the rest: the stage order is the phase order), and the MindSpore side gets
only what a user of the ckpt would have: token ids, size/crop scalars, the initial noise (and, for img2img, the
init image; for LCM the between-step noise). Every
later stage is computed from OUR earlier results, except ``unet.first``, which feeds the reference's own UNet
inputs so a UNet fault is told apart from a conditioning fault.

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
from sdxl_ckpt.sdxl_runtime.sampling import (
    SAMPLERS,
    DiscreteDenoiser,
    LegacyDDPMDiscretization,
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
    """Our discretization, the timesteps of the steps run and their sigmas; ``note`` when they differ from the ref."""

    disc: LegacyDDPMDiscretization
    timesteps: np.ndarray
    sigmas: np.ndarray
    note: str


class Session:
    """The runtime, the reference, and our results, each computed once on first use.

    Every result is a cached property that names what it depends on, so the order of work is the order the
    stages ask for results, and each stage can be computed alone (``unet.first`` needs no text encoding).
    """

    def __init__(self, rt: Any, ref: Reference) -> None:
        self.rt = rt
        self.ref = ref

    @property
    def s(self) -> dict[str, Any]:
        return self.ref.settings

    @property
    def refiner(self) -> bool:
        return self.rt.config.is_refiner

    @property
    def cfg(self) -> bool:
        """diffusers' rule: classic CFG when guidance > 1 and the UNet has no guidance embedding."""
        return self.s["guidance"] > 1 and self.rt.config.unet.time_cond_proj_dim is None

    def branches(self) -> list[str]:
        """Branches whose text is encoded, in reference order: cond, then uncond when it was encoded."""
        return ["cond", "uncond"] if self.cfg and self.s["uncond"] == "encoded" else ["cond"]

    def unet_branches(self) -> list[str]:
        """Branches of the UNet batch, in the pipeline's order [uncond, cond]."""
        return ["uncond", "cond"] if self.cfg else ["cond"]

    @cached_property
    def schedule(self) -> Schedule:
        sched = self.ref.meta["schedule"]
        disc = LegacyDDPMDiscretization(sched["beta_start"], sched["beta_end"], sched["num_train_timesteps"])
        n = self.s["steps"]
        timesteps = lcm_timesteps(n) if self.s["sampler"] == "lcm" else disc.timesteps(n)
        timesteps = timesteps[img2img_start(n, self.s["strength"]) if self.refiner else 0 :]
        ref_timesteps = self.ref["timesteps"].tolist()
        note = (
            ""
            if timesteps.tolist() == ref_timesteps
            else f"timesteps {timesteps.tolist()} vs reference {ref_timesteps}"
        )
        return Schedule(disc, timesteps, disc.sigmas_for(timesteps), note)

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
        time_ids = self.ref["time_ids"]  # [B, 6 | 5] rows in batch order [uncond, cond]
        rows = {"uncond": time_ids[0:1], "cond": time_ids[-1:]}
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
    def states(self) -> list[np.ndarray]:
        """Our sampler from the reference's noise with our conditioning: the sample after every step."""
        sigmas, noise, conds = self.schedule.sigmas, self.ref["noise"], self.conditioning

        def network(x: np.ndarray, t: np.ndarray, cond: dict[str, np.ndarray]) -> np.ndarray:
            return self.rt.unet(x, t, cond["context"], cond["y"], cond.get("w_cond"))

        guider = make_guider(self.s["guidance"], self.cfg)
        denoise = make_denoise(
            network, DiscreteDenoiser(self.schedule.disc.table), guider, conds["cond"], conds.get("uncond")
        )
        x = img2img_sample(self.init_latent, noise, float(sigmas[0])) if self.refiner else initial_sample(noise, sigmas)
        states: list[np.ndarray] = []
        extra: dict[str, Any] = {}
        if self.s["sampler"] == "lcm":
            step_noise = iter(self.ref["step_noise"]) if "step_noise" in self.ref else iter(())
            extra = {"timesteps": self.schedule.timesteps, "noise_sampler": lambda s, sn: next(step_noise)}
        SAMPLERS[self.s["sampler"]](denoise, x, sigmas, callback=lambda i, xi: states.append(xi), **extra)
        return states

    @cached_property
    def decoded(self) -> np.ndarray:
        return self.rt.decode(self.states[-1] / np.float32(self.rt.config.vae.scaling_factor))


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
    return ss.rt.decode(ss.ref["final_latent"] / np.float32(ss.rt.config.vae.scaling_factor))


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
    evaluation, VAE decoder), so a fault is pinned to its component; then the chain a user runs, each stage from
    our previous results: every step's sample, the final latent, its decoding, the image.
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
    table.append(Stage("unet.first", "unet_out", get("unet_out"), _unet_first))
    table.append(Stage("vae.decode", "decoded", get("decoded"), _decode_ref))
    n = len(ref["timesteps"])
    table += [
        Stage(f"step {i + 1}/{n}", f"latents[{i}]", (lambda ss, i=i: ss.ref["latents"][i]), _step(i)) for i in range(n)
    ]
    table += [
        Stage("final_latent", "final_latent", get("final_latent"), _step(n - 1)),
        Stage("decoded", "decoded", get("decoded"), lambda ss: ss.decoded),
        Stage("image", "image", get("image"), _image, image=True),
    ]
    return table


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
    tol = Tolerances(dtype, dict(overrides or {}))
    start = time.perf_counter()
    try:
        rt = SDXLRuntime.from_checkpoint(
            ckpt, runtime_config(ref), device=device, dtype=dtype, quiet=quiet, phased=True
        )
    except KeyMismatchError as err:  # the usual cause: a ckpt of another variant than the reference's model
        raise KeyMismatchError(
            f"checkpoint does not fit the {ref.meta.get('variant')} model the reference was made with: {err}"
        ) from None
    session = Session(rt, ref)
    results = []
    table = stages_for(ref, rt.config.is_refiner, rt.config.unet.time_cond_proj_dim is not None)
    with step_bar(len(table), "verify", quiet) as bar:
        for stage in table:
            ours = stage.ours(session)
            note = session.schedule.note if stage.name == "schedule" else ""
            result = compare(
                stage.name,
                stage.reference,
                ours,
                stage.ref(session),
                tol,
                image=stage.image,
                ref_u8=ref["image_u8"] if stage.image else None,
                note=note,
            )
            if note:
                result.passed = False
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
        "stages_run": len(results),
        "stages_total": len(table),
        "tolerances": {"rel_l2": tol.rtol(""), "image_levels": tol.image_levels(), "overrides": tol.overrides},
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
