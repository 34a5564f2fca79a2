"""The architecture of an SDXL-family checkpoint, read from its tensor names and shapes alone.

Every width and depth is in the weights: conv and linear shapes give the channels, the block indices give the
levels and layers, the count of ``transformer_blocks`` gives each transformer's depth (0 included, as in
distilled UNets such as SSD-1B and Segmind Vega). What shapes cannot tell (head counts, activation, sample size,
VAE scaling) comes from the file's ``sdxl_ckpt.config.<component>`` metadata when it has it, else from the SDXL
convention (64-channel heads; the official config values otherwise); ``Architecture.provenance`` says which.

The names are SD (sgm) names; MindSpore names are accepted too: they differ only in the norm ``gamma`` /
``beta`` and the embedding ``embedding_table`` suffixes. Nothing here reads a tensor value or imports torch.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.sdxl.configs import FULL_CONFIGS, SCHEDULER_CONFIG
from sdxl_ckpt.sdxl.variants import (
    COND_PROJ_KEY,
    MARKERS,
    PLAYGROUND_VAE_SCALING,
    TIME_IDS,
    Detection,
    detect_variant,
    scheduler_for,
    structure_from_keys,
)

Shapes = Mapping[str, tuple[int, ...]]

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "conditioner.embedders.0.transformer.text_model."
OPENCLIP = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
CONFIG_METADATA = "sdxl_ckpt.config."
HEAD_CHANNELS = 64  # SDXL's attention heads are 64 channels wide in the UNet and both text encoders
CONVENTION = "SDXL convention"
WEIGHTS = "weights"
METADATA = "metadata"

_MS_SUFFIX = re.compile(r"\.(gamma|beta|embedding_table)$")
_MS_TO_SD = {"gamma": "weight", "beta": "bias", "embedding_table": "weight"}


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint is: its variant, key structure, the diffusers configs of its components, and why.

    ``configs`` holds diffusers ``config.json`` dicts for the components present (``unet``, ``vae``,
    ``text_encoder`` for base-structured models, ``text_encoder_2``); ``provenance`` maps ``component.field`` to
    ``weights``, ``metadata`` or the convention used, for every field the shapes did not decide.
    The defaulted fields say more about a file read from disk: the detection, its marker tensors, and what it may
    lack without being incomplete.
    """

    variant: str
    structure: str
    configs: dict[str, dict[str, Any]]
    scheduler: dict[str, Any]
    provenance: dict[str, str]
    detection: Detection | None = None  # why this variant (None when built by hand)
    markers: frozenset[str] = frozenset()  # marker tensors present (sdxl.variants.MARKERS)
    optional: tuple[str, ...] = ()  # SD key prefixes this file may lack (pruned text-encoder layers)


def sd_name(name: str) -> str:
    """The SD name of an SD or MindSpore tensor name (``gamma``/``beta``/``embedding_table`` -> ``weight``/``bias``)."""
    return _MS_SUFFIX.sub(lambda m: "." + _MS_TO_SD[m.group(1)], name)


def sd_names(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    """The same shapes under SD names."""
    return {sd_name(name): tuple(shape) for name, shape in shapes.items()}


HEAD_FIELDS = ("unet.attention_head_dim", "text_encoder.num_attention_heads", "text_encoder_2.num_attention_heads")


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """The sorted integer path components that follow ``prefix`` in any key."""
    found = set()
    for name in shapes:
        if name.startswith(prefix):
            head = name[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _shape(shapes: Shapes, key: str, path: object) -> tuple[int, ...]:
    if key not in shapes:
        raise InputError(f"incomplete SDXL checkpoint: no {key!r}", path=path)
    return shapes[key]


def _declared(metadata: Mapping[str, str], component: str, path: object) -> dict[str, Any]:
    text = metadata.get(CONFIG_METADATA + component)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise InputError(f"metadata {CONFIG_METADATA + component} is not JSON", path=path) from None
    if not isinstance(value, dict):
        raise InputError(f"metadata {CONFIG_METADATA + component} is not a JSON object", path=path)
    return value


class _Builder:
    """One component's config: starts from the SDXL template; weights, then metadata, then convention decide."""

    def __init__(self, component: str, template: Mapping[str, Any], declared: Mapping[str, Any]) -> None:
        self.component = component
        self.config = copy.deepcopy(dict(template))
        self.declared = declared
        self.provenance: dict[str, str] = {}
        for key in self.config:
            if key in declared:
                self.config[key] = copy.deepcopy(declared[key])
                self.provenance[f"{component}.{key}"] = METADATA
            else:
                self.provenance[f"{component}.{key}"] = f"{CONVENTION} (the official config's value)"

    def weights(self, key: str, value: Any, why: str = WEIGHTS) -> None:
        self.config[key] = value
        self.provenance[f"{self.component}.{key}"] = why

    def guess(self, key: str, value: Any, why: str) -> None:
        """A value the shapes cannot tell: metadata wins, else ``value`` with ``why`` as provenance."""
        if key in self.declared:
            self.config[key] = copy.deepcopy(self.declared[key])
            self.provenance[f"{self.component}.{key}"] = METADATA
        else:
            self.config[key] = value
            self.provenance[f"{self.component}.{key}"] = why


def heads_for(channels: int) -> int:
    """The SDXL head count of a width: 64-channel heads, or one head when 64 does not divide it."""
    return channels // HEAD_CHANNELS if channels % HEAD_CHANNELS == 0 else 1


def _collapse(values: list[Any]) -> Any:
    """One value when every level has the same one (diffusers accepts an int for all levels), else the list."""
    return values[0] if all(v == values[0] for v in values) else values


# --- UNet -------------------------------------------------------------------------------------------------------------


@dataclass
class _Level:
    channels: int
    attention: bool
    depths: list[int]  # transformer depth per layer (attention levels only)


def _depth(shapes: Shapes, prefix: str) -> int:
    return len(_indices(shapes, prefix + "transformer_blocks."))


def _down_levels(shapes: Shapes, path: object) -> list[_Level]:
    levels: list[_Level] = []
    current: _Level | None = None
    for index in _indices(shapes, UNET + "input_blocks."):
        if index == 0:
            continue
        block = f"{UNET}input_blocks.{index}."
        if any(n.startswith(block + "0.op.") for n in shapes):  # the downsampler that ends a level
            if current is None:
                raise InputError(f"UNet: downsampler {block}0.op with no resnet before it", path=path)
            levels.append(current)
            current = None
            continue
        channels = _shape(shapes, block + "0.out_layers.3.weight", path)[0]
        attention = block + "1.proj_in.weight" in shapes
        if current is None:
            current = _Level(channels, attention, [])
        current.depths.append(_depth(shapes, block + "1.") if attention else 0)
    if current is None:
        raise InputError("UNet: no input block after the last downsampler", path=path)
    levels.append(current)
    return levels


def _up_levels(shapes: Shapes, down: list[_Level], path: object) -> list[list[tuple[bool, int]]]:
    """Per up level, per layer: (has attention, transformer depth).

    diffusers mirrors the down path: up level ``i`` has one more layer than down level ``levels-1-i``, so the
    output blocks are grouped by that count, not by where an upsampler is found (a missing one is then a
    missing key, not another architecture).
    """
    counts = [len(level.depths) + 1 for level in reversed(down)]
    found = _indices(shapes, UNET + "output_blocks.")
    if found != list(range(sum(counts))):
        raise InputError(
            f"UNet: output blocks {found[:1]}..{found[-1:]} ({len(found)}), but {len(down)} down levels with "
            f"{[len(lv.depths) for lv in down]} layers need output_blocks.0..{sum(counts) - 1}",
            path=path,
        )
    levels: list[list[tuple[bool, int]]] = []
    index = 0
    for count in counts:
        level = []
        for _ in range(count):
            block = f"{UNET}output_blocks.{index}."
            attention = block + "1.proj_in.weight" in shapes
            level.append((attention, _depth(shapes, block + "1.") if attention else 0))
            index += 1
        levels.append(level)
    return levels


def _first_cross_attention(shapes: Shapes) -> tuple[int, ...] | None:
    for name, shape in shapes.items():
        if name.startswith(UNET) and name.endswith(".attn2.to_k.weight"):
            return shape
    return None


def _unet(
    shapes: Shapes, structure: str, declared: Mapping[str, Any], pooled: int | None, context: int | None, path: object
) -> tuple[dict[str, Any], dict[str, str]]:
    b = _Builder("unet", FULL_CONFIGS[structure]["unet"], declared)
    conv_in = _shape(shapes, UNET + "input_blocks.0.0.weight", path)
    conv_out = _shape(shapes, UNET + "out.2.weight", path)
    time_embed = _shape(shapes, UNET + "time_embed.0.weight", path)
    down = _down_levels(shapes, path)
    up = _up_levels(shapes, down, path)
    channels = [level.channels for level in down]
    b.weights("in_channels", conv_in[1])
    b.weights("out_channels", conv_out[0])
    b.weights("conv_in_kernel", conv_in[2])
    b.weights("conv_out_kernel", conv_out[2])
    b.weights("block_out_channels", channels)
    b.weights("layers_per_block", _collapse([len(level.depths) for level in down]))
    b.weights("down_block_types", ["CrossAttnDownBlock2D" if lv.attention else "DownBlock2D" for lv in down])
    b.weights("up_block_types", ["CrossAttnUpBlock2D" if any(a for a, _d in lv) else "UpBlock2D" for lv in up])
    b.weights("time_embedding_dim", None if time_embed[0] == 4 * channels[0] else time_embed[0])

    mid = UNET + "middle_block."
    if mid + "1.proj_in.weight" in shapes:
        b.weights("mid_block_type", "UNetMidBlock2DCrossAttn")
        mid_depth = _depth(shapes, mid + "1.")
    elif mid + "0.in_layers.0.weight" in shapes:
        raise InputError("UNet: a middle block without attention is not an SDXL UNet", path=path)
    else:
        b.weights("mid_block_type", None)
        mid_depth = None

    # transformer depths: one int when every attention level (and the mid block) has the same, else per level,
    # with the non-attention levels at 1 (diffusers ignores them) except the last, whose entry is the mid depth
    per_level: list[Any] = []
    for i, level in enumerate(down):
        if level.attention:
            per_level.append(_collapse(level.depths))
        elif i == len(down) - 1 and mid_depth is not None:
            per_level.append(mid_depth)
        else:
            per_level.append(1)
    attention_values = [v for lv, v in zip(down, per_level) if lv.attention] + (
        [mid_depth] if mid_depth is not None else []
    )
    uniform = bool(attention_values) and all(v == attention_values[0] for v in attention_values)
    if uniform and isinstance(attention_values[0], int):
        depth_config: Any = attention_values[0]
    else:
        depth_config = per_level
        if mid_depth is not None and _first(per_level[-1]) != mid_depth:
            raise InputError(
                f"UNet: the mid block has {mid_depth} transformer blocks and the last level "
                f"{per_level[-1]}: diffusers cannot express it",
                path=path,
            )
    b.weights("transformer_layers_per_block", depth_config)
    # the up levels mirror the down levels unless they do not (distilled UNets): then diffusers needs them spelled out
    mirrored = list(reversed(_levels_of(depth_config, len(down))))
    actual = [[d if a else None for a, d in lv] for lv in up]
    if any(isinstance(m, list) or any(d is not None and d != m for d in level) for m, level in zip(mirrored, actual)):
        b.weights(
            "reverse_transformer_layers_per_block",
            [[d if d is not None else 1 for d in level] for level in actual],
        )

    if UNET + "label_emb.0.0.weight" in shapes:
        adm = _shape(shapes, UNET + "label_emb.0.0.weight", path)[1]
        b.weights("addition_embed_type", "text_time")
        b.weights("projection_class_embeddings_input_dim", adm)
        ids = TIME_IDS[structure]
        if pooled is not None and (adm - pooled) > 0 and (adm - pooled) % ids == 0:
            b.weights(
                "addition_time_embed_dim",
                (adm - pooled) // ids,
                f"{WEIGHTS} (added-conditioning width {adm} - pooled text width {pooled}) / {ids} time ids",
            )
        else:
            raise InputError(
                f"UNet added conditioning is {adm} wide ({UNET}label_emb.0.0.weight), which is not the pooled text "
                f"width {pooled} (text_projection) plus {ids} equal time-id embeddings: not an SDXL {structure}",
                path=path,
            )
    else:
        raise InputError("UNet: no label_emb (SDXL's size/crop conditioning): not an SDXL UNet", path=path)

    cond_proj = shapes.get(COND_PROJ_KEY)
    b.weights("time_cond_proj_dim", cond_proj[1] if cond_proj else None)
    proj_in = next((s for n, s in shapes.items() if n.startswith(UNET) and n.endswith(".proj_in.weight")), None)
    if proj_in is not None:
        b.weights("use_linear_projection", len(proj_in) == 2)
    cross = _first_cross_attention(shapes)
    if cross is not None:
        if context is not None and cross[1] != context:
            raise InputError(
                f"UNet cross-attention reads {cross[1]} channels but the text encoders give {context}: "
                "UNet and text encoders do not belong together",
                path=path,
            )
        b.weights("cross_attention_dim", cross[1])
    elif context is not None:
        b.weights("cross_attention_dim", context, f"{WEIGHTS} (the text encoders' widths together)")
    b.guess(
        "attention_head_dim",
        [heads_for(c) for c in channels],
        f"{CONVENTION} ({HEAD_CHANNELS}-channel heads)",
    )
    heads = b.config["attention_head_dim"]
    per_level = heads if isinstance(heads, list) else [heads] * len(channels)
    if len(per_level) != len(channels) or any(not isinstance(h, int) or c % h for h, c in zip(per_level, channels)):
        b.weights(
            "attention_head_dim", [heads_for(c) for c in channels], f"{CONVENTION} ({HEAD_CHANNELS}-channel heads)"
        )
    return b.config, b.provenance


def _first(value: Any) -> int:
    return int(value[0]) if isinstance(value, list) else int(value)


def _levels_of(depth: Any, levels: int) -> list[Any]:
    return [depth] * levels if isinstance(depth, int) else list(depth)


# --- VAE --------------------------------------------------------------------------------------------------------------


def _vae(shapes: Shapes, declared: Mapping[str, Any], path: object) -> tuple[dict[str, Any], dict[str, str]]:
    b = _Builder("vae", FULL_CONFIGS["base"]["vae"], declared)
    down = _indices(shapes, VAE + "encoder.down.")
    if not down:
        raise InputError("VAE: no encoder.down levels", path=path)
    channels = [_shape(shapes, f"{VAE}encoder.down.{i}.block.0.conv2.weight", path)[0] for i in down]
    conv_in = _shape(shapes, VAE + "encoder.conv_in.weight", path)
    b.weights("in_channels", conv_in[1])
    b.weights("out_channels", _shape(shapes, VAE + "decoder.conv_out.weight", path)[0])
    b.weights("block_out_channels", channels)
    b.weights("layers_per_block", len(_indices(shapes, VAE + "encoder.down.0.block.")))
    b.weights("latent_channels", _shape(shapes, VAE + "decoder.conv_in.weight", path)[1])
    b.weights("down_block_types", ["DownEncoderBlock2D"] * len(channels))
    b.weights("up_block_types", ["UpDecoderBlock2D"] * len(channels))
    attention = any(n.startswith(VAE + "encoder.mid.attn_1.") for n in shapes)
    if not attention:
        b.weights("mid_block_add_attention", False)
    if VAE + "quant_conv.weight" not in shapes:
        b.weights("use_quant_conv", False)
    if VAE + "post_quant_conv.weight" not in shapes:
        b.weights("use_post_quant_conv", False)
    return b.config, b.provenance


# --- text encoders ----------------------------------------------------------------------------------------------------


def _text_common(b: _Builder, hidden: int, vocab: int, positions: int, layers: int, intermediate: int) -> int:
    """Fill the widths and depth; returns how many last layers the file lacks (pruned), by metadata or convention."""
    official = FULL_CONFIGS["base"][b.component]
    b.weights("hidden_size", hidden)
    b.weights("vocab_size", vocab)
    b.weights("max_position_embeddings", positions)
    b.weights("intermediate_size", intermediate)
    declared_layers = b.declared.get("num_hidden_layers")
    pruned = 0
    if isinstance(declared_layers, int) and declared_layers > layers:
        pruned = declared_layers - layers
        b.weights("num_hidden_layers", declared_layers, f"{METADATA} (the file holds {layers}: last layers pruned)")
    elif not b.declared and hidden == official["hidden_size"] and layers == official["num_hidden_layers"] - 1:
        pruned = 1
        b.weights(
            "num_hidden_layers",
            official["num_hidden_layers"],
            f"{CONVENTION} (the file holds {layers} of {official['num_hidden_layers']} layers: the last is pruned)",
        )
    else:
        b.weights("num_hidden_layers", layers)
    b.guess("num_attention_heads", heads_for(hidden), f"{CONVENTION} ({HEAD_CHANNELS}-channel heads)")
    heads = b.config["num_attention_heads"]
    if not isinstance(heads, int) or heads <= 0 or hidden % heads:
        b.weights("num_attention_heads", heads_for(hidden), f"{CONVENTION} ({HEAD_CHANNELS}-channel heads)")
    return pruned


def _clip_l(
    shapes: Shapes, declared: Mapping[str, Any], path: object, optional: list[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """CLIP-L; its last layer(s) and final norm may be pruned (SDXL reads the penultimate layer, never the norm)."""
    b = _Builder("text_encoder", FULL_CONFIGS["base"]["text_encoder"], declared)
    token = _shape(shapes, CLIP_L + "embeddings.token_embedding.weight", path)
    layers = _indices(shapes, CLIP_L + "encoder.layers.")
    if not layers:
        raise InputError("CLIP-L: no encoder layers", path=path)
    pruned = _text_common(
        b,
        hidden=token[1],
        vocab=token[0],
        positions=_shape(shapes, CLIP_L + "embeddings.position_embedding.weight", path)[0],
        layers=layers[-1] + 1,
        intermediate=_shape(shapes, f"{CLIP_L}encoder.layers.0.mlp.fc1.weight", path)[0],
    )
    b.guess("projection_dim", token[1], f"{CONVENTION} (CLIP-L keeps no projection: its width)")
    total = b.config["num_hidden_layers"]
    optional += [f"{CLIP_L}encoder.layers.{i}." for i in range(total - pruned, total)]
    if pruned or CLIP_L + "final_layer_norm.weight" not in shapes:
        optional.append(CLIP_L + "final_layer_norm.")
    return b.config, b.provenance


def _openclip(
    shapes: Shapes, prefix: str, declared: Mapping[str, Any], path: object
) -> tuple[dict[str, Any], dict[str, str]]:
    b = _Builder("text_encoder_2", FULL_CONFIGS["base"]["text_encoder_2"], declared)
    token = _shape(shapes, prefix + "token_embedding.weight", path)
    layers = _indices(shapes, prefix + "transformer.resblocks.")
    if not layers:
        raise InputError("OpenCLIP: no transformer blocks", path=path)
    pruned = _text_common(
        b,
        hidden=token[1],
        vocab=token[0],
        positions=_shape(shapes, prefix + "positional_embedding", path)[0],
        layers=layers[-1] + 1,
        intermediate=_shape(shapes, f"{prefix}transformer.resblocks.0.mlp.c_fc.weight", path)[0],
    )
    b.weights("projection_dim", _shape(shapes, prefix + "text_projection", path)[1])
    if pruned:
        raise InputError(
            f"OpenCLIP has {layers[-1] + 1} of {b.config['num_hidden_layers']} blocks: the last is pruned, but SDXL "
            f"computes its pooled text embedding from it ({prefix}transformer.resblocks.{layers[-1] + 1}.* absent)",
            path=path,
        )
    return b.config, b.provenance


# --- the whole checkpoint ---------------------------------------------------------------------------------------------


def infer_architecture(
    shapes: Shapes, metadata: Mapping[str, str] | None = None, *, path: object | None = None
) -> Architecture:
    """The Architecture of a checkpoint with these tensor names (SD or MindSpore) and shapes, and its metadata."""
    metadata = metadata or {}
    sd = sd_names(shapes)
    structure = structure_from_keys(sd, path)
    optional: list[str] = []
    configs: dict[str, dict[str, Any]] = {}
    provenance: dict[str, str] = {}

    def add(component: str, result: tuple[dict[str, Any], dict[str, str]]) -> None:
        configs[component], found = result
        provenance.update(found)

    add("text_encoder_2", _openclip(sd, OPENCLIP[structure], _declared(metadata, "text_encoder_2", path), path))
    context = configs["text_encoder_2"]["hidden_size"]
    if structure == "base":
        add("text_encoder", _clip_l(sd, _declared(metadata, "text_encoder", path), path, optional))
        context += configs["text_encoder"]["hidden_size"]
    pooled = configs["text_encoder_2"]["projection_dim"]
    add("unet", _unet(sd, structure, _declared(metadata, "unet", path), pooled, context, path))
    if any(n.startswith(VAE) for n in sd):
        add("vae", _vae(sd, _declared(metadata, "vae", path), path))
    markers = frozenset(n for n in sd if n in MARKERS)
    detection = detect_variant(structure, configs["unet"], markers, metadata, path=path)
    if detection.variant == "playground-v2.5" and "vae" in configs:
        declared = _declared(metadata, "vae", path)
        if "scaling_factor" not in declared:
            configs["vae"]["scaling_factor"] = PLAYGROUND_VAE_SCALING
            provenance["vae.scaling_factor"] = "variant playground-v2.5 (latents mean/std in edm_mean, edm_std)"
    order = ("unet", "vae", "text_encoder", "text_encoder_2")
    return Architecture(
        variant=detection.variant,
        structure=structure,
        configs={c: configs[c] for c in order if c in configs},
        scheduler=scheduler_for(detection.variant, SCHEDULER_CONFIG, markers),
        provenance=provenance,
        detection=detection,
        markers=markers,
        optional=tuple(optional),
    )
