"""Write ``sdxl_ckpt/keymaps/{base,refiner,lcm}.yaml``: every SD key -> its MindSpore key, explicitly.

    python -m sdxl_ckpt.keymaps.generate [--check]

The full-size SD key set is not typed in anywhere: the real SDXL configs (``sdxl.configs.FULL_CONFIGS``) are
instantiated on torch's meta device (no memory, no weights), their diffusers keys mapped to SD by
``keymaps.diffusers_sd`` and to MindSpore by ``keymaps.sd_ms``. The tiny configs go through the same path; pairing
each full-size dimension with its tiny counterpart gives every axis a dimension SYMBOL (``d1280`` = "the axes that
are 1280 full-size and the same size in the tiny model"), which is how a structure-preserving input of another
width is checked for internal consistency. Needs the ``reference`` extra (torch, diffusers, transformers).
``--check`` exits 1 when a checked-in YAML differs from a fresh generation.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdxl_ckpt.keymaps import KEYMAP_DIR, VARIANTS
from sdxl_ckpt.keymaps.diffusers_sd import COMPONENTS, SD_PREFIXES, map_component_keys
from sdxl_ckpt.keymaps.sd_ms import sd_to_ms_name
from sdxl_ckpt.keymaps.transforms import TRANSFORMS

# SD component order = mindone's parameter order (UNet, text encoders, VAE)
SD_ORDER = ("unet", "text_encoder", "text_encoder_2", "vae")
LCM_COND_PROJ_DIM = 256  # the guidance embedding dim community LCM UNets use (diffusers' time_cond_proj_dim)
OPTIONAL_WHY = {
    "time_cond_proj": "only in LCM UNets distilled with the guidance embedding (config time_cond_proj_dim)",
    "logit_scale": "CLIP's contrastive temperature, unused for generation; mindone's LCM file has none: kept "
    "when present, not required",
}

GENERATED_SHAPE = {  # SD tensors the converter makes: generator -> (shape from the component config, dtype class)
    "position_ids": lambda cfg: ((1, cfg.get("max_position_embeddings", 77)), "int"),
    "logit_scale": lambda cfg: ((), "float"),
}


def _meta_state_shapes(component: str, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """diffusers/HF key -> shape of the component built from ``config`` on the meta device."""
    import torch

    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(dict(config))
        elif component == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_config(dict(config))
        else:
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
            model = cls(CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")}))
    shapes = {}
    for key, tensor in model.state_dict().items():
        if component.startswith("text_encoder") and not key.startswith(("text_model.", "text_projection")):
            key = "text_model." + key  # transformers >= 5.6 drops this level; the SD layout keeps it
        shapes[key] = tuple(tensor.shape)
    return shapes


def sd_shapes(structure: str, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Ordered SD key -> (shape, dtype class) for a model with these component configs."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for component in SD_ORDER:
        if component not in SD_PREFIXES[structure]:
            continue
        config = configs[component]
        shapes = _meta_state_shapes(component, config)
        mapped = map_component_keys(component, shapes, config, SD_PREFIXES[structure][component])
        if mapped.unknown:
            raise RuntimeError(f"{component}: diffusers keys no rule maps: {mapped.unknown[:5]}")
        for target in mapped.targets:
            out[target.name] = (TRANSFORMS[target.transform].shape([shapes[s] for s in target.sources]), "float")
        for name, generator in mapped.generated:
            out[name] = GENERATED_SHAPE[generator](config)
    assert set(SD_ORDER) >= set(COMPONENTS)
    return out


def dimension_symbols(full: Mapping[str, tuple], tiny: Mapping[str, tuple]) -> dict[str, list[str]]:
    """Name each axis by its (full, tiny) size pair: ``d1280``, or ``d1280b``... when 1280 has several tiny sizes."""
    pairs: dict[int, list[int]] = {}
    for key, (shape, _dtype) in full.items():
        for size_full, size_tiny in zip(shape, tiny[key][0]):
            partners = pairs.setdefault(size_full, [])
            if size_tiny not in partners:
                partners.append(size_tiny)

    def name(size_full: int, size_tiny: int) -> str:
        index = pairs[size_full].index(size_tiny)
        return f"d{size_full}" + ("" if index == 0 else chr(ord("a") + index))

    return {key: [name(f, t) for f, t in zip(shape, tiny[key][0])] for key, (shape, _dtype) in full.items()}


def _structure(variant: str) -> str:
    return "refiner" if variant == "refiner" else "base"


def _configs(variant: str, size: str) -> dict[str, dict[str, Any]]:
    from sdxl_ckpt.sdxl.configs import full_configs
    from sdxl_ckpt.testmodels.tiny import TINY_COND_PROJ_DIM, tiny_configs

    configs = full_configs(variant) if size == "full" else tiny_configs(variant)
    if variant == "lcm":  # the optional guidance embedding, so that it gets a shape and symbols
        configs["unet"]["time_cond_proj_dim"] = LCM_COND_PROJ_DIM if size == "full" else TINY_COND_PROJ_DIM
    return configs


def _optional_why(variant: str, key: str) -> str | None:
    if variant != "lcm":
        return None
    for marker, why in OPTIONAL_WHY.items():
        if key.split(".")[-1] == marker or f".{marker}." in key:
            return why
    return None


def _line(key: str, fields: Mapping[str, Any]) -> str:
    parts = []
    for field, value in fields.items():
        if isinstance(value, (list, tuple)):
            text = "[" + ", ".join(str(v) for v in value) + "]"
        elif field == "why":
            text = json.dumps(value)
        else:
            text = str(value)
        parts.append(f"{field}: {text}")
    return f"  {key}: {{{', '.join(parts)}}}"


def render(variant: str) -> str:
    """The YAML text of one variant's keymap."""
    structure = _structure(variant)
    full = sd_shapes(structure, _configs(variant, "full"))
    tiny = sd_shapes(structure, _configs(variant, "tiny"))
    symbols = dimension_symbols(full, tiny)
    required, optional, dropped = [], [], []
    for key, (shape, dtype) in full.items():
        ms, rule = sd_to_ms_name(key)
        base = {"shape": list(shape), "dims": symbols[key], "dtype": dtype}
        if ms is None:
            dropped.append(_line(key, {**base, "restore": "arange", "why": rule.why}))
            continue
        why = _optional_why(variant, key)
        entry = {"ms": ms, **base}
        if why is None:
            required.append(_line(key, entry))
        else:
            optional.append(_line(key, {**entry, "why": why}))
    head = [
        "# Generated by `python -m sdxl_ckpt.keymaps.generate` from the rule tables in keymaps/diffusers_sd.py and",
        "# keymaps/sd_ms.py applied to the real SDXL configs (sdxl.configs.FULL_CONFIGS). Do not edit by hand.",
        "# keys: SD key -> MindSpore key (ms), full-size shape, dimension symbols (dims), dtype class.",
        "# optional: mapped the same way when present, not required. dropped: not written to MindSpore; ms-to-st",
        "# restores them (restore: arange = int64 0..n-1 in the given shape).",
        f"variant: {variant}",
        f"structure: {structure}",
        f"counts: {{sd: {len(full)}, ms_required: {len(required)}, optional: {len(optional)}, "
        f"dropped: {len(dropped)}}}",
        "keys:",
        *required,
        "optional:" + ("" if optional else " {}"),
        *optional,
        "dropped:" + ("" if dropped else " {}"),
        *dropped,
    ]
    return "\n".join(head) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    stale = []
    for variant in VARIANTS:
        path = Path(KEYMAP_DIR) / f"{variant}.yaml"
        text = render(variant)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python -m sdxl_ckpt.keymaps.generate)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
