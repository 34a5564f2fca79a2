"""LoRA groups -> the tensors (lazy entries) and metadata of a kohya, PEFT or mindone file.

The scale alpha / rank is what must survive; each target keeps it its own way:
  kohya    ``<name>.alpha`` (F32 scalar) = the group's alpha; down / up bytes copied unchanged
  peft     down / up bytes unchanged; ``lora_adapter_metadata`` (the PEFT LoraConfig diffusers reads) holds r and
           lora_alpha of the most common (rank, alpha) per component, ``rank_pattern`` / ``alpha_pattern`` the rest
  mindone  stores no alpha and its network applies lora_alpha / r from its training config (unset: alpha = r, scale
           1), so the scale is folded into lora_B (fp32 multiply; bytes unchanged when the scale is 1); tensors fp32
           as mindone's LoRA Dense holds them
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from typing import Any

import numpy as np

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.formats.dtypes import to_float32
from sdxl_ckpt.formats.entries import TensorEntry, entry_from_array
from sdxl_ckpt.lora.names import kohya_name, mindone_declares, peft_name, peft_target
from sdxl_ckpt.lora.read import LoraGroup

TARGETS = ("kohya", "peft", "mindone")
KOHYA_SPELLINGS = ("sgm", "diffusers")


def _renamed(entry: TensorEntry, name: str) -> TensorEntry:
    return dataclasses.replace(entry, name=name)


def _as_f32(entry: TensorEntry, name: str, factor: float = 1.0) -> TensorEntry:
    """``entry`` as fp32 under ``name``, times ``factor``; the original bytes when nothing changes."""
    if entry.dtype == "F32" and factor == 1.0:
        return _renamed(entry, name)

    def load() -> np.ndarray:
        values = to_float32(entry.load(), entry.dtype).astype(np.float32, copy=False)
        return np.ascontiguousarray(values * np.float32(factor)) if factor != 1.0 else np.ascontiguousarray(values)

    return TensorEntry(name, "F32", entry.shape, load, entry.source)


def kohya_entries(groups: list[LoraGroup], structure: str, spelling: str = "sgm") -> list[TensorEntry]:
    if spelling not in KOHYA_SPELLINGS:
        raise InputError(f"--kohya-names must be sgm or diffusers, not {spelling!r}")
    out: list[TensorEntry] = []
    for group in groups:
        name = kohya_name(group.module, structure, spelling)
        out += [_renamed(group.down, f"{name}.lora_down.weight"), _renamed(group.up, f"{name}.lora_up.weight")]
        if group.mid is not None:
            out.append(_renamed(group.mid, f"{name}.lora_mid.weight"))
        out.append(entry_from_array(f"{name}.alpha", np.array(group.alpha, dtype=np.float32)))
    return out


def _refuse(bad: list[LoraGroup], why: str) -> None:
    if bad:
        names = ", ".join(g.module.label for g in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise InputError(f"{why}: {names}{more}", path=bad[0].down.source or None)


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def peft_metadata(groups: list[LoraGroup]) -> dict[str, str]:
    """``lora_adapter_metadata`` as diffusers writes it: one JSON of ``<component>.<LoraConfig field>``."""
    flat: dict[str, Any] = {}
    for component in sorted({g.module.component for g in groups}):
        mine = [g for g in groups if g.module.component == component]
        rank = _most_common([g.rank for g in mine])
        alpha = _most_common([g.alpha for g in mine if g.rank == rank])
        fields = {
            "r": rank,
            "lora_alpha": alpha,
            "rank_pattern": {re.escape(peft_target(g.module)): g.rank for g in mine if g.rank != rank},
            "alpha_pattern": {re.escape(peft_target(g.module)): g.alpha for g in mine if g.alpha != alpha},
            "target_modules": sorted(peft_target(g.module) for g in mine),
            "use_dora": False,
            "use_rslora": False,
            "lora_bias": False,
            "init_lora_weights": True,
        }
        flat.update({f"{component}.{k}": v for k, v in fields.items()})
    return {"lora_adapter_metadata": json.dumps(flat, indent=2, sort_keys=True), "format": "pt"}


def peft_entries(groups: list[LoraGroup]) -> list[TensorEntry]:
    _refuse([g for g in groups if g.mid is not None], "PEFT LoRA has no Tucker (lora_mid) layers")
    out: list[TensorEntry] = []
    for group in groups:
        name = peft_name(group.module)
        out += [_renamed(group.down, f"{name}.lora_A.weight"), _renamed(group.up, f"{name}.lora_B.weight")]
    return out


def mindone_entries(groups: list[LoraGroup], allow_undeclared: bool = False) -> list[TensorEntry]:
    _refuse([g for g in groups if g.mid is not None], "mindone's LoRA Dense has no Tucker (lora_mid) layer")
    _refuse(
        [g for g in groups if g.module.sd_module is None],
        "no mindone parameter can hold these (their SD weight is part of a fused or transposed tensor)",
    )
    if not allow_undeclared:
        _refuse(
            [g for g in groups if not mindone_declares(g.module)],
            "mindone's gm LoRA networks declare no LoRA on these modules (attention projections only; "
            "--allow-undeclared writes them anyway)",
        )
    out: list[TensorEntry] = []
    for group in groups:
        name = group.module.sd_module
        out += [_as_f32(group.down, f"{name}.lora_A.weight"), _as_f32(group.up, f"{name}.lora_B.weight", group.scale)]
    return out
