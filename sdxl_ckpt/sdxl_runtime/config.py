"""The numbers that shape an SDXL network, read from the diffusers ``config.json`` of each component.

One set of dataclasses builds the real SDXL base / refiner and the tiny SDXL-shaped test models: nothing in the
network code is specific to a size. ``from_diffusers_configs`` takes the four component configs exactly as
diffusers / transformers write them (diffusers-to-sd stores them in the SD file's metadata as
``sdxl_ckpt.config.<component>``, the reference npz carries them too) and refuses options SDXL never uses rather
than building a network that would silently differ from the reference.

Naming follows sgm's openaimodel: a "level" is one resolution (diffusers' down_blocks[i] / up_blocks[n-1-i]).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.sdxl.variants import CONCAT_KINDS, MODEL_KINDS
from sdxl_ckpt.sdxl.variants import VARIANTS as VARIANT_TABLE

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
VARIANTS = MODEL_KINDS + CONCAT_KINDS  # the kinds the runtime samples (extra input channels: from the UNet config)
METADATA_PREFIX = "sdxl_ckpt.config."


@dataclass(frozen=True)
class UNetConfig:
    """openaimodel UNetModel: per-level channels, resnets, attention, transformer depth and heads."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]  # channels of each level (model_channels * channel_mult)
    layers_per_block: tuple[int, ...]  # resnets per level on the way down (the way up has one more)
    attention: tuple[bool, ...]  # level has SpatialTransformers on the way down
    attention_up: tuple[bool, ...]  # ... on the way up (indexed by level, not by diffusers' up_block index)
    # transformer blocks of each SpatialTransformer: per level, per layer (distilled UNets such as SSD-1B / Vega
    # thin single layers, down to 0 blocks: norm and projections only)
    transformer_depth: tuple[tuple[int, ...], ...]  # way down: layers_per_block[level] entries per level
    transformer_depth_up: tuple[tuple[int, ...], ...]  # way up, by level: layers_per_block[level] + 1 entries
    transformer_depth_middle: int
    num_heads: tuple[int, ...]  # attention heads per level (diffusers' misnamed attention_head_dim)
    num_heads_middle: int
    context_dim: int  # cross-attention width: 2048 base, 1280 refiner
    adm_in_channels: int  # width of y: 2816 base, 2560 refiner
    addition_time_embed_dim: int  # sinusoidal width of each size/crop/aesthetic scalar (256)
    time_cond_proj_dim: int | None = None  # LCM guidance embedding (time_cond_proj), absent in lcm-sdxl
    time_embedding_dim: int | None = None  # width of the time embedding; None: 4 x model_channels (SDXL)
    linear_projection: bool = True  # proj_in / proj_out of the SpatialTransformers: Linear (SDXL) or 1x1 conv
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    transformer_norm_eps: float = 1e-6  # GroupNorm before proj_in (sgm Normalize, diffusers Transformer2DModel)
    layer_norm_eps: float = 1e-5  # norm1..3 of the transformer blocks

    @property
    def model_channels(self) -> int:
        return self.block_out_channels[0]

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.model_channels

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (LDM Encoder/Decoder with one mid attention block)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.13025
    force_upcast: bool = True  # SDXL's VAE overflows in fp16: run it in fp32 whatever the compute dtype


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text transformer: CLIP ViT-L (HF layout) or OpenCLIP ViT-bigG (open_clip layout), same math."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int = 77
    hidden_act: str = "quick_gelu"  # quick_gelu (CLIP-L) | gelu (OpenCLIP, exact erf form)
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2  # 2 = legacy: pool at argmax(ids); otherwise at the first eos_token_id
    projection_dim: int = 0  # OpenCLIP text_projection width (0: no projection)
    has_logit_scale: bool = True  # OpenCLIP only: the official file has it, mindone's LCM list does not


@dataclass(frozen=True)
class SDXLConfig:
    """A whole SDXL: variant, the four components. ``clip_l`` is None for the refiner (OpenCLIP only)."""

    variant: str
    unet: UNetConfig
    vae: VAEConfig
    clip_l: TextEncoderConfig | None
    openclip: TextEncoderConfig

    @property
    def is_refiner(self) -> bool:
        return self.clip_l is None

    @property
    def num_size_scalars(self) -> int:
        """Scalars embedded into y after the pooled text: base 6 (orig, crop, target), refiner 5 (+ aesthetic)."""
        return 5 if self.is_refiner else 6

    @property
    def context_dim(self) -> int:
        return (self.clip_l.hidden_size if self.clip_l else 0) + self.openclip.hidden_size


# --- from diffusers / transformers config.json -------------------------------------------------------------------


def _per_level(value: Any, n: int, name: str) -> tuple[int, ...]:
    """diffusers allows an int for "every level" or a list with one entry per level."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise InputError(f"unet config: {name} must be an int or {n} ints, got {value!r}")


def _per_layer(value: Any, layers: tuple[int, ...], extra: int, name: str) -> tuple[tuple[int, ...], ...]:
    """Transformer depths per level and layer: an int (every layer), one int per level, or one list per level
    with an entry per layer (``layers[level] + extra`` of them: the way up has one layer more)."""
    n = len(layers)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise InputError(f"unet config: {name} must be an int or {n} entries, got {value!r}")
    out = []
    for level, entry in enumerate(value):
        count = layers[level] + extra
        if isinstance(entry, int) and not isinstance(entry, bool):
            out.append((int(entry),) * count)
        elif isinstance(entry, (list, tuple)) and len(entry) == count and all(isinstance(d, int) for d in entry):
            out.append(tuple(int(d) for d in entry))
        else:
            raise InputError(f"unet config: {name}[{level}] must be an int or {count} ints, got {entry!r}")
    return tuple(out)


def _require(cfg: Mapping[str, Any], component: str, key: str, allowed: tuple[Any, ...]) -> None:
    if cfg.get(key, allowed[0]) not in allowed:
        raise InputError(f"{component} config: {key}={cfg.get(key)!r} is not supported (SDXL uses {allowed[0]!r})")


def _has_attention(block_type: str) -> bool:
    if block_type not in ("DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"):
        raise InputError(f"unet config: block type {block_type!r} is not supported")
    return block_type.startswith("CrossAttn")


def unet_config_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
    """UNet2DConditionModel's config.json -> UNetConfig (rules of UNet2DConditionModel.__init__)."""
    for key, allowed in (
        ("addition_embed_type", ("text_time",)),
        ("use_linear_projection", (True, False)),
        ("mid_block_type", ("UNetMidBlock2DCrossAttn",)),
        ("flip_sin_to_cos", (True,)),
        ("freq_shift", (0,)),
        ("resnet_time_scale_shift", ("default",)),
        ("time_embedding_type", ("positional",)),
        ("class_embed_type", (None,)),
        ("encoder_hid_dim_type", (None,)),
        ("conv_in_kernel", (3,)),
        ("conv_out_kernel", (3,)),
        ("act_fn", ("silu",)),
        ("upcast_attention", (None, False)),
        ("only_cross_attention", (False,)),
        ("dual_cross_attention", (False,)),
        ("time_embedding_act_fn", (None,)),
        ("timestep_post_act", (None,)),
        ("mid_block_scale_factor", (1, 1.0)),
        ("resnet_out_scale_factor", (1.0, 1)),
    ):
        _require(cfg, "unet", key, allowed)
    channels = tuple(cfg["block_out_channels"])
    n = len(channels)
    down_types, up_types = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if len(down_types) != n or len(up_types) != n:
        raise InputError("unet config: down_block_types / up_block_types need one entry per block_out_channels")
    heads = _per_level(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8), n, "attention_head_dim")
    layers = _per_level(cfg.get("layers_per_block", 2), n, "layers_per_block")
    depth = _per_layer(cfg.get("transformer_layers_per_block", 1), layers, 0, "transformer_layers_per_block")
    reverse_depth = cfg.get("reverse_transformer_layers_per_block")
    # diffusers indexes up blocks from the lowest resolution; levels count from the highest. Without the reverse
    # list every up layer of a level has the level's (single) depth, as diffusers builds it.
    if reverse_depth is not None:
        if not isinstance(reverse_depth, (list, tuple)) or len(reverse_depth) != n:
            raise InputError(f"unet config: reverse_transformer_layers_per_block needs {n} entries")
        depth_up = _per_layer(list(reversed(reverse_depth)), layers, 1, "reverse_transformer_layers_per_block")
    else:
        depth_up = tuple((d[0],) * (count + 1) for d, count in zip(depth, layers))
    middle = cfg.get("transformer_layers_per_block", 1)
    middle = middle if isinstance(middle, int) else middle[-1]
    middle = middle if isinstance(middle, int) else middle[0]  # the mid block has one transformer
    for level, c in enumerate(channels):
        if c % heads[level]:
            raise InputError(f"unet config: {c} channels at level {level} do not split into {heads[level]} heads")
    return UNetConfig(
        in_channels=int(cfg.get("in_channels", 4)),
        out_channels=int(cfg.get("out_channels", 4)),
        block_out_channels=channels,
        layers_per_block=layers,
        attention=tuple(_has_attention(t) for t in down_types),
        attention_up=tuple(reversed([_has_attention(t) for t in up_types])),
        transformer_depth=depth,
        transformer_depth_up=depth_up,
        transformer_depth_middle=int(middle),
        num_heads=heads,
        num_heads_middle=heads[-1],
        context_dim=int(cfg["cross_attention_dim"]),
        adm_in_channels=int(cfg["projection_class_embeddings_input_dim"]),
        addition_time_embed_dim=int(cfg["addition_time_embed_dim"]),
        time_cond_proj_dim=cfg.get("time_cond_proj_dim"),
        time_embedding_dim=cfg.get("time_embedding_dim"),
        linear_projection=bool(cfg.get("use_linear_projection", True)),
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
    )


def vae_config_from_diffusers(cfg: Mapping[str, Any]) -> VAEConfig:
    """AutoencoderKL's config.json -> VAEConfig."""
    for key, allowed in (
        ("act_fn", ("silu",)),
        ("use_quant_conv", (True,)),
        ("use_post_quant_conv", (True,)),
        ("mid_block_add_attention", (True,)),
    ):
        _require(cfg, "vae", key, allowed)
    return VAEConfig(
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
        block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=int(cfg.get("layers_per_block", 2)),
        latent_channels=int(cfg.get("latent_channels", 4)),
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        scaling_factor=float(cfg.get("scaling_factor", 0.13025)),
        force_upcast=bool(cfg.get("force_upcast", True)),
    )


def text_config_from_transformers(cfg: Mapping[str, Any], with_projection: bool) -> TextEncoderConfig:
    """CLIPTextConfig's config.json -> TextEncoderConfig (``with_projection``: CLIPTextModelWithProjection)."""
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise InputError(f"text encoder config: hidden_act {act!r} is not supported")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if hidden % heads:
        raise InputError(f"text encoder config: hidden_size {hidden} does not split into {heads} heads")
    return TextEncoderConfig(
        vocab_size=int(cfg.get("vocab_size", 49408)),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        max_positions=int(cfg.get("max_position_embeddings", 77)),
        hidden_act=act,
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        eos_token_id=int(cfg.get("eos_token_id", 2)),
        projection_dim=int(cfg.get("projection_dim", hidden)) if with_projection else 0,
    )


def _as_dict(value: Mapping[str, Any] | str | None, name: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, Mapping):
        return dict(value) if value is not None else None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise InputError(f"{name} config is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InputError(f"{name} config is not a JSON object")
    return parsed


def from_diffusers_configs(
    unet: Mapping[str, Any] | str,
    vae: Mapping[str, Any] | str,
    text_encoder: Mapping[str, Any] | str | None,
    text_encoder_2: Mapping[str, Any] | str,
    variant: str | None = None,
) -> SDXLConfig:
    """The four component config.json dicts (or their JSON text) -> SDXLConfig.

    ``text_encoder`` None means a refiner. ``variant`` (any row of ``sdxl.variants.VARIANTS`` with this key
    structure) defaults to the structure; LCM cannot be told from base by its configs, so pass "lcm" when known
    (it only labels the config: what differs in the network is in the component configs).
    """
    unet_d, vae_d = _as_dict(unet, "unet"), _as_dict(vae, "vae")
    te_d, te2_d = _as_dict(text_encoder, "text_encoder"), _as_dict(text_encoder_2, "text_encoder_2")
    if unet_d is None or vae_d is None or te2_d is None:
        raise InputError("unet, vae and text_encoder_2 configs are required")
    structure = "refiner" if te_d is None else "base"
    if variant is None:
        variant = structure
    if variant not in VARIANT_TABLE or VARIANT_TABLE[variant].structure != structure:
        raise InputError(f"variant {variant!r} does not fit the configs (a {structure} structure)")
    config = SDXLConfig(
        variant=variant,
        unet=unet_config_from_diffusers(unet_d),
        vae=vae_config_from_diffusers(vae_d),
        clip_l=text_config_from_transformers(te_d, with_projection=False) if te_d is not None else None,
        openclip=text_config_from_transformers(te2_d, with_projection=True),
    )
    check_consistent(config)
    return config


def from_metadata(metadata: Mapping[str, str], variant: str | None = None) -> SDXLConfig:
    """SDXLConfig from an SD file's metadata written by diffusers-to-sd (``sdxl_ckpt.config.<component>``)."""
    configs = {c: metadata.get(METADATA_PREFIX + c) for c in COMPONENTS}
    missing = [c for c in ("unet", "vae", "text_encoder_2") if configs[c] is None]
    if missing:
        raise InputError("metadata lacks " + ", ".join(METADATA_PREFIX + c for c in missing))
    return from_diffusers_configs(**configs, variant=variant or metadata.get("sdxl_ckpt.variant"))


def from_weights(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None) -> SDXLConfig:
    """SDXLConfig of a file with no config metadata: the architecture read from its names and shapes.

    Head counts then follow the SDXL convention (64-channel heads), as ``sdxl.architecture`` says.
    """
    from sdxl_ckpt.sdxl.architecture import infer_architecture

    arch = infer_architecture(shapes, metadata)
    if arch.variant not in VARIANTS:
        raise InputError(f"the runtime runs {', '.join(VARIANTS)}; this file is {arch.variant}")
    if "vae" not in arch.configs:
        raise InputError("the file has no VAE")
    configs = {c: arch.configs.get(c) for c in COMPONENTS}
    return from_diffusers_configs(**configs, variant=arch.variant)


def check_consistent(config: SDXLConfig) -> None:
    """The widths the conditioner produces must be the widths the UNet expects."""
    u = config.unet
    if config.context_dim != u.context_dim:
        raise InputError(f"text encoders give a {config.context_dim}-wide context, the UNet expects {u.context_dim}")
    adm = config.openclip.projection_dim + config.num_size_scalars * u.addition_time_embed_dim
    if adm != u.adm_in_channels:
        raise InputError(f"conditioner gives a {adm}-wide y, the UNet expects {u.adm_in_channels}")


# --- presets: the official SDXL 1.0 configs ------------------------------------------------------------------


def preset(variant: str) -> SDXLConfig:
    """The real full-size SDXL 1.0 base / refiner config (lcm: base structure, as latent-consistency/lcm-sdxl)."""
    from sdxl_ckpt.sdxl.configs import full_configs

    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r} (expected one of {', '.join(VARIANTS)})")
    configs = full_configs(variant)
    configs["unet"]["in_channels"] = VARIANT_TABLE[variant].in_channels  # inpainting 9, instruct-pix2pix 8
    return from_diffusers_configs(
        **configs | ({"text_encoder": None} if variant == "refiner" else {}),
        variant=variant,
    )


def with_cond_proj(config: SDXLConfig, dim: int | None) -> SDXLConfig:
    """The same config with (dim) or without (None) the LCM guidance embedding ``time_cond_proj``."""
    return replace(config, unet=replace(config.unet, time_cond_proj_dim=dim))


def with_logit_scale(config: SDXLConfig, present: bool) -> SDXLConfig:
    """The same config with or without OpenCLIP's ``logit_scale`` parameter (unused for text conditioning)."""
    return replace(config, openclip=replace(config.openclip, has_logit_scale=present))
