"""Keymaps: the explicit SD <-> MindSpore name pairs of each SDXL variant, loaded from the generated YAMLs.

``load_keymap("base")`` gives a ``Keymap``: ``sd_to_ms`` / ``ms_to_sd`` dicts, the full-size ``shape`` and dtype
class of every key, the optional keys and the dropped ones (with the reason and how
``ms-to-st`` restores them). The YAMLs are written by ``python -m sdxl_ckpt.keymaps.generate``; never by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.sdxl.variants import MODEL_KINDS

VARIANTS = MODEL_KINDS  # the generated keymaps: one per official model kind
KEYMAP_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class KeySpec:
    """One SD tensor: its MindSpore name (None when dropped), full-size shape, float/int."""

    sd: str
    ms: str | None
    shape: tuple[int, ...]
    dtype: str  # "float" | "int"
    required: bool = True
    restore: str | None = None  # dropped keys: how ms-to-st regenerates them ("arange")
    why: str = ""


@dataclass(frozen=True)
class Keymap:
    """All keys of one variant, in SD order (UNet, text encoders, VAE)."""

    variant: str
    structure: str
    specs: tuple[KeySpec, ...]

    @cached_property
    def by_sd(self) -> dict[str, KeySpec]:
        return {s.sd: s for s in self.specs}

    @cached_property
    def by_ms(self) -> dict[str, KeySpec]:
        return {s.ms: s for s in self.specs if s.ms is not None}

    @cached_property
    def sd_to_ms(self) -> dict[str, str]:
        """Every mapped SD key (required and optional) -> MindSpore key."""
        return {s.sd: s.ms for s in self.specs if s.ms is not None}

    @cached_property
    def ms_to_sd(self) -> dict[str, str]:
        return {ms: sd for sd, ms in self.sd_to_ms.items()}

    @cached_property
    def dropped(self) -> dict[str, str]:
        """SD keys not written to MindSpore -> why."""
        return {s.sd: s.why for s in self.specs if s.ms is None}

    @cached_property
    def required_sd(self) -> list[str]:
        return [s.sd for s in self.specs if s.required and s.ms is not None]

    @cached_property
    def optional_sd(self) -> list[str]:
        return [s.sd for s in self.specs if not s.required and s.ms is not None]


def _spec(sd: str, fields: dict, section: str) -> KeySpec:
    return KeySpec(
        sd=sd,
        ms=fields.get("ms"),
        shape=tuple(fields["shape"]),
        dtype=fields["dtype"],
        required=section == "keys",
        restore=fields.get("restore"),
        why=fields.get("why", ""),
    )


@cache
def load_keymap(variant: str) -> Keymap:
    """The keymap of ``variant`` (base, refiner, lcm), parsed once per process.

    The generated files are read by ``flowlines`` (~20x faster than PyYAML, which would dominate a small
    conversion's run time); a file outside the generated subset is read by PyYAML instead.
    """
    from sdxl_ckpt.keymaps.flowlines import parse_generated

    if variant not in VARIANTS:
        raise InputError(f"unknown keymap {variant!r} (expected one of {', '.join(VARIANTS)})")
    text = (KEYMAP_DIR / f"{variant}.yaml").read_text(encoding="utf-8")
    data = parse_generated(text)
    if data is None:
        import yaml

        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    specs = [
        _spec(sd, fields, section)
        for section in ("keys", "optional", "dropped")
        for sd, fields in (data.get(section) or {}).items()
    ]
    return Keymap(variant=data["variant"], structure=data["structure"], specs=tuple(specs))
