"""The exact SD key set of an architecture: every name, shape and dtype class, from the configs alone (no torch).

``diffusers_shapes`` lists the parameters the real diffusers / transformers classes register for a config (in
their registration order, so the SD order is the one the meta-device models give); ``keymaps.diffusers_sd`` maps
them to SD names and ``keymaps.transforms`` gives the SD shapes. Every check of an SD or MindSpore file compares
its keys and shapes with this set exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.keymaps.diffusers_sd import SD_PREFIXES, map_component_keys
from sdxl_ckpt.keymaps.transforms import TRANSFORMS
from sdxl_ckpt.sdxl.architecture import Architecture

Shape = tuple[int, ...]
# SD component order = mindone's parameter order (UNet, text encoders, VAE)
SD_ORDER = ("unet", "text_encoder", "text_encoder_2", "vae")
FF_MULT = 4  # diffusers' FeedForward width multiplier (GEGLU doubles its first projection)


@dataclass(frozen=True)
class ExpectedKey:
    """One SD tensor of an architecture: shape, ``float`` or ``int``, and whether a complete file must hold it."""

    shape: Shape
    dtype: str
    required: bool = True
    why: str = ""  # for optional keys: why a file may lack it


# SD tensors the converters make rather than map: generator -> (shape from the component config, dtype class)
GENERATED_SHAPE = {
    "position_ids": lambda cfg: ((1, int(cfg.get("max_position_embeddings", 77))), "int"),
    "logit_scale": lambda cfg: ((), "float"),
}
OPTIONAL = {
    "position_ids": "a buffer (0..76) many files leave out; regenerated when absent",
    "logit_scale": "CLIP's contrastive temperature, unused for generation; mindone's LCM file has none",
}


PRUNED_WHY = "pruned in this file: SDXL reads CLIP-L's penultimate layer and never its final norm"


class _Params:
    """An ordered parameter listing, built like ``nn.Module`` registration (prefix + name -> shape)."""

    def __init__(self) -> None:
        self.shapes: dict[str, Shape] = {}

    def add(self, name: str, *shape: int) -> None:
        self.shapes[name] = tuple(shape)

    def linear(self, prefix: str, out: int, inp: int, bias: bool = True) -> None:
        self.add(prefix + "weight", out, inp)
        if bias:
            self.add(prefix + "bias", out)

    def conv(self, prefix: str, out: int, inp: int, kernel: int) -> None:
        self.add(prefix + "weight", out, inp, kernel, kernel)
        self.add(prefix + "bias", out)

    def norm(self, prefix: str, channels: int) -> None:
        self.add(prefix + "weight", channels)
        self.add(prefix + "bias", channels)


def _per_level(value: Any, levels: int) -> list[Any]:
    return [value] * levels if isinstance(value, int) else list(value)


def _layer_value(value: Any, j: int) -> int:
    return int(value[j]) if isinstance(value, Sequence) else int(value)


def _resnet(p: _Params, prefix: str, inp: int, out: int, temb: int | None) -> None:
    p.norm(prefix + "norm1.", inp)
    p.conv(prefix + "conv1.", out, inp, 3)
    if temb is not None:
        p.linear(prefix + "time_emb_proj.", out, temb)
    p.norm(prefix + "norm2.", out)
    p.conv(prefix + "conv2.", out, out, 3)
    if inp != out:
        p.conv(prefix + "conv_shortcut.", out, inp, 1)


def _transformer(p: _Params, prefix: str, channels: int, heads: int, depth: int, context: int, linear: bool) -> None:
    inner = (channels // heads) * heads
    p.norm(prefix + "norm.", channels)
    if linear:
        p.linear(prefix + "proj_in.", inner, channels)
    else:
        p.conv(prefix + "proj_in.", inner, channels, 1)
    for t in range(depth):
        block = f"{prefix}transformer_blocks.{t}."
        p.norm(block + "norm1.", inner)
        for name, source in (("attn1", inner), ("attn2", context)):
            p.linear(f"{block}{name}.to_q.", inner, inner, bias=False)
            p.linear(f"{block}{name}.to_k.", inner, source, bias=False)
            p.linear(f"{block}{name}.to_v.", inner, source, bias=False)
            p.linear(f"{block}{name}.to_out.0.", inner, inner)
            if name == "attn1":
                p.norm(block + "norm2.", inner)
        p.norm(block + "norm3.", inner)
        p.linear(block + "ff.net.0.proj.", inner * FF_MULT * 2, inner)
        p.linear(block + "ff.net.2.", inner, inner * FF_MULT)
    if linear:
        p.linear(prefix + "proj_out.", channels, inner)
    else:
        p.conv(prefix + "proj_out.", channels, inner, 1)


def _unet_shapes(cfg: Mapping[str, Any]) -> dict[str, Shape]:
    """The parameters of ``diffusers.UNet2DConditionModel`` for an SDXL-type config."""
    p = _Params()
    channels = list(cfg["block_out_channels"])
    levels = len(channels)
    c0 = channels[0]
    temb = cfg.get("time_embedding_dim") or 4 * c0
    heads = _per_level(cfg.get("num_attention_heads") or cfg["attention_head_dim"], levels)
    layers = _per_level(cfg.get("layers_per_block", 2), levels)
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), levels)
    reverse_depth = cfg.get("reverse_transformer_layers_per_block") or list(reversed(depth))
    context = int(cfg["cross_attention_dim"])
    linear = bool(cfg.get("use_linear_projection"))
    down_attn = [t == "CrossAttnDownBlock2D" for t in cfg["down_block_types"]]
    up_attn = [t == "CrossAttnUpBlock2D" for t in cfg["up_block_types"]]

    p.conv("conv_in.", c0, int(cfg["in_channels"]), int(cfg.get("conv_in_kernel", 3)))
    p.linear("time_embedding.linear_1.", temb, c0)
    if cfg.get("time_cond_proj_dim"):
        p.linear("time_embedding.cond_proj.", c0, int(cfg["time_cond_proj_dim"]), bias=False)
    p.linear("time_embedding.linear_2.", temb, temb)
    if cfg.get("addition_embed_type") == "text_time":
        p.linear("add_embedding.linear_1.", temb, int(cfg["projection_class_embeddings_input_dim"]))
        p.linear("add_embedding.linear_2.", temb, temb)

    out = c0
    for i in range(levels):
        inp, out = out, channels[i]
        block = f"down_blocks.{i}."
        if down_attn[i]:
            for j in range(layers[i]):
                _transformer(p, f"{block}attentions.{j}.", out, heads[i], _layer_value(depth[i], j), context, linear)
        for j in range(layers[i]):
            _resnet(p, f"{block}resnets.{j}.", inp if j == 0 else out, out, temb)
        if i < levels - 1:
            p.conv(f"{block}downsamplers.0.conv.", out, out, 3)

    rev = list(reversed(channels))
    rev_heads, rev_layers = list(reversed(heads)), list(reversed(layers))
    out = rev[0]
    for i in range(levels):
        prev, out = out, rev[i]
        inp = rev[min(i + 1, levels - 1)]
        count = rev_layers[i] + 1
        block = f"up_blocks.{i}."
        if up_attn[i]:
            for j in range(count):
                value = _layer_value(reverse_depth[i], j)
                _transformer(p, f"{block}attentions.{j}.", out, rev_heads[i], value, context, linear)
        for j in range(count):
            skip = inp if j == count - 1 else out
            _resnet(p, f"{block}resnets.{j}.", (prev if j == 0 else out) + skip, out, temb)
        if i < levels - 1:
            p.conv(f"{block}upsamplers.0.conv.", out, out, 3)

    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type == "UNetMidBlock2DCrossAttn":
        c = channels[-1]
        _transformer(p, "mid_block.attentions.0.", c, heads[-1], _layer_value(depth[-1], 0), context, linear)
        _resnet(p, "mid_block.resnets.0.", c, c, temb)
        _resnet(p, "mid_block.resnets.1.", c, c, temb)
    elif mid_type is not None:
        raise InputError(f"UNet config: unsupported mid_block_type {mid_type!r}")

    p.norm("conv_norm_out.", c0)
    p.conv("conv_out.", int(cfg["out_channels"]), c0, int(cfg.get("conv_out_kernel", 3)))
    return p.shapes


def _vae_mid(p: _Params, prefix: str, c: int, attention: bool) -> None:
    if attention:
        p.norm(prefix + "attentions.0.group_norm.", c)
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            p.linear(f"{prefix}attentions.0.{name}.", c, c)
    _resnet(p, prefix + "resnets.0.", c, c, None)
    _resnet(p, prefix + "resnets.1.", c, c, None)


def _vae_shapes(cfg: Mapping[str, Any]) -> dict[str, Shape]:
    """The parameters of ``diffusers.AutoencoderKL`` for a config."""
    p = _Params()
    channels = list(cfg["block_out_channels"])
    levels, layers = len(channels), int(cfg.get("layers_per_block", 2))
    latent = int(cfg.get("latent_channels", 4))
    attention = bool(cfg.get("mid_block_add_attention", True))
    p.conv("encoder.conv_in.", channels[0], int(cfg.get("in_channels", 3)), 3)
    out = channels[0]
    for i in range(levels):
        inp, out = out, channels[i]
        for j in range(layers):
            _resnet(p, f"encoder.down_blocks.{i}.resnets.{j}.", inp if j == 0 else out, out, None)
        if i < levels - 1:
            p.conv(f"encoder.down_blocks.{i}.downsamplers.0.conv.", out, out, 3)
    _vae_mid(p, "encoder.mid_block.", channels[-1], attention)
    p.norm("encoder.conv_norm_out.", channels[-1])
    p.conv("encoder.conv_out.", 2 * latent, channels[-1], 3)

    rev = list(reversed(channels))
    p.conv("decoder.conv_in.", rev[0], latent, 3)
    out = rev[0]
    for i in range(levels):
        prev, out = out, rev[i]
        for j in range(layers + 1):
            _resnet(p, f"decoder.up_blocks.{i}.resnets.{j}.", prev if j == 0 else out, out, None)
        if i < levels - 1:
            p.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv.", out, out, 3)
    _vae_mid(p, "decoder.mid_block.", rev[0], attention)
    p.norm("decoder.conv_norm_out.", channels[0])
    p.conv("decoder.conv_out.", int(cfg.get("out_channels", 3)), channels[0], 3)
    if cfg.get("use_quant_conv", True):
        p.conv("quant_conv.", 2 * latent, 2 * latent, 1)
    if cfg.get("use_post_quant_conv", True):
        p.conv("post_quant_conv.", latent, latent, 1)
    return p.shapes


def _text_shapes(cfg: Mapping[str, Any], projection: bool) -> dict[str, Shape]:
    """The parameters of ``transformers.CLIPTextModel`` (``WithProjection``), with the ``text_model.`` level."""
    p = _Params()
    hidden, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    p.add("text_model.embeddings.token_embedding.weight", int(cfg["vocab_size"]), hidden)
    p.add("text_model.embeddings.position_embedding.weight", int(cfg.get("max_position_embeddings", 77)), hidden)
    for n in range(int(cfg["num_hidden_layers"])):
        layer = f"text_model.encoder.layers.{n}."
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            p.linear(f"{layer}self_attn.{name}.", hidden, hidden)
        p.norm(layer + "layer_norm1.", hidden)
        p.linear(layer + "mlp.fc1.", inter, hidden)
        p.linear(layer + "mlp.fc2.", hidden, inter)
        p.norm(layer + "layer_norm2.", hidden)
    p.norm("text_model.final_layer_norm.", hidden)
    if projection:
        p.linear("text_projection.", int(cfg["projection_dim"]), hidden, bias=False)
    return p.shapes


def diffusers_shapes(component: str, config: Mapping[str, Any]) -> dict[str, Shape]:
    """diffusers / HF key -> shape of ``component`` built from ``config``, in registration order."""
    if component == "unet":
        return _unet_shapes(config)
    if component == "vae":
        return _vae_shapes(config)
    if component in ("text_encoder", "text_encoder_2"):
        return _text_shapes(config, projection=component == "text_encoder_2")
    raise InputError(f"unknown component {component!r}")


def sd_component_keys(component: str, config: Mapping[str, Any], sd_prefix: str) -> dict[str, ExpectedKey]:
    """The SD keys of one component for ``config`` (diffusers parameters mapped by the rule tables)."""
    shapes = diffusers_shapes(component, config)
    mapped = map_component_keys(component, shapes, config, sd_prefix)
    if mapped.unknown or mapped.missing:
        raise InputError(
            f"{component}: the rule tables do not cover this config ({(mapped.unknown + mapped.missing)[:3]})"
        )
    out = {
        t.name: ExpectedKey(TRANSFORMS[t.transform].shape([shapes[s] for s in t.sources]), "float")
        for t in mapped.targets
    }
    for name, generator in mapped.generated:
        shape, dtype = GENERATED_SHAPE[generator](config)
        out[name] = ExpectedKey(shape, dtype, required=False, why=OPTIONAL[generator])
    return out


def expected_keys(architecture: Architecture) -> dict[str, ExpectedKey]:
    """Every SD key a checkpoint of ``architecture`` holds, in SD order (UNet, text encoders, VAE)."""
    prefixes = SD_PREFIXES[architecture.structure]
    out: dict[str, ExpectedKey] = {}
    for component in SD_ORDER:
        if component in architecture.configs and component in prefixes:
            out.update(sd_component_keys(component, architecture.configs[component], prefixes[component]))
    if architecture.optional:
        for name, spec in out.items():
            if spec.required and name.startswith(architecture.optional):
                out[name] = ExpectedKey(spec.shape, spec.dtype, required=False, why=PRUNED_WHY)
    return out
