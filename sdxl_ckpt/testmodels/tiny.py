"""Tiny, SDXL-shaped diffusers folders built offline with the real classes, for tests and demos.

No SDXL weights can be downloaded here, yet every converter must be checked against the REAL key structure.
So the tiny configs are the real SDXL configs (``FULL_CONFIGS``, copied from the official repos) with only the
widths shrunk: same blocks, resnets, transformer depths, encoder layers and VAE levels, hence the same key names
(and the same key counts: 1680 UNet, 248 VAE, 196 CLIP-L, 517 OpenCLIP for base). Weights are random but
non-trivial (every tensor, including norms and biases, is perturbed) so that a swapped or un-transposed tensor
changes outputs. Same seed -> byte-identical weight files.

Torch, diffusers and transformers are imported inside functions: they are the optional ``reference`` extra.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.formats.atomic import atomic_output_dir, check_output_dir
from sdxl_ckpt.formats.diffusers_folder import with_text_model_level
from sdxl_ckpt.sdxl.configs import SCHEDULER_CONFIG, full_configs
from sdxl_ckpt.sdxl.tokenizers import BYTE_LEVEL_VOCAB_SIZE, write_tokenizers
from sdxl_ckpt.sdxl.variants import EDM_SCHEDULER, EDM_VPRED_SCHEDULER, structure_of
from sdxl_ckpt.testmodels.common import component_seed, text_config, write_model_index, write_scheduler

# --- tiny widths: everything else stays as in FULL_CONFIGS -----------------------------------------

TINY_VOCAB_SIZE = BYTE_LEVEL_VOCAB_SIZE
TINY_COND_PROJ_DIM = 16

_TINY_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "base": {
        "unet": {
            "block_out_channels": [32, 64, 128],
            "attention_head_dim": [2, 4, 8],
            "cross_attention_dim": 96,
            "addition_time_embed_dim": 16,
            "projection_class_embeddings_input_dim": 128,
            "sample_size": 16,
        },
        # channel mults 1,2,4,4 as in the real VAE (1,2,4,4 x 128): shortcut convs sit at the same places
        "vae": {"block_out_channels": [32, 64, 128, 128], "sample_size": 128},
        "text_encoder": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "projection_dim": 32,
            "vocab_size": TINY_VOCAB_SIZE,
        },
        "text_encoder_2": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "projection_dim": 32,
            "vocab_size": TINY_VOCAB_SIZE,
        },
    },
    "refiner": {
        "unet": {
            "block_out_channels": [32, 64, 128, 128],
            "attention_head_dim": [2, 4, 8, 8],
            "cross_attention_dim": 64,
            "addition_time_embed_dim": 16,
            "projection_class_embeddings_input_dim": 112,
            "sample_size": 16,
        },
    },
}
_TINY_OVERRIDES["refiner"]["vae"] = _TINY_OVERRIDES["base"]["vae"]
_TINY_OVERRIDES["refiner"]["text_encoder_2"] = _TINY_OVERRIDES["base"]["text_encoder_2"]

_WEIGHT_FILE = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}


def tiny_configs(variant: str) -> dict[str, dict[str, Any]]:
    """The tiny component configs: the real configs with tiny widths."""
    structure = structure_of(variant)
    configs = full_configs(variant)
    for component, override in _TINY_OVERRIDES[structure].items():
        configs[component].update(copy.deepcopy(override))
    return configs


# --- tiny models whose proportions are not SDXL's: the converters must read widths from the weights -----------------

_ODD_TEXT = {  # CLIP-L 32 wide (2 heads of 16), OpenCLIP 64 wide (4 heads), projection 48: no SDXL coincidence
    "text_encoder": {"hidden_size": 32, "intermediate_size": 80, "num_attention_heads": 2, "projection_dim": 32},
    "text_encoder_2": {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "projection_dim": 48},
}
SHAPES: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    # non-monotonic channels, a time embedding (100) equal to no channel count, odd head counts (1, 3, 2), depths
    # that differ per level, added time ids 8 wide (48 + 6 x 8 = 96)
    "odd": (
        "base",
        {
            "unet": {
                "block_out_channels": [32, 96, 64],
                "attention_head_dim": [1, 3, 2],
                "time_embedding_dim": 100,
                "transformer_layers_per_block": [1, 2, 3],
                "cross_attention_dim": 96,
                "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 96,
                "sample_size": 16,
            },
            "vae": {"block_out_channels": [32, 64, 96], "layers_per_block": 1, "sample_size": 64},
            **_ODD_TEXT,
        },
    ),
    # a refiner-structured model with 3-channel heads and conv (not linear) transformer projections
    "odd-refiner": (
        "refiner",
        {
            "unet": {
                "block_out_channels": [32, 64, 96, 96],
                "attention_head_dim": [2, 4, 3, 3],
                "transformer_layers_per_block": 1,
                "use_linear_projection": False,
                "cross_attention_dim": 64,
                "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 88,
                "sample_size": 16,
            },
            "vae": {"block_out_channels": [32, 64], "latent_channels": 4, "sample_size": 32},
            "text_encoder_2": _ODD_TEXT["text_encoder_2"],
        },
    ),
    # SSD-1B's pattern: down depths [0, 0, 2, 2, 4, 4] (level 0 has none), up levels thinned, mid 4
    "ssd-1b": (
        "base",
        {
            "unet": {
                "transformer_layers_per_block": [1, 2, 4],
                "reverse_transformer_layers_per_block": [[4, 4, 4], [2, 2, 1], [1, 1, 1]],
            }
        },
    ),
    # Segmind Vega's pattern: down depths [0, 0, 1, 1, 2, 2]; one up transformer with no block at all (depth 0)
    "vega": (
        "base",
        {
            "unet": {
                "transformer_layers_per_block": [1, 1, 2],
                "reverse_transformer_layers_per_block": [[2, 2, 0], [1, 1, 0], [1, 1, 1]],
            }
        },
    ),
}


# one tiny model per variant row that differs in its weights or its schedule
_LATENT_STATS = {"latents_mean": [-1.6574, 1.886, -1.383, 2.5155], "latents_std": [8.4927, 5.9022, 6.5498, 5.2299]}
SHAPES["inpaint"] = ("base", {"unet": {"in_channels": 9}})
SHAPES["pix2pix"] = ("base", {"unet": {"in_channels": 8}})
SHAPES["playground-v2.5"] = ("base", {"vae": {"scaling_factor": 0.5, **_LATENT_STATS}})
SHAPES["v-pred"] = ("base", {})
SHAPES["v-pred-edm"] = ("base", {})
SHAPE_SCHEDULERS: dict[str, dict[str, Any]] = {
    "playground-v2.5": EDM_SCHEDULER,
    "v-pred": {**SCHEDULER_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
    "v-pred-edm": EDM_VPRED_SCHEDULER,  # CosXL-like: sigmas 0.002..120, sigma_data 1
}


def shape_configs(name: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """(structure, component configs) of the tiny model ``name`` of ``SHAPES``: the tiny configs, overridden."""
    if name not in SHAPES:
        raise InputError(f"unknown tiny shape {name!r} (expected one of {', '.join(SHAPES)})")
    structure, overrides = SHAPES[name]
    configs = tiny_configs(structure)
    for component, override in overrides.items():
        configs[component].update(copy.deepcopy(override))
    levels = len(configs["vae"]["block_out_channels"])  # the VAE's block types follow its level count
    configs["vae"].update(
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels
    )
    return structure, configs


# --- random, non-trivial tiny weights -----------------------------------------------------------------------------


def _perturb(model: Any, seed: int) -> None:
    """Add noise to every floating parameter (norm gains ~1+N(0,.1), biases ~N(0,.1), weights +N(0,.02)).

    Default inits leave norms at exactly 1/0, biases at 0 and some layers at 0: a converter that swapped two norms
    or dropped a bias would then go unnoticed. After this, every tensor is distinct and non-constant.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for _name, param in sorted(model.named_parameters()):
            scale = 0.1 if param.ndim == 1 else 0.02
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * scale)


def _make(component: str, config: dict[str, Any], seed: int) -> Any:
    import torch

    torch.manual_seed(component_seed(seed, component))
    if component == "unet":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_config(config)
    elif component == "vae":
        from diffusers import AutoencoderKL

        model = AutoencoderKL.from_config(config)
    else:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
        model = cls(text_config(config))
    _perturb(model, component_seed(seed, component))
    return model.eval()


def _save(
    component: str, model: Any, folder: Path, variant_fp16: bool, max_shard_size: int | str | None, clip_flat_keys: bool
) -> None:
    import torch

    kwargs: dict[str, Any] = {}
    if variant_fp16:
        model = model.to(torch.float16)
        kwargs["variant"] = "fp16"
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    if component == "text_encoder" and not clip_flat_keys:
        _prefix_clip_keys(folder, variant_fp16)


def _prefix_clip_keys(folder: Path, variant_fp16: bool) -> None:
    """Give CLIP-L keys the ``text_model.`` level the official files have (transformers >= 5.6 saves without it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / ("model.fp16.safetensors" if variant_fp16 else "model.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {with_text_model_level(k): handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(path), metadata=metadata)


def write_tiny_unet(
    folder: Path,
    variant: str = "base",
    seed: int = 0,
    cond_proj: bool = False,
    variant_fp16: bool = False,
    max_shard_size: int | str | None = None,
) -> Path:
    """A UNet-only folder (config.json + weights), e.g. the distilled LCM UNet users keep beside a base pipeline."""
    config = tiny_configs(variant)["unet"]
    if cond_proj:
        config["time_cond_proj_dim"] = TINY_COND_PROJ_DIM
    _save("unet", _make("unet", config, seed), folder, variant_fp16, max_shard_size, False)
    return folder


def build_tiny_model(
    variant: str,
    out_dir: str | Path,
    seed: int = 0,
    cond_proj: bool = False,
    variant_fp16: bool = False,
    unet_max_shard_size: int | str | None = None,
    clip_flat_keys: bool = False,
) -> Path:
    """Write a tiny SDXL-shaped diffusers pipeline folder at ``out_dir`` and return it.

    ``variant``: base | refiner | lcm (lcm: ``out_dir`` is a base pipeline and ``out_dir/lcm-unet`` the distilled
    UNet, seed+1; ``cond_proj`` gives that UNet ``time_cond_proj_dim`` and ``time_embedding.cond_proj.weight``).
    ``variant_fp16``: fp16 weights saved as ``*.fp16.safetensors``; ``unet_max_shard_size``: shard the UNet(s)
    (e.g. "200KB", with an index json); ``clip_flat_keys``: keep CLIP-L keys without ``text_model.``, as
    transformers >= 5.6 saves them (default: the official layout, with ``text_model.``).
    """
    structure = structure_of(variant)
    if cond_proj and variant != "lcm":
        raise InputError("--cond-proj applies to the lcm variant only")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = tiny_configs(structure)
    _write_pipeline(out, structure, configs, seed, variant_fp16, unet_max_shard_size, clip_flat_keys)
    if variant == "lcm":
        with _library_bars_off():
            write_tiny_unet(out / "lcm-unet", "base", seed + 1, cond_proj, variant_fp16, unet_max_shard_size)
    return out


def build_shape_model(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny pipeline folder with the proportions ``SHAPES[name]`` (fp32, official CLIP-L key layout)."""
    structure, configs = shape_configs(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_pipeline(out, structure, configs, seed, False, None, False, SHAPE_SCHEDULERS.get(name))
    return out


def _write_pipeline(
    out: Path,
    structure: str,
    configs: dict[str, dict[str, Any]],
    seed: int,
    variant_fp16: bool,
    unet_max_shard_size: int | str | None,
    clip_flat_keys: bool,
    scheduler: dict[str, Any] | None = None,
) -> None:
    with _library_bars_off():
        for component, config in configs.items():
            shard = unet_max_shard_size if component == "unet" else None
            _save(component, _make(component, config, seed), out / component, variant_fp16, shard, clip_flat_keys)
        write_tokenizers(out, structure)
        write_scheduler(out, scheduler)
        write_model_index(out, structure)


@contextlib.contextmanager
def _library_bars_off() -> Iterator[None]:
    """transformers draws a "Writing model shards" bar per save: noise for files this small; restored after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def build_model_cli(
    variant: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    cond_proj: bool = False,
    variant_fp16: bool = False,
    full: bool = False,
    overwrite: bool = False,
    quiet: bool = True,
) -> Path:
    """What ``sdxl-ckpt tiny-model`` does: check the target, then build tiny (or ``full``-size) weights."""
    structure_of(variant)
    if full and cond_proj:
        raise InputError("--cond-proj is not available with --full")
    out = check_output_dir(out_dir, overwrite)
    # built in a hidden folder beside ``out`` and renamed into place: an interrupted build leaves nothing there
    with atomic_output_dir(out, overwrite) as tmp:
        if full:
            from sdxl_ckpt.testmodels.full import build_full_model

            build_full_model(variant, tmp, seed=seed, variant_fp16=variant_fp16, quiet=quiet)
        else:
            build_tiny_model(variant, tmp, seed=seed, cond_proj=cond_proj, variant_fp16=variant_fp16)
    return out


def tiny_runtime_config(variant: str, cond_proj: bool = False) -> Any:
    """The runtime config of the tiny model ``build_tiny_model`` writes (a ``sdxl_runtime.config.SDXLConfig``)."""
    from sdxl_ckpt.sdxl_runtime.config import from_diffusers_configs, with_cond_proj

    configs = tiny_configs(variant)
    config = from_diffusers_configs(
        **configs | ({"text_encoder": None} if variant == "refiner" else {}), variant=variant
    )
    return with_cond_proj(config, TINY_COND_PROJ_DIM) if cond_proj else config
