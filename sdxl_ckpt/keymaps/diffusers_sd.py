"""diffusers -> SD (sgm / "original") key names for the four SDXL components, as ordered rule tables.

A rule is (regex pattern -> replacement template, value transform). Each component's table is built from
two kinds of data:

* a BLOCK table: literal diffusers prefix -> literal SD prefix + the name of an INNER table. For the UNet and the
  VAE the block table is derived from the component's ``config.json`` (number of levels, ``layers_per_block``,
  which levels carry attention, transformer depths), so SDXL base, refiner and SDXL-shaped tiny models all work;
* INNER tables: the renames inside one block kind (resnet, transformer, VAE attention, text-encoder layer...).

Composing a block with its inner table gives a flat, ordered list of ``Rule`` whose patterns are full diffusers
keys; the first rule whose pattern fully matches a key decides it. A rule with ``replacement=None`` drops the key
and says why. Keys no rule matches are UNKNOWN: the caller refuses the conversion.

Transforms (values) are named here and defined in ``keymaps.transforms``.

The names were checked against diffusers' own single-file converters and mindone's published key lists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sdxl_ckpt.errors import InputError, KeyMismatchError
from sdxl_ckpt.keymaps.templates import expand_template
from sdxl_ckpt.keymaps.transforms import TRANSFORMS
from sdxl_ckpt.sdxl.variants import COND_PROJ_KEY, UNET_PREFIX

QKV_ORDER = ("q", "k", "v")

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

# SD prefix of each component, per architecture. The refiner has no CLIP-L: its OpenCLIP is embedder 0.
SD_PREFIXES: dict[str, dict[str, str]] = {
    "base": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
    "refiner": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder_2": "conditioner.embedders.0.model.",
    },
}

# Tensors the SD layout holds that diffusers folders do not: (key inside the component, generator name).
# The converter knows how to make each generator's value (position_ids: int64 arange; logit_scale: ln 100).
GENERATED: dict[str, tuple[tuple[str, str], ...]] = {
    "text_encoder": (("text_model.embeddings.position_ids", "position_ids"),),
    "text_encoder_2": (("logit_scale", "logit_scale"),),
}


@dataclass(frozen=True)
class Rule:
    """``pattern`` (full match on a diffusers key) -> ``replacement`` (``re`` template), or None = drop (``reason``)."""

    pattern: str
    replacement: str | None
    transform: str = "none"
    reason: str = ""
    literal: str = ""  # a prefix every matching key starts with (a fast pre-check; part of ``pattern``)

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}")

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)

    def apply(self, key: str) -> re.Match[str] | None:
        if not key.startswith(self.literal):
            return None
        return self.regex.fullmatch(key)


@dataclass(frozen=True)
class Block:
    """A literal diffusers prefix that becomes a literal SD prefix; ``inner`` names the table for the rest."""

    diffusers: str
    sd: str
    inner: str
    depth: int = 0  # transformer blocks inside (``transformer`` inner table only)


# --- INNER tables: pattern relative to the block prefix -> replacement relative to the SD block prefix -------------
# "{T}" is replaced by the allowed transformer-block indices of the block, "{L}" by the allowed layer indices.

_P = r"(?P<p>weight|bias)"

INNER: dict[str, tuple[Rule, ...]] = {
    # a plain parameterised layer (conv, linear, norm): the block prefix says everything
    "leaf": (Rule(_P, r"\g<p>"),),
    "leaf_no_bias": (Rule(r"weight", "weight"),),
    # diffusers ResnetBlock2D inside the UNet -> sgm ResBlock
    "unet_resnet": (
        Rule(r"norm1\." + _P, r"in_layers.0.\g<p>"),
        Rule(r"conv1\." + _P, r"in_layers.2.\g<p>"),
        Rule(r"time_emb_proj\." + _P, r"emb_layers.1.\g<p>"),
        Rule(r"norm2\." + _P, r"out_layers.0.\g<p>"),
        Rule(r"conv2\." + _P, r"out_layers.3.\g<p>"),
        Rule(r"conv_shortcut\." + _P, r"skip_connection.\g<p>"),
    ),
    # Transformer2DModel -> SpatialTransformer: the names are the same on both sides
    "transformer": (
        Rule(r"(?P<n>norm|proj_in|proj_out)\." + _P, r"\g<n>.\g<p>"),
        Rule(
            r"transformer_blocks\.(?P<t>{T})\.(?P<n>attn[12]\.to_(?:q|k|v|out\.0)|ff\.net\.0\.proj|ff\.net\.2"
            r"|norm[123])\." + _P,
            r"transformer_blocks.\g<t>.\g<n>.\g<p>",
        ),
    ),
    # diffusers ResnetBlock2D inside the VAE -> LDM ResnetBlock
    "vae_resnet": (
        Rule(r"(?P<n>norm1|conv1|norm2|conv2)\." + _P, r"\g<n>.\g<p>"),
        Rule(r"conv_shortcut\." + _P, r"nin_shortcut.\g<p>"),
    ),
    # VAE mid attention: Linear (C, C) in diffusers, Conv 1x1 in LDM; old diffusers names (query...) accepted too
    "vae_attention": (
        Rule(r"group_norm\." + _P, r"norm.\g<p>"),
        Rule(r"(?:to_q|query)\.weight", "q.weight", "conv1x1"),
        Rule(r"(?:to_q|query)\.bias", "q.bias"),
        Rule(r"(?:to_k|key)\.weight", "k.weight", "conv1x1"),
        Rule(r"(?:to_k|key)\.bias", "k.bias"),
        Rule(r"(?:to_v|value)\.weight", "v.weight", "conv1x1"),
        Rule(r"(?:to_v|value)\.bias", "v.bias"),
        Rule(r"(?:to_out\.0|proj_attn)\.weight", "proj_out.weight", "conv1x1"),
        Rule(r"(?:to_out\.0|proj_attn)\.bias", "proj_out.bias"),
    ),
    # HF CLIPTextModel (CLIP ViT-L): SD keeps the HF names under its prefix
    "clip_l": (
        Rule(r"(?P<k>text_model\.embeddings\.(?:token|position)_embedding\.weight)", r"\g<k>"),
        Rule(
            r"(?P<k>text_model\.encoder\.layers\.(?:{L})\.(?:self_attn\.(?:q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])"
            r"\.(?:weight|bias))",
            r"\g<k>",
        ),
        Rule(r"(?P<k>text_model\.final_layer_norm\.(?:weight|bias))", r"\g<k>"),
        Rule(
            r"text_model\.embeddings\.position_ids",
            None,
            reason="regenerated as int64 arange [1, max_position_embeddings] (the SD file always holds it)",
        ),
    ),
    # HF CLIPTextModelWithProjection (OpenCLIP ViT-bigG) -> open_clip names
    "openclip": (
        Rule(r"text_model\.embeddings\.token_embedding\.weight", "token_embedding.weight"),
        Rule(r"text_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
        Rule(
            r"text_model\.encoder\.layers\.(?P<n>{L})\.self_attn\.(?P<qkv>q|k|v)_proj\.(?P<p>weight|bias)",
            r"transformer.resblocks.\g<n>.attn.in_proj_\g<p>",
            "concat_qkv",
        ),
        Rule(
            r"text_model\.encoder\.layers\.(?P<n>{L})\.self_attn\.out_proj\." + _P,
            r"transformer.resblocks.\g<n>.attn.out_proj.\g<p>",
        ),
        Rule(
            r"text_model\.encoder\.layers\.(?P<n>{L})\.layer_norm(?P<i>[12])\." + _P,
            r"transformer.resblocks.\g<n>.ln_\g<i>.\g<p>",
        ),
        Rule(
            r"text_model\.encoder\.layers\.(?P<n>{L})\.mlp\.fc1\." + _P, r"transformer.resblocks.\g<n>.mlp.c_fc.\g<p>"
        ),
        Rule(
            r"text_model\.encoder\.layers\.(?P<n>{L})\.mlp\.fc2\." + _P, r"transformer.resblocks.\g<n>.mlp.c_proj.\g<p>"
        ),
        Rule(r"text_model\.final_layer_norm\." + _P, r"ln_final.\g<p>"),
        Rule(r"text_projection\.weight", "text_projection", "transpose"),
        Rule(
            r"text_model\.embeddings\.position_ids",
            None,
            reason="OpenCLIP has no position_ids in the SD layout (a buffer old transformers saved); not written",
        ),
    ),
}

# SD keys (relative to the SD block prefix) each block kind MUST have: a component missing one is incomplete.
# Optional tensors (conv_shortcut, q/k/v biases) are left out. "{T}" / "{L}" expand over the block's
# transformer blocks / the encoder's layers.
_WB = ("weight", "bias")
_TB = tuple(
    f"transformer_blocks.{{T}}.{n}.weight"
    for n in (
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
        "norm1",
        "norm2",
        "norm3",
    )
) + tuple(
    f"transformer_blocks.{{T}}.{n}.bias"
    for n in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3")
)
_CLIP_LAYER = tuple(
    f"text_model.encoder.layers.{{L}}.{n}.{p}"
    for n in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm1",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    )
    for p in _WB
)
_OPENCLIP_LAYER = tuple(
    f"transformer.resblocks.{{L}}.{n}"
    for n in (
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_1.weight",
        "ln_1.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    )
)
REQUIRED: dict[str, tuple[str, ...]] = {
    "leaf": _WB,
    "leaf_no_bias": ("weight",),
    "unet_resnet": tuple(
        f"{n}.{p}" for n in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3") for p in _WB
    ),
    "transformer": tuple(f"{n}.{p}" for n in ("norm", "proj_in", "proj_out") for p in _WB) + _TB,
    "vae_resnet": tuple(f"{n}.{p}" for n in ("norm1", "conv1", "norm2", "conv2") for p in _WB),
    "vae_attention": tuple(f"{n}.{p}" for n in ("norm", "q", "k", "v", "proj_out") for p in _WB),
    "clip_l": (
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
    )
    + _CLIP_LAYER,
    "openclip": (
        "token_embedding.weight",
        "positional_embedding",
        "ln_final.weight",
        "ln_final.bias",
        "text_projection",
    )
    + _OPENCLIP_LAYER,
}

# --- BLOCK tables ----------------------------------------------------------------------------------------------------

UNET_TOP: tuple[Block, ...] = (
    Block("time_embedding.linear_1.", "time_embed.0.", "leaf"),
    Block("time_embedding.linear_2.", "time_embed.2.", "leaf"),
    Block("conv_in.", "input_blocks.0.0.", "leaf"),
    Block("conv_norm_out.", "out.0.", "leaf"),
    Block("conv_out.", "out.2.", "leaf"),
)
UNET_TEXT_TIME: tuple[Block, ...] = (  # addition_embed_type == "text_time" (SDXL's size/crop conditioning)
    Block("add_embedding.linear_1.", "label_emb.0.0.", "leaf"),
    Block("add_embedding.linear_2.", "label_emb.0.2.", "leaf"),
)
# guidance-embedded LCM UNets (config time_cond_proj_dim): nn.Linear without bias; the SD name is this project's
UNET_COND_PROJ: tuple[Block, ...] = (
    Block("time_embedding.cond_proj.", COND_PROJ_KEY.removeprefix(UNET_PREFIX).removesuffix("weight"), "leaf_no_bias"),
)

VAE_TOP: tuple[Block, ...] = tuple(
    Block(f"{part}.{d}.", f"{part}.{s}.", "leaf")
    for part in ("encoder", "decoder")
    for d, s in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out"))
) + (Block("quant_conv.", "quant_conv.", "leaf"), Block("post_quant_conv.", "post_quant_conv.", "leaf"))

TEXT_ENCODER_INNER = {"text_encoder": "clip_l", "text_encoder_2": "openclip"}

_UNET_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UNET_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}


def _per_level(value: Any, levels: int, what: str) -> list[Any]:
    """An int applies to every level; a list must have one entry per level."""
    if isinstance(value, int):
        return [value] * levels
    if isinstance(value, Sequence) and len(value) == levels:
        return list(value)
    raise InputError(f"UNet config: {what} must be an int or a list of {levels}, got {value!r}")


def _depth(level_value: Any, j: int) -> int:
    """Transformer depth of layer ``j``: an int per level, or a list per layer (e.g. SSD-1B)."""
    return int(level_value[j]) if isinstance(level_value, Sequence) else int(level_value)


def _block_types(config: Mapping[str, Any], key: str, known: Mapping[str, bool]) -> list[bool]:
    types = config.get(key)
    if not isinstance(types, Sequence) or not types:
        raise InputError(f"UNet config: {key} is missing")
    unknown = [t for t in types if t not in known]
    if unknown:
        raise InputError(f"UNet config: unsupported {key} {unknown} (SDXL uses {sorted(known)})")
    return [known[t] for t in types]


def unet_blocks(config: Mapping[str, Any]) -> list[Block]:
    """The UNet block table, derived from a diffusers ``UNet2DConditionModel`` config.

    sgm numbers ``input_blocks`` consecutively over every level's resnets and the downsampler that ends each level
    but the last; ``output_blocks`` likewise over the up levels (``layers_per_block + 1`` resnets each), with the
    upsampler inside the level's last output block (after the attention when the level has one).
    """
    down_attn = _block_types(config, "down_block_types", _UNET_DOWN_TYPES)
    up_attn = _block_types(config, "up_block_types", _UNET_UP_TYPES)
    levels = len(down_attn)
    if len(up_attn) != levels:
        raise InputError("UNet config: down_block_types and up_block_types differ in length")
    layers = _per_level(config.get("layers_per_block", 2), levels, "layers_per_block")
    depth = _per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    reverse_depth = config.get("reverse_transformer_layers_per_block") or list(reversed(depth))
    reverse_depth = _per_level(reverse_depth, levels, "reverse_transformer_layers_per_block")
    reverse_layers = list(reversed(layers))

    blocks = list(UNET_TOP)
    if config.get("addition_embed_type") == "text_time":
        blocks += UNET_TEXT_TIME
    if config.get("time_cond_proj_dim"):
        blocks += UNET_COND_PROJ

    index = 1
    for i in range(levels):
        for j in range(layers[i]):
            blocks.append(Block(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", "unet_resnet"))
            if down_attn[i]:
                blocks.append(
                    Block(
                        f"down_blocks.{i}.attentions.{j}.",
                        f"input_blocks.{index}.1.",
                        "transformer",
                        _depth(depth[i], j),
                    )
                )
            index += 1
        if i < levels - 1:
            blocks.append(Block(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", "leaf"))
            index += 1

    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type == "UNetMidBlock2DCrossAttn":
        blocks += [
            Block("mid_block.resnets.0.", "middle_block.0.", "unet_resnet"),
            Block("mid_block.attentions.0.", "middle_block.1.", "transformer", _depth(depth[-1], 0)),
            Block("mid_block.resnets.1.", "middle_block.2.", "unet_resnet"),
        ]
    elif mid_type is not None:
        raise InputError(f"UNet config: unsupported mid_block_type {mid_type!r}")

    index = 0
    for i in range(levels):
        count = reverse_layers[i] + 1
        for j in range(count):
            blocks.append(Block(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0.", "unet_resnet"))
            if up_attn[i]:
                blocks.append(
                    Block(
                        f"up_blocks.{i}.attentions.{j}.",
                        f"output_blocks.{index}.1.",
                        "transformer",
                        _depth(reverse_depth[i], j),
                    )
                )
            if j == count - 1 and i < levels - 1:
                slot = 2 if up_attn[i] else 1
                blocks.append(Block(f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{index}.{slot}.conv.", "leaf"))
            index += 1
    return blocks


def vae_blocks(config: Mapping[str, Any]) -> list[Block]:
    """The VAE block table, derived from a diffusers ``AutoencoderKL`` config.

    The encoder has ``layers_per_block`` resnets per level, the decoder one more; LDM numbers the decoder's
    ``up`` levels in reverse (diffusers ``up_blocks.0`` is LDM ``up.{levels-1}``).
    """
    channels = config.get("block_out_channels")
    if not isinstance(channels, Sequence) or not channels:
        raise InputError("VAE config: block_out_channels is missing")
    levels = len(channels)
    layers = int(config.get("layers_per_block", 2))
    blocks = list(VAE_TOP)
    for i in range(levels):
        for j in range(layers):
            blocks.append(Block(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", "vae_resnet"))
        if i < levels - 1:
            blocks.append(
                Block(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", "leaf")
            )
    for i in range(levels):
        ldm = levels - 1 - i
        for j in range(layers + 1):
            blocks.append(Block(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{ldm}.block.{j}.", "vae_resnet"))
        if i < levels - 1:
            blocks.append(
                Block(f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{ldm}.upsample.conv.", "leaf")
            )
    for part in ("encoder", "decoder"):
        blocks.append(Block(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", "vae_resnet"))
        if config.get("mid_block_add_attention", True):
            blocks.append(Block(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", "vae_attention"))
        blocks.append(Block(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", "vae_resnet"))
    return blocks


def _indices(n: int) -> str:
    """A regex alternation of 0..n-1, longest first so that a full match never needs backtracking."""
    if n <= 0:
        return r"(?!)"  # matches nothing
    return "|".join(str(i) for i in sorted(range(n), reverse=True))


def compose(blocks: Iterable[Block], sd_prefix: str, inner: Mapping[str, Sequence[Rule]] = INNER) -> list[Rule]:
    """Flatten blocks x inner tables into full-key rules (pattern = escaped block prefix + inner pattern)."""
    rules = []
    for block in blocks:
        for rule in inner[block.inner]:
            pattern = rule.pattern.replace("{T}", _indices(block.depth))
            replacement = None if rule.replacement is None else sd_prefix + block.sd + rule.replacement
            rules.append(
                Rule(
                    re.escape(block.diffusers) + pattern,
                    replacement,
                    rule.transform,
                    rule.reason,
                    literal=block.diffusers,
                )
            )
    return rules


def _layers(component: str, config: Mapping[str, Any]) -> int:
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or layers <= 0:
        raise InputError(f"{component} config: num_hidden_layers is missing")
    return layers


def _text_rules(component: str, config: Mapping[str, Any], sd_prefix: str) -> list[Rule]:
    layers = _layers(component, config)
    rules = []
    for rule in INNER[TEXT_ENCODER_INNER[component]]:
        replacement = None if rule.replacement is None else sd_prefix + rule.replacement
        rules.append(Rule(rule.pattern.replace("{L}", _indices(layers)), replacement, rule.transform, rule.reason))
    return rules


def component_rules(component: str, config: Mapping[str, Any], sd_prefix: str) -> list[Rule]:
    """The ordered, flat rule table of one component for this config, producing keys under ``sd_prefix``."""
    if component == "unet":
        return compose(unet_blocks(config), sd_prefix)
    if component == "vae":
        return compose(vae_blocks(config), sd_prefix)
    if component in TEXT_ENCODER_INNER:
        return _text_rules(component, config, sd_prefix)
    raise InputError(f"unknown component {component!r} (expected one of {', '.join(COMPONENTS)})")


def _expand(template: str, sd_prefix: str, placeholder: str, count: int) -> list[str]:
    if placeholder in template:
        return [sd_prefix + template.replace(placeholder, str(i)) for i in range(count)]
    return [sd_prefix + template]


def expected_sd_keys(component: str, config: Mapping[str, Any], sd_prefix: str) -> list[str]:
    """The SD keys this component must produce for this config (``REQUIRED``; optional tensors not included)."""
    if component in ("unet", "vae"):
        blocks = unet_blocks(config) if component == "unet" else vae_blocks(config)
        return [
            key for b in blocks for rel in REQUIRED[b.inner] for key in _expand(rel, sd_prefix + b.sd, "{T}", b.depth)
        ]
    if component in TEXT_ENCODER_INNER:
        layers = _layers(component, config)
        return [
            key for rel in REQUIRED[TEXT_ENCODER_INNER[component]] for key in _expand(rel, sd_prefix, "{L}", layers)
        ]
    raise InputError(f"unknown component {component!r} (expected one of {', '.join(COMPONENTS)})")


@dataclass(frozen=True)
class Target:
    """One SD tensor: its name, the diffusers keys it is made of (q, k, v order for concat_qkv), the transform."""

    name: str
    sources: tuple[str, ...]
    transform: str


@dataclass
class ComponentMap:
    """Every diffusers key of a component accounted for: mapped into ``targets``, ``dropped`` (with a reason),
    or ``unknown`` (the caller refuses the conversion). ``generated`` = (SD key, generator) the converter adds;
    ``missing`` = required SD keys no source key gave (an incomplete component; the caller refuses it)."""

    component: str
    targets: list[Target] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    generated: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


class _RuleBuckets:
    """A rule table split by the first two dotted parts of each rule's literal prefix, order kept.

    A key can only match rules whose literal it starts with, so it needs only the rules of its own two-part head
    plus those whose literal is shorter than two parts; tried in table order, the first match is the same as a
    scan of the whole table (which costs ~25 tries per key on the UNet's ~300 rules).
    """

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)
        self._by_head: dict[str, list[Rule]] = {}
        self._short = [i for i, r in enumerate(self.rules) if r.literal.count(".") < 2]
        self._indexed: dict[str, list[int]] = {}
        for i, rule in enumerate(self.rules):
            if rule.literal.count(".") >= 2:
                self._indexed.setdefault(_head(rule.literal), []).append(i)

    def for_key(self, key: str) -> list[Rule]:
        head = _head(key)
        found = self._by_head.get(head)
        if found is None:
            order = sorted(self._short + self._indexed.get(head, []))
            found = self._by_head[head] = [self.rules[i] for i in order]
        return found


def _head(name: str) -> str:
    """The first two dotted parts of ``name`` (``down_blocks.1``), or "" when it has fewer."""
    parts = name.split(".", 2)
    return ".".join(parts[:2]) if len(parts) > 2 else ""


def map_component_keys(
    component: str,
    keys: Iterable[str],
    config: Mapping[str, Any],
    sd_prefix: str,
    *,
    source_of: Mapping[str, str] | None = None,
) -> ComponentMap:
    """Map one component's diffusers keys to SD keys (names only; no tensor is read).

    Raises ``KeyMismatchError`` when a concat_qkv target lacks one of q, k, v or when two keys would give the same
    SD name; ``source_of`` (key -> file) only improves those messages.
    """
    candidates = _RuleBuckets(component_rules(component, config, sd_prefix))
    result = ComponentMap(component)
    qkv: dict[str, dict[str, str]] = {}
    order: dict[str, Target | None] = {}  # SD name -> target (None while a concat is being collected)
    claimed: dict[str, str] = {}
    for key in keys:
        for rule in candidates.for_key(key):
            match = rule.apply(key)
            if match is None:
                continue
            if rule.replacement is None:
                result.dropped[key] = rule.reason
                break
            name = expand_template(match, rule.replacement)
            if rule.transform == "concat_qkv":
                parts = qkv.setdefault(name, {})
                part = match.group("qkv")
                if part in parts:
                    raise KeyMismatchError(
                        f"two keys give the {part} part of {name!r}: {parts[part]!r}",
                        path=(source_of or {}).get(key),
                        key=key,
                    )
                parts[part] = key
                order.setdefault(name, None)
            else:
                if name in claimed:
                    raise KeyMismatchError(
                        f"{claimed[name]!r} already gives SD key {name!r}", path=(source_of or {}).get(key), key=key
                    )
                claimed[name] = key
                order[name] = Target(name, (key,), rule.transform)
            break
        else:
            result.unknown.append(key)
    for name, target in order.items():
        if target is None:
            parts = qkv[name]
            missing = [p for p in QKV_ORDER if p not in parts]
            if missing:
                some = next(iter(parts.values()))
                raise KeyMismatchError(
                    f"{name!r} needs q, k and v; missing {', '.join(missing)}",
                    path=(source_of or {}).get(some),
                    key=some,
                )
            target = Target(name, tuple(parts[p] for p in QKV_ORDER), "concat_qkv")
        result.targets.append(target)
    result.generated = [(sd_prefix + key, generator) for key, generator in GENERATED.get(component, ())]
    produced = {t.name for t in result.targets}
    result.missing = [k for k in expected_sd_keys(component, config, sd_prefix) if k not in produced]
    return result
