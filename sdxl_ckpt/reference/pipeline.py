"""Load the independent reference: diffusers' own SDXL pipeline, from a diffusers folder or an SD single file.

torch / diffusers / transformers are imported inside the functions (the optional ``reference`` extra), so the rest
of sdxl_ckpt imports without them. Everything runs in float32 on the CPU, offline.

Schedule alignment with our sampler (each one is recorded in the reference metadata):
- Euler / DPM++2M: diffusers' "trailing" timestep spacing is generative-models' LegacyDDPM rule
  ``linspace(999, 0, n, endpoint=False).astype(int)`` whenever n divides 1000; for other n the reference passes our
  timesteps explicitly (``timesteps=``), so both sides visit the same training sigmas.
- LCM: LCMScheduler's own rule (50 distillation steps, evenly by index; 999, 759, 499, 259 for 4 steps), which our
  ``lcm_timesteps`` reproduces.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.sdxl.samplers import reference_sampler
from sdxl_ckpt.sdxl.variants import COND_PROJ_KEY, MARKERS, VARIANTS, detect_from_configs, detect_variant
from sdxl_ckpt.sdxl_runtime.sampling.discretization import legacy_ddpm_timesteps

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def require_torch() -> None:
    """A clear message when the reference extra is missing (verify itself never needs it)."""
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise InputError(
            f"'reference' needs torch, diffusers and transformers: pip install -e '.[reference]' ({exc})"
        ) from None


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers / transformers log and warn about things that do not matter here (offline, tiny configs)."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    levels = d_logging.get_verbosity(), t_logging.get_verbosity()
    bars = d_logging.is_progress_bar_enabled(), t_logging.is_progress_bar_enabled()
    d_logging.set_verbosity_error()
    t_logging.set_verbosity_error()
    d_logging.disable_progress_bar()
    t_logging.disable_progress_bar()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        d_logging.set_verbosity(levels[0])
        t_logging.set_verbosity(levels[1])
        if bars[0]:
            d_logging.enable_progress_bar()
        if bars[1]:
            t_logging.enable_progress_bar()


@dataclass
class LoadedPipeline:
    pipe: Any
    refiner: bool
    kind: str  # "folder" | "single_file"
    metadata: dict[str, str]  # the SD file's metadata ({} for a folder)
    variant: str = "base"  # the row of sdxl.variants the one detector found (it chose the pipeline class)
    # the model's own scheduler_config.json: the pipeline instantiates model_index's scheduler class from it,
    # which for an EDM model (a folder saying EulerDiscreteScheduler) loses what the config says
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    deferred: Any = None  # DeferredUNet: the UNet is empty until the text encoders are done (phased loading)


def _read_scheduler(folder: Path, pipe: Any) -> dict[str, Any]:
    """``folder/scheduler/scheduler_config.json`` as written (its ``_class_name`` included), else the pipeline's."""
    from sdxl_ckpt.formats.diffusers_folder import read_scheduler_config

    own = {**dict(pipe.scheduler.config), "_class_name": type(pipe.scheduler).__name__}
    return read_scheduler_config(folder) or own


def _weights_variant(component: Path) -> str | None:
    """The weights variant diffusers must be told to read ``component`` ("fp16" when only ``*.fp16.*`` exist).

    The same choice the converters make (``find_weight_files``), so a folder the tool converts is the folder the
    reference runs; a component with no safetensors weights is an error there, never a guessed variant.
    """
    from sdxl_ckpt.formats.diffusers_folder import find_weight_files

    return find_weight_files(component).variant


def _is_refiner_folder(folder: Path) -> bool:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise InputError("not a diffusers pipeline folder (no model_index.json)", path=folder)
    index = json.loads(index_path.read_text())
    encoder = index.get("text_encoder") or [None, None]
    return encoder[0] is None or "Img2Img" in str(index.get("_class_name", ""))


def load_unet(unet_dir: Path) -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    if not (unet_dir / "config.json").is_file():
        raise InputError("not a diffusers UNet folder (no config.json)", path=unet_dir)
    return UNet2DConditionModel.from_pretrained(
        unet_dir, torch_dtype=torch.float32, variant=_weights_variant(unet_dir), local_files_only=True
    )


def _pipeline_class(variant: str) -> Any:
    """diffusers' pipeline for a variant, as the variants table names it (refiner: img2img; inpainting...)."""
    import diffusers

    return getattr(diffusers, VARIANTS[variant].pipeline)


def _json_config(path: Path) -> dict[str, Any]:
    """A component's ``config.json``, read as every converter reads it (one line naming the file when it is bad)."""
    from sdxl_ckpt.formats.diffusers_folder import read_config

    return read_config(path.parent)[0]


def _folder_variant(folder: Path, unet_dir: Path | None) -> str:
    """The variant of a diffusers folder (with ``unet_dir`` replacing its UNet), by the one detector."""
    from sdxl_ckpt.formats.diffusers_folder import read_scheduler_config

    vae = folder / "vae" / "config.json"
    _structure, found = detect_from_configs(
        _json_config((unet_dir or folder / "unet") / "config.json"),
        _json_config(folder / "text_encoder_2" / "config.json"),
        read_scheduler_config(folder),
        _json_config(vae) if vae.is_file() else None,
        path=folder,
    )
    return found.variant


def _file_variant(
    refiner: bool, unet: dict[str, Any], shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], src: Path
) -> str:
    """The variant of an SD file from its UNet config, marker tensors and metadata, by the one detector."""
    markers = {name for name in shapes if name in MARKERS}
    return detect_variant("refiner" if refiner else "base", unet, markers, metadata, path=src).variant


def _configs_from(
    metadata: dict[str, str], config_dir: Path | None, shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, str | None]:
    """Component config.json texts: the ``sdxl_ckpt.config.*`` metadata diffusers-to-sd writes, else ``config_dir``,
    else the architecture read from the file's tensor shapes (head counts by SDXL's 64-channel convention)."""
    configs = {c: metadata.get(f"sdxl_ckpt.config.{c}") for c in COMPONENTS}
    if config_dir is not None:
        for c in COMPONENTS:
            path = config_dir / c / "config.json"
            if configs[c] is None and path.is_file():
                configs[c] = path.read_text()
    if shapes is not None and any(configs[c] is None for c in ("unet", "vae", "text_encoder_2")):
        from sdxl_ckpt.sdxl.architecture import infer_architecture

        inferred = infer_architecture(shapes, metadata).configs
        for c in COMPONENTS:
            if configs[c] is None and c in inferred:
                configs[c] = json.dumps(inferred[c])
    missing = [c for c in ("unet", "vae", "text_encoder_2") if configs[c] is None]
    if missing:
        raise InputError(
            "no config for " + ", ".join(missing) + ": the SD file has no sdxl_ckpt.config.* metadata "
            "(not written by diffusers-to-sd); pass --config DIR, a diffusers folder of this model"
        )
    return configs


def _variant_scheduler(
    metadata: dict[str, str], shapes: dict[str, tuple[int, ...]] | None, markers: dict[str, list[float]]
) -> dict[str, Any]:
    """The scheduler config of the SD file's variant (its marker tensors: v-prediction, zero terminal SNR, EDM):
    what diffusers' pipeline of this model would have; SDXL's own when the file has no markers."""
    from sdxl_ckpt.sdxl.architecture import infer_architecture
    from sdxl_ckpt.sdxl.configs import SCHEDULER_CONFIG
    from sdxl_ckpt.sdxl.variants import scheduler_for

    if not markers or shapes is None:
        return dict(SCHEDULER_CONFIG)
    arch = infer_architecture(shapes, metadata)
    values = {k: v[0] for k, v in markers.items() if v}
    return scheduler_for(arch.variant, SCHEDULER_CONFIG, arch.markers, values)


def _carry_latent_markers(configs: dict[str, str | None], markers: dict[str, list[float]]) -> None:
    """Playground's per-channel latent statistics (``edm_mean`` / ``edm_std``) into the VAE config when it lacks
    them (a community file's config is inferred from the shapes): diffusers reads them from there."""
    from sdxl_ckpt.sdxl.variants import LATENT_MARKERS

    if configs.get("vae") is None or not all(name in markers for name in LATENT_MARKERS):
        return
    vae = json.loads(configs["vae"])
    for name, key in LATENT_MARKERS.items():
        if vae.get(key) is None:
            vae[key] = markers[name]
    configs["vae"] = json.dumps(vae)


def write_config_folder(
    metadata: dict[str, str],
    out: Path,
    config_dir: Path | None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    markers: dict[str, list[float]] | None = None,
) -> tuple[bool, int | None]:
    """A diffusers config folder (model_index, component configs, scheduler, tokenizers) for from_single_file.

    Tokenizers are not in an SD file: they are copied from ``config_dir`` (any diffusers SDXL folder) or, for the
    tiny models' byte-level vocabulary, rebuilt. The UNet config is written WITHOUT ``time_cond_proj_dim``:
    diffusers' single-file converter knows no SD name for the LCM guidance embedding (this project's
    ``model.diffusion_model.time_cond_proj.weight``) and would leave it uninitialised; it is attached after
    loading (``attach_cond_proj``). Returns (is refiner, cond_proj width or None).
    """
    import shutil

    from sdxl_ckpt.sdxl.configs import model_index
    from sdxl_ckpt.sdxl.tokenizers import BYTE_LEVEL_VOCAB_SIZE, write_tokenizers

    configs = _configs_from(metadata, config_dir, shapes)
    _carry_latent_markers(configs, markers or {})
    refiner = configs["text_encoder"] is None
    unet = json.loads(configs["unet"])
    cond_dim = unet.pop("time_cond_proj_dim", None)
    configs["unet"] = json.dumps(unet)
    (out / "model_index.json").write_text(json.dumps(model_index("refiner" if refiner else "base")))
    for component, text in configs.items():
        if text is not None:
            (out / component).mkdir()
            (out / component / "config.json").write_text(text)
    (out / "scheduler").mkdir()
    scheduler = config_dir / "scheduler" / "scheduler_config.json" if config_dir is not None else None
    (out / "scheduler" / "scheduler_config.json").write_text(
        scheduler.read_text()
        if scheduler is not None and scheduler.is_file()
        else json.dumps(_variant_scheduler(metadata, shapes, markers or {}))
    )
    names = ("tokenizer_2",) if refiner else ("tokenizer", "tokenizer_2")
    if config_dir is not None and all((config_dir / n).is_dir() for n in names):
        for name in names:
            shutil.copytree(config_dir / name, out / name)
    elif json.loads(configs["text_encoder_2"]).get("vocab_size") == BYTE_LEVEL_VOCAB_SIZE:
        write_tokenizers(out, "refiner" if refiner else "base")
    else:
        raise InputError(
            "an SD file carries no tokenizer: pass --config DIR, a diffusers folder with "
            + " and ".join(f"{n}/" for n in names)
        )
    return refiner, cond_dim


def attach_cond_proj(pipe: Any, src: Path, cond_dim: int) -> None:
    """Rebuild the UNet with its LCM guidance embedding and fill it from the SD file's ``time_cond_proj``."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    with safe_open(str(src), "pt") as handle:
        if COND_PROJ_KEY not in handle.keys():
            raise InputError(
                f"UNet config has time_cond_proj_dim {cond_dim} but the file lacks the tensor",
                path=src,
                key=COND_PROJ_KEY,
            )
        weight = handle.get_tensor(COND_PROJ_KEY).to(torch.float32)
    config = {k: v for k, v in pipe.unet.config.items() if k != "_use_default_values"}  # else the default wins
    config["time_cond_proj_dim"] = cond_dim
    unet = UNet2DConditionModel.from_config(config).to(torch.float32)
    state = pipe.unet.state_dict() | {"time_embedding.cond_proj.weight": weight}
    unet.load_state_dict(state, strict=True)
    pipe.unet = unet.eval()


def load_pipeline(
    src: str | Path, unet_dir: str | Path | None = None, config_dir: str | Path | None = None, phased: bool = False
) -> LoadedPipeline:
    """diffusers' SDXL pipeline (txt2img, or img2img for a refiner) in float32 on the CPU, offline.

    ``phased``: the UNet is left empty (``LoadedPipeline.deferred``) to be filled after ``encode_prompt``, once the
    text encoders are released (``reference.deferred``); otherwise every component is loaded now.
    """
    import torch

    from sdxl_ckpt.reference import deferred as deferral

    src = Path(src)
    unet_dir = Path(unet_dir) if unet_dir is not None else None
    later = deferral.folder_unet(unet_dir, _weights_variant(unet_dir)) if phased and unet_dir else None
    unet = load_unet(unet_dir) if unet_dir is not None and later is None else None
    extra = {"unet": later.unet if later is not None else unet} if unet_dir is not None else {}
    with quiet_libraries():
        if src.is_dir():
            refiner = _is_refiner_folder(src)
            variant = _folder_variant(src, unet_dir)
            weights = _weights_variant(src / "unet")
            if phased and later is None:
                later = deferral.folder_unet(src / "unet", weights)
                extra = {"unet": later.unet}
            pipe = _pipeline_class(variant).from_pretrained(
                src, torch_dtype=torch.float32, local_files_only=True, variant=weights, **extra
            )
            scheduler = _read_scheduler(src, pipe)
            return LoadedPipeline(pipe, refiner, "folder", {}, variant, scheduler, later)
        if not src.is_file():
            raise InputError("source not found (expected a diffusers folder or an SD .safetensors file)", path=src)
        from sdxl_ckpt.formats.safetensors_io import read_safetensors

        source = read_safetensors(src)
        metadata = dict(source.metadata or {})
        shapes = {e.name: e.shape for e in source.entries}
        from sdxl_ckpt.sdxl.variants import marker_values

        markers = marker_values(source.entries)
        with tempfile.TemporaryDirectory(prefix="sdxl-ckpt-config-") as tmp:
            refiner, cond_dim = write_config_folder(
                metadata, Path(tmp), Path(config_dir) if config_dir is not None else None, shapes, markers
            )
            if unet_dir is not None:
                unet_config = _json_config(unet_dir / "config.json")
            else:  # the file's own UNet config, with the guidance embedding write_config_folder set aside
                unet_config = _json_config(Path(tmp) / "unet" / "config.json")
                unet_config |= {"time_cond_proj_dim": cond_dim} if cond_dim is not None else {}
            variant = _file_variant(refiner, unet_config, shapes, metadata, src)
            if phased and later is None:
                config = json.loads((Path(tmp) / "unet" / "config.json").read_text())
                with contextlib.suppress(deferral.NotRenaming):  # then diffusers loads the whole UNet itself
                    later = deferral.single_file_unet(src, config, int(cond_dim) if cond_dim is not None else None)
                    extra = {"unet": later.unet}
            pipe = _pipeline_class(variant).from_single_file(
                str(src), config=tmp, local_files_only=True, torch_dtype=torch.float32, **extra
            )
            scheduler = _read_scheduler(Path(tmp), pipe)
        if cond_dim is not None and unet_dir is None and later is None:
            attach_cond_proj(pipe, src, int(cond_dim))
        return LoadedPipeline(pipe, refiner, "single_file", metadata, variant, scheduler, later)


def load_lora(pipe: Any, lora: str | Path, scale: float) -> dict[str, Any]:
    """diffusers' own LoRA path: ``load_lora_weights`` (any format diffusers reads) at adapter weight ``scale``.

    Left unfused: the reference then runs diffusers' LoRA layers (x W + scale * B(A(x))), an independent path
    from the weight merge a converted checkpoint went through.
    """
    lora = Path(lora)
    if not lora.is_file():
        raise InputError("LoRA file not found", path=lora)
    with quiet_libraries():
        pipe.load_lora_weights(str(lora), adapter_name="lora")
        pipe.set_adapters(["lora"], adapter_weights=[float(scale)])
    return {"path": str(lora), "scale": float(scale)}


# --- the scheduler, configured to our sampler ---------------------------------------------------------------------

EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def is_edm(scheduler: Any) -> bool:
    """An EDM scheduler: continuous sigmas, the UNet's timestep is ``c_noise`` (``precondition_noise``)."""
    return type(scheduler).__name__ in EDM_SCHEDULERS


def check_training_schedule(config: dict[str, Any]) -> dict[str, Any]:
    """The training schedule both sides rebuild, from the pipeline's scheduler config; anything else is refused.

    ``kind`` ddpm: SDXL's scaled-linear betas (optionally rescaled to zero terminal SNR); edm: Karras sigmas
    between sigma_min and sigma_max with ``rho`` and ``sigma_data``. Prediction: epsilon or v_prediction.
    """
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise InputError(f"prediction_type {prediction!r} is not supported ({', '.join(PREDICTION_TYPES)})")
    if str(config.get("_class_name", "")) in EDM_SCHEDULERS:
        if config.get("sigma_schedule", "karras") != "karras":
            raise InputError(f"EDM sigma_schedule {config.get('sigma_schedule')!r} is not supported (karras)")
        return {
            "kind": "edm",
            "prediction_type": prediction,
            **{k: float(config[k]) for k in ("sigma_min", "sigma_max", "sigma_data", "rho")},
            "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
        }
    if config.get("beta_schedule") != "scaled_linear" or config.get("trained_betas") is not None:
        raise InputError(f"scheduler beta_schedule {config.get('beta_schedule')!r} is not supported (scaled_linear)")
    return {
        "kind": "ddpm",
        "prediction_type": prediction,
        "rescale_betas_zero_snr": bool(config.get("rescale_betas_zero_snr", False)),
        "beta_schedule": "scaled_linear",
        "beta_start": float(config["beta_start"]),
        "beta_end": float(config["beta_end"]),
        "num_train_timesteps": int(config["num_train_timesteps"]),
    }


def _edm_scheduler(sampler: str, train: dict[str, Any]) -> Any:
    """diffusers' EDM scheduler matching ``sampler``: EDMEuler (our euler), EDMDPMSolverMultistep (our dpmpp_2m)."""
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    common = {
        k: train[k] for k in ("sigma_min", "sigma_max", "sigma_data", "rho", "prediction_type", "num_train_timesteps")
    }
    if sampler == "euler":
        return EDMEulerScheduler(**common, sigma_schedule="karras", final_sigmas_type="zero")
    if sampler == "dpmpp_2m":
        return EDMDPMSolverMultistepScheduler(
            **common,
            sigma_schedule="karras",
            solver_order=2,
            algorithm_type="dpmsolver++",
            solver_type="midpoint",
            lower_order_final=True,
            euler_at_final=False,
            final_sigmas_type="zero",
            thresholding=False,
        )
    raise InputError(f"sampler {sampler} has no reference on an EDM schedule (choose euler or dpmpp_2m)")


def configure_scheduler(
    pipe: Any, sampler: str, steps: int, model_scheduler: dict[str, Any] | None = None
) -> tuple[Any, list[int] | None, str]:
    """Replace the pipeline's scheduler with the one matching ``sampler`` on the model's training schedule
    (``model_scheduler``: the model's own scheduler config; default: the pipeline's scheduler).

    Returns (scheduler, explicit timesteps or None, a sentence saying how the schedules were aligned).
    """
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler

    sampler = reference_sampler(sampler)
    base = model_scheduler or {**dict(pipe.scheduler.config), "_class_name": type(pipe.scheduler).__name__}
    train = check_training_schedule(base)
    if train["kind"] == "edm":
        scheduler = _edm_scheduler(sampler, train)
        pipe.scheduler = scheduler
        return scheduler, None, f"{type(scheduler).__name__}: Karras sigmas (rho {train['rho']:g}), EDMDiscretization"
    common = {"trained_betas": None, **{k: v for k, v in train.items() if k != "kind"}}
    if train["rescale_betas_zero_snr"] and sampler == "lcm":
        raise InputError("the lcm sampler has no reference on a zero-terminal-SNR schedule (choose euler or dpmpp_2m)")
    if sampler == "lcm":
        scheduler = LCMScheduler.from_config(
            base, **common, original_inference_steps=50, timestep_scaling=10.0, clip_sample=False, thresholding=False
        )
        note = "LCMScheduler's own timesteps (original_inference_steps 50), which lcm_timesteps reproduces"
        pipe.scheduler = scheduler
        return scheduler, None, note
    if sampler == "euler":
        scheduler = EulerDiscreteScheduler.from_config(
            base,
            **common,
            timestep_spacing="trailing",
            interpolation_type="linear",
            use_karras_sigmas=False,
            use_exponential_sigmas=False,
            use_beta_sigmas=False,
            final_sigmas_type="zero",
            timestep_type="discrete",
        )
    else:
        scheduler = DPMSolverMultistepScheduler.from_config(
            base,
            **common,
            timestep_spacing="trailing",
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
            euler_at_final=False,
            final_sigmas_type="zero",
            use_karras_sigmas=False,
            use_lu_lambdas=False,
            use_exponential_sigmas=False,
            use_beta_sigmas=False,
            thresholding=False,
            lambda_min_clipped=-float("inf"),
            variance_type=None,
        )
    pipe.scheduler = scheduler
    ours = legacy_ddpm_timesteps(steps, train["num_train_timesteps"])[::-1].tolist()
    scheduler.set_timesteps(steps)
    if [int(t) for t in scheduler.timesteps.tolist()] == ours:
        return scheduler, None, "diffusers 'trailing' spacing equals LegacyDDPM's timesteps for this step count"
    return scheduler, ours, "LegacyDDPM timesteps passed explicitly (trailing spacing differs for this step count)"


def recorded_schedule(scheduler: Any) -> dict[str, Any]:
    """What the scheduler that ran was (kind, prediction, constants), for the reference metadata."""
    return check_training_schedule({**dict(scheduler.config), "_class_name": type(scheduler).__name__})


def latent_space(scheduler: Any) -> str:
    """ "ve" when the scheduler's latents are ``x0 + sigma eps`` (Euler, the EDM schedulers), "vp" when
    DDPM-scaled (DPM-Solver, LCM)."""
    from diffusers import EulerDiscreteScheduler

    return "ve" if isinstance(scheduler, EulerDiscreteScheduler) or is_edm(scheduler) else "vp"


def sigmas_of(scheduler: Any, timesteps: list[Any]) -> np.ndarray:
    """The sigmas of the steps run, then 0: DDPM: sigma_t = sqrt((1 - abar_t) / abar_t) of the scheduler's own
    (float32) abar; EDM: the scheduler's own sigmas at those timesteps (its c_noise values)."""
    import torch

    if is_edm(scheduler):
        grid = scheduler.timesteps.numpy().astype(np.float64)
        picks = [int(np.abs(grid - float(t)).argmin()) for t in timesteps]
        sigmas = scheduler.sigmas.numpy().astype(np.float32)[picks]
        return np.concatenate([sigmas, np.zeros(1, np.float32)])
    abar = scheduler.alphas_cumprod[torch.tensor([int(t) for t in timesteps], dtype=torch.long)]
    sigmas = ((1 - abar) / abar) ** 0.5
    return np.concatenate([sigmas.numpy().astype(np.float32), np.zeros(1, np.float32)])
