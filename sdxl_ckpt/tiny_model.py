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
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdxl_ckpt.errors import InputError, OutputExistsError

VARIANTS = ("base", "refiner", "lcm")

# --- the real SDXL 1.0 configs (stabilityai/stable-diffusion-xl-base-1.0, -refiner-1.0), as data ---------------

_SDXL_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_SDXL_UNET_COMMON: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_norm": None,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "upcast_attention": None,
    "use_linear_projection": True,
}

_SDXL_BASE_UNET: dict[str, Any] = {
    **_SDXL_UNET_COMMON,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}

_SDXL_REFINER_UNET: dict[str, Any] = {
    **_SDXL_UNET_COMMON,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}

_CLIP_COMMON: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,  # the legacy value: transformers then pools at argmax(input_ids), i.e. at <|endoftext|>
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "pad_token_id": 1,
    "vocab_size": 49408,
}

_SDXL_CLIP_L: dict[str, Any] = {
    **_CLIP_COMMON,
    "architectures": ["CLIPTextModel"],
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}

_SDXL_OPENCLIP_G: dict[str, Any] = {
    **_CLIP_COMMON,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

FULL_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "base": {"unet": _SDXL_BASE_UNET, "vae": _SDXL_VAE, "text_encoder": _SDXL_CLIP_L,
             "text_encoder_2": _SDXL_OPENCLIP_G},
    "refiner": {"unet": _SDXL_REFINER_UNET, "vae": _SDXL_VAE, "text_encoder_2": _SDXL_OPENCLIP_G},
}

# SDXL's scheduler/scheduler_config.json (identical in base and refiner)
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# --- tiny widths (TEAM.md): everything else stays as in FULL_CONFIGS -----------------------------------------

TINY_VOCAB_SIZE = 514  # 256 byte tokens + 256 "</w>" forms + <|startoftext|> + <|endoftext|>
TINY_COND_PROJ_DIM = 16

_TINY_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "base": {
        "unet": {"block_out_channels": [32, 64, 128], "attention_head_dim": [2, 4, 8], "cross_attention_dim": 96,
                 "addition_time_embed_dim": 16, "projection_class_embeddings_input_dim": 128, "sample_size": 16},
        # channel mults 1,2,4,4 as in the real VAE (1,2,4,4 x 128): shortcut convs sit at the same places
        "vae": {"block_out_channels": [32, 64, 128, 128], "sample_size": 128},
        "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "projection_dim": 32,
                         "vocab_size": TINY_VOCAB_SIZE},
        "text_encoder_2": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                           "projection_dim": 32, "vocab_size": TINY_VOCAB_SIZE},
    },
    "refiner": {
        "unet": {"block_out_channels": [32, 64, 128, 128], "attention_head_dim": [2, 4, 8, 8],
                 "cross_attention_dim": 64, "addition_time_embed_dim": 16,
                 "projection_class_embeddings_input_dim": 112, "sample_size": 16},
    },
}
_TINY_OVERRIDES["refiner"]["vae"] = _TINY_OVERRIDES["base"]["vae"]
_TINY_OVERRIDES["refiner"]["text_encoder_2"] = _TINY_OVERRIDES["base"]["text_encoder_2"]

_COMPONENT_INDEX = {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3}
_WEIGHT_FILE = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model"}


def structure_of(variant: str) -> str:
    """The key structure a variant has: LCM is the base structure (its UNet is a distilled base UNet)."""
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r} (expected one of {', '.join(VARIANTS)})")
    return "refiner" if variant == "refiner" else "base"


def full_configs(variant: str) -> dict[str, dict[str, Any]]:
    """The real full-size component configs of ``variant`` (deep copies; callers may edit them)."""
    return copy.deepcopy(FULL_CONFIGS[structure_of(variant)])


def tiny_configs(variant: str) -> dict[str, dict[str, Any]]:
    """The tiny component configs: the real configs with TEAM.md's tiny widths."""
    structure = structure_of(variant)
    configs = full_configs(variant)
    for component, override in _TINY_OVERRIDES[structure].items():
        configs[component].update(copy.deepcopy(override))
    return configs


def model_index(variant: str) -> dict[str, Any]:
    """model_index.json as in the official repos (base/lcm: txt2img pipeline; refiner: img2img, one encoder)."""
    from diffusers import __version__ as diffusers_version

    common = {
        "_diffusers_version": diffusers_version,
        "add_watermarker": None,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if structure_of(variant) == "refiner":
        return {"_class_name": "StableDiffusionXLImg2ImgPipeline", **common, "force_zeros_for_empty_prompt": False,
                "requires_aesthetics_score": True, "text_encoder": [None, None], "tokenizer": [None, None]}
    return {"_class_name": "StableDiffusionXLPipeline", **common, "force_zeros_for_empty_prompt": True,
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}


# --- offline tokenizers ------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> list[str]:
    """CLIP's (GPT-2's) printable stand-ins for the 256 bytes, in CLIP's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary with no merges: byte tokens, their "</w>" forms, then the two specials (highest ids)."""
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """Write an offline CLIPTokenizer folder (vocab.json, merges.txt, configs) like the official ones."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
                "unk_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **specials}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_tokenizers(out_dir: Path, variant: str) -> None:
    """tokenizer/ pads with <|endoftext|> (CLIP-L), tokenizer_2/ with "!" (OpenCLIP), as in SDXL."""
    if structure_of(variant) == "base":
        write_tokenizer(out_dir / "tokenizer", "<|endoftext|>")
    write_tokenizer(out_dir / "tokenizer_2", "!")


def write_scheduler(out_dir: Path) -> None:
    from diffusers import EulerDiscreteScheduler

    EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(out_dir / "scheduler")


def write_model_index(out_dir: Path, variant: str) -> None:
    (out_dir / "model_index.json").write_text(json.dumps(model_index(variant), indent=2) + "\n", encoding="utf-8")


# --- random, non-trivial tiny weights -----------------------------------------------------------------------------

def component_seed(seed: int, component: str) -> int:
    """Each component gets its own seed so one component's weights don't depend on the others'."""
    return seed * 16 + _COMPONENT_INDEX[component]


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


def text_config(config: dict[str, Any]) -> Any:
    """A transformers CLIPTextConfig from our config dict (``model_type`` is a class attribute, not a kwarg)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{k: v for k, v in config.items() if k != "model_type"})


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


def _save(component: str, model: Any, folder: Path, variant_fp16: bool, max_shard_size: int | str | None,
          clip_flat_keys: bool) -> None:
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
        tensors = {(k if k.startswith("text_model.") else "text_model." + k): handle.get_tensor(k)
                   for k in handle.keys()}
    save_file(tensors, str(path), metadata=metadata)


def write_tiny_unet(folder: Path, variant: str = "base", seed: int = 0, cond_proj: bool = False,
                    variant_fp16: bool = False, max_shard_size: int | str | None = None) -> Path:
    """A UNet-only folder (config.json + weights), e.g. the distilled LCM UNet users keep beside a base pipeline."""
    config = tiny_configs(variant)["unet"]
    if cond_proj:
        config["time_cond_proj_dim"] = TINY_COND_PROJ_DIM
    _save("unet", _make("unet", config, seed), folder, variant_fp16, max_shard_size, False)
    return folder


def build_tiny_model(variant: str, out_dir: str | Path, seed: int = 0, cond_proj: bool = False,
                     variant_fp16: bool = False, unet_max_shard_size: int | str | None = None,
                     clip_flat_keys: bool = False) -> Path:
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
    with _library_bars_off():
        for component, config in configs.items():
            shard = unet_max_shard_size if component == "unet" else None
            _save(component, _make(component, config, seed), out / component, variant_fp16, shard, clip_flat_keys)
        write_tokenizers(out, structure)
        write_scheduler(out)
        write_model_index(out, structure)
        if variant == "lcm":
            write_tiny_unet(out / "lcm-unet", "base", seed + 1, cond_proj, variant_fp16, unet_max_shard_size)
    return out


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


def prepare_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse an existing non-empty folder unless ``overwrite``; with it, only replace a pipeline folder.

    A folder without model_index.json is never emptied, so a mistyped ``-o`` cannot wipe unrelated files.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError("exists and is not a folder", path=out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError("folder exists and is not empty (use --overwrite)", path=out)
        if not (out / "model_index.json").is_file():
            raise OutputExistsError("not a diffusers pipeline folder (no model_index.json); refusing to replace it",
                                    path=out)
        shutil.rmtree(out)
    return out


def build_model_cli(variant: str, out_dir: str | Path, *, seed: int = 0, cond_proj: bool = False,
                    variant_fp16: bool = False, full: bool = False, overwrite: bool = False,
                    quiet: bool = True) -> Path:
    """What ``sdxl-ckpt tiny-model`` does: check the target, then build tiny (or ``full``-size) weights."""
    structure_of(variant)
    if full and cond_proj:
        raise InputError("--cond-proj is not available with --full")
    out = prepare_output_dir(out_dir, overwrite)
    if full:
        from sdxl_ckpt.full_model import build_full_model

        return build_full_model(variant, out, seed=seed, variant_fp16=variant_fp16, quiet=quiet)
    return build_tiny_model(variant, out, seed=seed, cond_proj=cond_proj, variant_fp16=variant_fp16)
