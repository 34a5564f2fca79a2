"""Read a diffusers pipeline folder (or one component folder) as lazy tensor entries, without loading tensors.

A component folder holds ``config.json`` and its weights in one of the layouts ``save_pretrained`` writes:
``diffusion_pytorch_model[.VARIANT].safetensors`` / ``model[.VARIANT].safetensors``, or shards listed by an index
json (``*.safetensors.index[.VARIANT].json``; transformers also wrote ``*.VARIANT.safetensors.index.json``).
The weight set is chosen by ``variant`` and every ambiguity is an error naming the files, because picking the
wrong one silently would convert the wrong weights. Only headers are read here; each entry loads its own bytes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdxl_ckpt.errors import CorruptFileError, InputError, KeyMismatchError
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.formats.safetensors_io import read_safetensors

WEIGHT_BASENAMES = ("diffusion_pytorch_model", "model")
_BASE = "(?P<base>" + "|".join(WEIGHT_BASENAMES) + ")"
_VAR = r"(?P<var>[A-Za-z0-9_]+)"
# (regex over a file name, kind); the ``var`` group is the variant (absent = plain weights)
WEIGHT_FILE_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"{_BASE}(?:\.{_VAR})?\.safetensors"), "safetensors"),
    (re.compile(rf"{_BASE}\.safetensors\.index(?:\.{_VAR})?\.json"), "index"),
    (re.compile(rf"{_BASE}\.{_VAR}\.safetensors\.index\.json"), "index"),
    (re.compile(rf"{_BASE}(?:\.{_VAR})?\.bin"), "bin"),
    (re.compile(rf"{_BASE}\.bin\.index(?:\.{_VAR})?\.json"), "bin"),
)

# CLIP keys transformers >= 5.6 saves without the ``text_model.`` level; the SD layout (and older folders) have it
CLIP_FLAT_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class WeightSet:
    """The chosen weight files of one component: ``files`` (one, or the shards), the ``index`` json if sharded."""

    files: tuple[Path, ...]
    index: Path | None
    variant: str | None
    notes: tuple[str, ...] = ()


@dataclass
class Component:
    """One component: its folder, parsed config (+ the raw text), chosen weights and lazy entries."""

    name: str
    folder: Path
    config: dict[str, Any]
    config_text: str
    weights: WeightSet
    entries: list[TensorEntry]
    notes: list[str] = field(default_factory=list)

    def source_of(self) -> dict[str, str]:
        """Key -> the file it is stored in (for error messages)."""
        return {e.name: e.source for e in self.entries}


def _classify(folder: Path) -> dict[str | None, dict[str, list[Path]]]:
    """variant -> kind -> files, for every file in ``folder`` that looks like a weight file."""
    found: dict[str | None, dict[str, list[Path]]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        for pattern, kind in WEIGHT_FILE_PATTERNS:
            match = pattern.fullmatch(path.name)
            if match:
                found.setdefault(match.group("var"), {}).setdefault(kind, []).append(path)
                break
    return found


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths)


def find_weight_files(folder: Path, variant: str | None = None) -> WeightSet:
    """Choose the component's safetensors weights for ``variant`` (None: the plain weights, or the only variant).

    Errors (``InputError``): no safetensors weights, only ``.bin`` (pickle, not read by this tool), a single file
    and an index for the same variant, two base names (``model`` and ``diffusion_pytorch_model``), several variants
    and no plain weights with no ``variant`` given.
    """
    found = _classify(folder)
    notes: list[str] = []
    if variant is not None and variant not in found:
        if None not in found:
            have = ", ".join(sorted(v or "plain" for v in found)) or "none"
            raise InputError(f"no {variant!r} weights (weight variants here: {have})", path=folder)
        notes.append(f"no {variant} variant here; used the plain weights")
        chosen: str | None = None
    elif variant is not None:
        chosen = variant
    elif None in found:
        chosen = None
    elif len(found) == 1:
        chosen = next(iter(found))
        notes.append(f"only {chosen} weights here; used them")
    elif found:
        raise InputError(
            f"several weight variants ({', '.join(sorted(v for v in found if v))}) and no plain "
            f"weights: choose one with --variant",
            path=folder,
        )
    else:
        raise InputError(
            "no weights: expected diffusion_pytorch_model[.VARIANT].safetensors or "
            "model[.VARIANT].safetensors (or a sharded *.safetensors.index.json)",
            path=folder,
        )

    kinds = found[chosen]
    singles, indexes, bins = kinds.get("safetensors", []), kinds.get("index", []), kinds.get("bin", [])
    safetensors = singles + indexes
    label = f"{chosen} " if chosen else ""
    if not safetensors:
        raise InputError(
            f"only PyTorch pickle {label}weights ({_names(bins)}); this tool reads safetensors only "
            f"(re-save the component with save_pretrained(..., safe_serialization=True))",
            path=folder,
        )
    if len(safetensors) > 1:
        raise InputError(f"ambiguous {label}weights: {_names(safetensors)} (keep one of them)", path=folder)
    if bins:
        notes.append(f"ignored pickle weights {_names(bins)} (the safetensors ones are used)")
    if singles:
        return WeightSet((singles[0],), None, chosen, tuple(notes))
    index = indexes[0]
    return WeightSet(_shards_of(index), index, chosen, tuple(notes))


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"not a readable index json ({exc.__class__.__name__})", path=index) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptFileError("index json has no weight_map of key -> shard file", path=index)
    return weight_map


def _shards_of(index: Path) -> tuple[Path, ...]:
    shards: list[Path] = []
    for name in sorted(set(_read_index(index).values())):
        path = index.parent / name
        if Path(name).name != name:
            raise CorruptFileError(f"shard {name!r} is not a file name in this folder", path=index)
        if not path.is_file():
            raise InputError(f"index names shard {name!r}, which is missing", path=index)
        shards.append(path)
    if not shards:
        raise CorruptFileError("index json lists no shards", path=index)
    return tuple(shards)


def read_weight_entries(weights: WeightSet) -> list[TensorEntry]:
    """Headers of the chosen files -> entries; for shards, each key must be where the index says it is."""
    entries: list[TensorEntry] = []
    where: dict[str, str] = _read_index(weights.index) if weights.index else {}
    for path in weights.files:
        for entry in read_safetensors(path).entries:
            if weights.index is not None and where.get(entry.name) != path.name:
                listed = where.get(entry.name)
                raise KeyMismatchError(
                    f"the index {weights.index.name} " + (f"puts it in {listed}" if listed else "does not list it"),
                    path=path,
                    key=entry.name,
                )
            entries.append(entry)
    if weights.index is not None:
        present = {e.name for e in entries}
        missing = [k for k in where if k not in present]
        if missing:
            raise KeyMismatchError(
                f"listed by the index but not in {where[missing[0]]}", path=weights.index, key=missing[0]
            )
    return entries


def read_config(folder: Path) -> tuple[dict[str, Any], str]:
    """The parsed ``config.json`` and its exact text (kept in the output's metadata)."""
    path = folder / "config.json"
    if not path.is_file():
        raise InputError("no config.json: not a diffusers component folder", path=folder)
    try:
        text = path.read_text(encoding="utf-8")
        config = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"not a readable JSON file ({exc.__class__.__name__})", path=path) from None
    if not isinstance(config, dict):
        raise CorruptFileError("config is not a JSON object", path=path)
    return config, text


def with_text_model_level(name: str) -> str:
    """A CLIP key in the official layout: flat keys (as transformers >= 5.6 saves them) get ``text_model.``."""
    return "text_model." + name if name.startswith(CLIP_FLAT_ROOTS) else name


def normalise_clip_keys(entries: list[TensorEntry]) -> tuple[list[TensorEntry], int]:
    """Give flat CLIP keys (``embeddings.*``, ``encoder.*``, ``final_layer_norm.*``) their ``text_model.`` level.

    Returns the entries and how many were renamed; two keys becoming one name is an error.
    """
    out: list[TensorEntry] = []
    seen: dict[str, str] = {}
    renamed = 0
    for entry in entries:
        name = with_text_model_level(entry.name)
        if name != entry.name:
            renamed += 1
            entry = dataclasses.replace(entry, name=name)
        if name in seen:
            raise KeyMismatchError(
                f"two keys give {name!r} once the text_model. level is added", path=entry.source, key=seen[name]
            )
        seen[name] = entry.name
        out.append(entry)
    return out, renamed


def read_component(name: str, folder: str | Path, variant: str | None = None) -> Component:
    """Read one component folder: config, chosen weights, lazy entries (CLIP keys normalised)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{name} folder is missing", path=folder)
    config, text = read_config(folder)
    weights = find_weight_files(folder, variant)
    entries = read_weight_entries(weights)
    notes = list(weights.notes)
    if name in TEXT_ENCODERS:
        entries, renamed = normalise_clip_keys(entries)
        if renamed:
            notes.append(f"added the text_model. level to {renamed} flat CLIP keys")
    return Component(name, folder, config, text, weights, entries, notes)


def component_folders(src_dir: str | Path, overrides: Mapping[str, str | Path | None] | None = None) -> dict[str, Path]:
    """Where each component lives: ``src_dir/<name>`` unless ``overrides`` names another folder."""
    src = Path(src_dir)
    if not src.exists():
        raise InputError("no such folder", path=src)
    if not src.is_dir():
        raise InputError("not a folder (expected a diffusers SDXL pipeline folder)", path=src)
    folders = {name: src / name for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    for name, path in (overrides or {}).items():
        if path is not None:
            folders[name] = Path(path)
    return folders


def read_scheduler_config(pipeline: str | Path) -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` of a pipeline folder ({} when it has none: SDXL's own is assumed)."""
    path = Path(pipeline) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"not a readable JSON file ({exc.__class__.__name__})", path=path) from None
    if not isinstance(value, dict):
        raise CorruptFileError("scheduler config is not a JSON object", path=path)
    return value
