"""Which model component a tensor belongs to, decided by its SD (sgm) name prefix or its diffusers sub-folder.

MindSpore names share the SD prefixes (only suffixes differ), so one prefix table serves SD files, MindSpore
safetensors and ckpt. A name that matches no prefix is reported as ``other``: merges and exports often carry
stray tensors (EMA copies, ``denoiser.sigmas``...) that a user should see before converting.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

COMPONENTS = ("unet", "vae", "clip_l", "openclip", "other")

# (SD / MindSpore name prefix, component); the refiner's only text encoder is OpenCLIP at embedders.0
SD_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "unet"),
    ("first_stage_model.", "vae"),
    ("conditioner.embedders.0.transformer.", "clip_l"),
    ("conditioner.embedders.1.model.", "openclip"),
    ("conditioner.embedders.0.model.", "openclip"),
)

# diffusers pipeline sub-folder -> component
DIFFUSERS_FOLDERS: dict[str, str] = {
    "unet": "unet",
    "vae": "vae",
    "text_encoder": "clip_l",
    "text_encoder_2": "openclip",
}


def component_of(name: str) -> str:
    """The component of an SD or MindSpore tensor name (``other`` when no prefix matches)."""
    for prefix, component in SD_PREFIXES:
        if name.startswith(prefix):
            return component
    return "other"


def partial_of(names: Collection[str]) -> str | None:
    """What an SD-prefixed file lacks to be a whole SDXL checkpoint (``None`` if whole, ``""`` if no SD names).

    Whole: a UNet, a VAE and at least one text encoder (the refiner has only OpenCLIP). Used by the file sniffer
    so a UNet-only or VAE-only export is named as such instead of failing with hundreds of missing keys.
    """
    counts = Counter(component_of(n) for n in names)
    known = [c for c in COMPONENTS if c != "other" and counts[c]]
    if not known:
        return ""
    lacking = missing_components(names)
    if not lacking:
        return None
    held = ", ".join(f"{c} {counts[c]} tensors" for c in known)
    return f"only {held}; no {', no '.join(lacking)}"


def missing_components(names: Collection[str]) -> list[str]:
    """The parts a whole SDXL checkpoint has and these SD-prefixed names lack (``unet``, ``vae``, text encoders)."""
    known = {component_of(n) for n in names}
    lacking = [c for c in ("unet", "vae") if c not in known]
    if "clip_l" not in known and "openclip" not in known:
        lacking.append("text encoders")
    return lacking
