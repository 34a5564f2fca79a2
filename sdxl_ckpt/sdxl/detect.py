"""Which SDXL keymap a file needs (``--keys auto``): base / refiner from sentinel keys and shapes, LCM from provenance.

Sentinels are diffusers' own (``single_file_utils``): the OpenCLIP block 9 MLP bias sits under embedder 1 in base
(CLIP-L is embedder 0) and under embedder 0 in the refiner (its only encoder). They read the same in SD and
MindSpore names, so one function serves both directions. Full-size shapes confirm the verdict (context 2048 /
adm 2816 = base, 384 channels / adm 2560 = refiner); tiny SDXL-shaped models have other widths and are judged by
their keys alone. LCM has the base structure: it is recognised from the metadata ``diffusers-to-sd`` writes
(``sdxl_ckpt.variant=lcm``) or from the guidance-embedding tensor, else the file is treated as base with a note.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sdxl_ckpt.errors import InputError

BASE_SENTINEL = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
REFINER_SENTINEL = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"
COND_PROJ_KEY = "model.diffusion_model.time_cond_proj.weight"
ADM_KEY = "model.diffusion_model.label_emb.0.0.weight"  # (time_embed_dim, adm_in_channels)
CONV_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"  # (model_channels, 4, 3, 3)
VARIANT_METADATA = "sdxl_ckpt.variant"
FULL_SIZE = {  # structure -> (adm_in_channels, model_channels) of the real models
    "base": (2816, 320),
    "refiner": (2560, 384),
}


@dataclass(frozen=True)
class Detection:
    variant: str
    reason: str
    note: str | None = None  # shown to the user (e.g. "treated as base")


def _full_size_structure(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    adm, conv_in = shapes.get(ADM_KEY), shapes.get(CONV_IN_KEY)
    if not adm or not conv_in or len(adm) != 2:
        return None
    for structure, (adm_in, channels) in FULL_SIZE.items():
        if adm[1] == adm_in and conv_in[0] == channels:
            return structure
    return None


def detect_variant(
    shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None, path: object | None = None
) -> Detection:
    """The keymap variant for a file with these tensor names (SD or MindSpore) and shapes, and why."""
    metadata = metadata or {}
    is_base, is_refiner = BASE_SENTINEL in shapes, REFINER_SENTINEL in shapes
    if is_base == is_refiner:
        found = "both" if is_base else "neither"
        raise InputError(
            f"not an SDXL base, refiner or LCM checkpoint: {found} of the sentinel keys "
            f"{BASE_SENTINEL!r} (base) and {REFINER_SENTINEL!r} (refiner) found; pass --keys to force",
            path=path,
        )
    structure = "base" if is_base else "refiner"
    sized = _full_size_structure(shapes)
    if sized is not None and sized != structure:
        raise InputError(
            f"keys say SDXL {structure} but the UNet shapes are those of the {sized} "
            f"({ADM_KEY} {list(shapes[ADM_KEY])}); pass --keys to force",
            path=path,
        )
    shape_word = "full-size shapes" if sized else "SDXL-shaped (not full-size)"
    declared = metadata.get(VARIANT_METADATA)
    if structure == "refiner":
        if declared not in (None, "refiner"):
            raise InputError(f"metadata says {VARIANT_METADATA}={declared} but the keys are the refiner's", path=path)
        return Detection("refiner", f"sentinel {REFINER_SENTINEL!r}; {shape_word}")
    if declared == "lcm":
        return Detection("lcm", f"metadata {VARIANT_METADATA}=lcm; base structure; {shape_word}")
    if COND_PROJ_KEY in shapes:
        return Detection("lcm", f"guidance embedding {COND_PROJ_KEY!r} present; {shape_word}")
    if declared not in (None, "base"):
        raise InputError(f"metadata says {VARIANT_METADATA}={declared} but the keys are the base's", path=path)
    note = (
        None
        if declared == "base"
        else ("base structure: treated as SDXL base (an LCM UNet has the same keys; pass --keys lcm if it is one)")
    )
    return Detection("base", f"sentinel {BASE_SENTINEL!r}; {shape_word}", note)
