"""The real SDXL 1.0 facts every layer shares: the variants and the official component configs, as data.

The configs are those of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 (``config.json`` of each
component, ``scheduler_config.json``, ``model_index.json``). The keymaps are generated from them, the runtime's
presets read them, and the test models shrink only their widths.
"""

from __future__ import annotations

import copy
from typing import Any

from sdxl_ckpt.sdxl.variants import structure_of

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
    "base": {
        "unet": _SDXL_BASE_UNET,
        "vae": _SDXL_VAE,
        "text_encoder": _SDXL_CLIP_L,
        "text_encoder_2": _SDXL_OPENCLIP_G,
    },
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


def full_configs(variant: str) -> dict[str, dict[str, Any]]:
    """The real full-size component configs of ``variant`` (deep copies; callers may edit them)."""
    return copy.deepcopy(FULL_CONFIGS[structure_of(variant)])


def model_index(variant: str) -> dict[str, Any]:
    """model_index.json as in the official repos (base/lcm: txt2img pipeline; refiner: img2img, one encoder)."""
    from importlib import metadata

    try:  # read without importing diffusers: conversions run where torch is absent
        diffusers_version = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        diffusers_version = "0.30.0"  # the oldest diffusers this project supports
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
        return {
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            **common,
            "force_zeros_for_empty_prompt": False,
            "requires_aesthetics_score": True,
            "text_encoder": [None, None],
            "tokenizer": [None, None],
        }
    return {
        "_class_name": "StableDiffusionXLPipeline",
        **common,
        "force_zeros_for_empty_prompt": True,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
