"""Read a LoRA file (safetensors, or a MindSpore ckpt for mindone) into groups: (module, down, up, alpha, mid).

Formats, told apart by their key names:

  kohya         ``lora_unet_<sgm or diffusers path>`` / ``lora_te1_`` / ``lora_te2_`` + ``.lora_down.weight``,
                ``.lora_up.weight``, ``.alpha`` (scalar; absent = rank), ``.lora_mid.weight`` (LoCon Tucker)
  peft          ``unet.<path>`` / ``text_encoder.`` / ``text_encoder_2.`` + ``.lora_A.weight`` / ``.lora_B.weight``;
                alpha from the ``lora_adapter_metadata`` JSON (``<component>.lora_alpha``, ``alpha_pattern``,
                ``use_rslora``), else alpha = rank (what diffusers' loader assumes)
  old-diffusers ``unet.<attention>.processor.to_q_lora.down.weight`` / ``...q_proj.lora_linear_layer.up.weight``;
                no alpha (= rank)
  mindone       mindone gm parameter paths (``model.diffusion_model.<sgm path>``, ``conditioner.embedders.N...``) +
                ``.lora_A.weight`` / ``.lora_B.weight``, fp32 in a ckpt; no alpha stored: mindone's config
                ``lora_alpha`` (unset = rank) decides, so ``--alpha`` gives it
DoRA (``dora_scale``, ``lora_magnitude_vector``), LoHa (``hada_``), LoKr (``lokr_``), full diffs (``.diff``) and
embeddings (``lora_embedding_A``) are refused by name: their delta is not scale * up @ down.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_ckpt.errors import InputError, KeyMismatchError, require_file
from sdxl_ckpt.formats.dtypes import to_float32
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.lora.names import STRUCTURES, Module, ModuleIndex, module_index

FORMATS = ("kohya", "peft", "old-diffusers", "mindone")
# key suffix -> role, per format (the module name is what precedes the suffix)
SUFFIXES: dict[str, dict[str, str]] = {
    "kohya": {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", ".lora_mid.weight": "mid"},
    "peft": {".lora_A.weight": "down", ".lora_B.weight": "up"},
    "old-diffusers": {".down.weight": "down", ".up.weight": "up"},
    "mindone": {".lora_A.weight": "down", ".lora_B.weight": "up"},
}
# LoRA variants whose delta is not scale * up @ down: refused, naming the variant
REFUSED = (
    (re.compile(r"\.(?:dora_scale|lora_magnitude_vector)(?:\.|$)"), "DoRA (weight-decomposed LoRA)"),
    (re.compile(r"\.hada_"), "LoHa (Hadamard-product LoRA)"),
    (re.compile(r"\.lokr_"), "LoKr (Kronecker-product LoRA)"),
    (re.compile(r"\.(?:diff|diff_b|bias)$"), "a full weight / bias difference"),
    (re.compile(r"lora_embedding_[AB]"), "an embedding LoRA"),
    (re.compile(r"\.(?:w_norm|b_norm)$"), "a norm LoRA (LyCORIS)"),
)
MINDONE_ROOTS = ("model.diffusion_model.", "conditioner.embedders.")


@dataclass
class LoraGroup:
    """One patched module: the LoRA tensors (lazy), the rank and the alpha that gives the scale alpha / rank."""

    module: Module
    down: TensorEntry
    up: TensorEntry
    mid: TensorEntry | None
    alpha: float
    alpha_source: str  # "stored" | "metadata" | "default (= rank)" | "--alpha"
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def kind(self) -> str:
        if self.mid is not None:
            return "tucker"
        return "conv" if len(self.down.shape) == 4 and self.down.shape[2:] != (1, 1) else "linear"


@dataclass
class LoraFile:
    """A whole LoRA file: its format, structure (base / refiner), groups and what could not be read."""

    path: Path
    format: str
    structure: str
    groups: list[LoraGroup]
    metadata: dict[str, str]
    unmatched: list[str]  # keys no module of the structure has
    notes: list[str] = field(default_factory=list)


def _entries(path: Path) -> tuple[list[TensorEntry], dict[str, str], str]:
    """(entries, metadata, container) of a safetensors file or a MindSpore ckpt."""
    from sdxl_ckpt.formats.ckpt_io import scan_ckpt
    from sdxl_ckpt.formats.safetensors_io import read_safetensors

    with open(path, "rb") as handle:
        head = handle.read(9)
    if path.suffix == ".ckpt" or head[:1] == b"\x0a":
        return scan_ckpt(path).entries, {}, "ckpt"
    parsed = read_safetensors(path)
    return parsed.entries, parsed.metadata, "safetensors"


def detect_format(names: list[str], path: Path) -> str:
    """kohya, peft, old-diffusers or mindone, from the key names (the first variant refusal wins)."""
    for name in names:
        for pattern, what in REFUSED:
            if pattern.search(name):
                raise InputError(f"{what}: not supported (delta is not scale * up @ down)", path=path, key=name)
    if any(n.startswith(("lora_unet_", "lora_te")) for n in names):
        return "kohya"
    if any(
        n.endswith((".down.weight", ".up.weight")) and ("processor." in n or "lora_linear_layer" in n) for n in names
    ):
        return "old-diffusers"
    if any(n.endswith(".lora_A.weight") for n in names):
        return "mindone" if all(n.startswith(MINDONE_ROOTS) for n in names) else "peft"
    shown = ", ".join(names[:3]) or "no tensors"
    raise InputError(f"not a LoRA file this tool reads (first keys: {shown})", path=path)


def _split(name: str, fmt: str) -> tuple[str, str] | None:
    for suffix, role in SUFFIXES[fmt].items():
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    return None


def _table(index: ModuleIndex, fmt: str) -> dict[str, Module]:
    return {"kohya": index.kohya, "peft": index.peft, "old-diffusers": index.old, "mindone": index.mindone}[fmt]


def _choose_structure(prefixes: list[str], fmt: str, structure: str | None) -> tuple[ModuleIndex, list[str]]:
    """The structure whose modules name the most prefixes (all, for a LoRA made for it); base wins ties."""
    candidates = [structure] if structure else list(STRUCTURES)
    best: tuple[ModuleIndex, list[str]] | None = None
    for name in candidates:
        index = module_index(name)
        table = _table(index, fmt)
        missing = [p for p in prefixes if p not in table]
        if best is None or len(missing) < len(best[1]):
            best = (index, missing)
    assert best is not None
    return best


def _peft_alphas(metadata: dict[str, str], path: Path) -> dict[str, dict[str, Any]]:
    """Per component: the PEFT LoraConfig diffusers stored (``lora_adapter_metadata``), or {} when there is none."""
    text = metadata.get("lora_adapter_metadata")
    found: dict[str, dict[str, Any]] = {}
    if text is None:
        for key, value in metadata.items():  # older diffusers: one "<component>_lora_adapter_metadata" per component
            if key.endswith("_lora_adapter_metadata"):
                try:
                    found[key.removesuffix("_lora_adapter_metadata")] = json.loads(value)
                except json.JSONDecodeError:
                    raise InputError("metadata is not JSON", path=path, key=key) from None
        return found
    try:
        flat = json.loads(text)
    except json.JSONDecodeError:
        raise InputError("lora_adapter_metadata is not JSON", path=path) from None
    for key, value in flat.items():
        component, _, field_name = key.partition(".")
        found.setdefault(component, {})[field_name] = value
    return found


def _pattern_value(patterns: dict[str, Any], module: str) -> Any:
    """PEFT's rule for rank_pattern / alpha_pattern: a key matches a module path it ends (after a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", module):
            return value
    return None


def _peft_alpha(config: dict[str, Any], module: Module, rank: int, peft_name: str) -> float | None:
    if not config:
        return None
    local = peft_name.split(".", 1)[1]
    alpha = _pattern_value(config.get("alpha_pattern") or {}, local)
    if alpha is None:
        alpha = config.get("lora_alpha")
    if alpha is None:
        return None
    alpha = float(alpha)
    if config.get("use_rslora"):
        alpha = alpha * rank / math.sqrt(rank)  # rsLoRA scale alpha / sqrt(r), written as an alpha over r
    return alpha


def read_lora(
    path: str | Path, *, alpha: float | None = None, structure: str | None = None, strict: bool = True
) -> LoraFile:
    """Read ``path`` into groups. ``alpha`` fills in where the file stores none; ``strict`` refuses unknown keys."""
    path = require_file(path)
    entries, metadata, container = _entries(path)
    names = [e.name for e in entries]
    fmt = detect_format(names, path)
    by_prefix: dict[str, dict[str, TensorEntry]] = {}
    strays: list[str] = []
    for entry in entries:
        split = _split(entry.name, fmt)
        if split is None:
            strays.append(entry.name)
            continue
        prefix, role = split
        by_prefix.setdefault(prefix, {})[role] = entry
    index, missing = _choose_structure(list(by_prefix), fmt, structure)
    table = _table(index, fmt)
    unmatched = strays + sorted(k for p in missing for k in (e.name for e in by_prefix[p].values()))
    if strict and unmatched:
        more = f" (and {len(unmatched) - 1} more; `lora inspect` lists them)" if len(unmatched) > 1 else ""
        raise KeyMismatchError(
            f"no SDXL {index.structure} module has this {fmt} LoRA key{more}", path=path, key=unmatched[0]
        )
    peft_configs = _peft_alphas(metadata, path) if fmt == "peft" else {}
    groups: list[LoraGroup] = []
    seen: dict[Module, str] = {}
    for prefix, parts in by_prefix.items():
        module = table.get(prefix)
        if module is None:
            continue
        if "down" not in parts or "up" not in parts:
            have = ", ".join(sorted(parts))
            raise KeyMismatchError(f"LoRA module has {have} but needs down and up", path=path, key=prefix)
        if module in seen:
            raise KeyMismatchError(f"{seen[module]!r} patches the same module {module.label}", path=path, key=prefix)
        seen[module] = prefix
        down, up = parts["down"], parts["up"]
        _check_shapes(down, up, parts.get("mid"), path)
        rank = int(down.shape[0])
        stored: float | None = None
        source = "default (= rank)"
        if "alpha" in parts:
            stored, source = _scalar(parts["alpha"], path), "stored"
        elif fmt == "peft":
            stored = _peft_alpha(peft_configs.get(module.component, {}), module, rank, prefix)
            source = "metadata" if stored is not None else source
        if stored is None and alpha is not None:
            stored, source = float(alpha), "--alpha"
        groups.append(
            LoraGroup(
                module,
                down,
                up,
                parts.get("mid"),
                float(rank) if stored is None else stored,
                source,
                [e.name for e in parts.values()],
            )
        )
    if not groups and strict:
        raise InputError(f"no LoRA module of an SDXL {index.structure} found in this {fmt} file", path=path)
    notes = []
    if container == "ckpt" and fmt != "mindone":
        notes.append("a MindSpore ckpt holding non-mindone names")
    sources = Counter(g.alpha_source for g in groups)
    notes.append("alpha: " + ", ".join(f"{n} {s}" for s, n in sorted(sources.items())))
    return LoraFile(path, fmt, index.structure, groups, metadata, unmatched, notes)


def _scalar(entry: TensorEntry, path: Path) -> float:
    array = entry.load()
    if array.size != 1:
        raise KeyMismatchError(f"alpha must be one number, has shape {list(entry.shape)}", path=path, key=entry.name)
    if entry.dtype in ("F16", "F32", "F64", "BF16"):
        return float(to_float32(array, entry.dtype).reshape(()))
    return float(np.asarray(array).reshape(()))


def _check_shapes(down: TensorEntry, up: TensorEntry, mid: TensorEntry | None, path: Path) -> None:
    """down (r, in[, kh, kw]), up (out, r[, 1, 1]), mid (r, r, kh, kw): the rank must agree everywhere."""
    if len(down.shape) not in (2, 4) or len(up.shape) != len(down.shape):
        raise KeyMismatchError(
            f"down {list(down.shape)} and up {list(up.shape)} are not a linear or conv LoRA pair",
            path=path,
            key=down.name,
        )
    rank = down.shape[0]
    if up.shape[1] != rank or (len(up.shape) == 4 and up.shape[2:] != (1, 1)):
        raise KeyMismatchError(f"up {list(up.shape)} does not fit rank {rank}", path=path, key=up.name)
    if mid is not None and (len(mid.shape) != 4 or mid.shape[:2] != (rank, rank) or down.shape[2:] != (1, 1)):
        raise KeyMismatchError(f"Tucker mid {list(mid.shape)} does not fit rank {rank}", path=path, key=mid.name)
