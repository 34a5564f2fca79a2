"""Open any checkpoint this tool knows (SD or MindSpore-named safetensors, MindSpore ckpt, diffusers folder) as one
description: lazy entries under their stored names, the component and SD name of each, metadata, the weight files.

Only headers and record framing are read here (the readers of ``sdxl_ckpt.convert``); tensor bytes are read later
by whoever needs them (hashing, diff), one tensor at a time. SD names come from the keymaps (MindSpore names) or
from the diffusers -> SD plan (diffusers folders), so files of different layouts can be compared name by name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from sdxl_ckpt.errors import CorruptFileError, InputError, SdxlCkptError
from sdxl_ckpt.formats.ckpt_io import scan_ckpt
from sdxl_ckpt.formats.diffusers_folder import Component, read_component, read_scheduler_config
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.formats.safetensors_io import read_safetensors
from sdxl_ckpt.formats.sniff import expect, sniff
from sdxl_ckpt.keymaps.sd_ms import sd_to_ms_name
from sdxl_ckpt.sdxl.architecture import infer_architecture, sd_name
from sdxl_ckpt.sdxl.components import DIFFUSERS_FOLDERS, component_of, partial_of
from sdxl_ckpt.sdxl.variants import VARIANT_NAMES, detect_from_configs, detect_variant

FORMAT_LABELS = {
    "sd": "SD safetensors",
    "ms-safetensors": "MindSpore-named safetensors",
    "ckpt": "MindSpore ckpt",
    "diffusers": "diffusers pipeline folder",
    "diffusers-component": "diffusers component folder",
}
MS_SUFFIXES = (".gamma", ".beta", ".embedding_table")
# diffusers class name (config.json ``_class_name``) -> component, for a single component folder
COMPONENT_CLASSES = {
    "UNet2DConditionModel": "unet",
    "AutoencoderKL": "vae",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2",
}


@dataclass(frozen=True)
class WeightFile:
    """One physical file holding tensors: its kind and the parsed header / scan; ``prefix`` is added to its names."""

    path: Path
    kind: str  # "safetensors" | "ckpt"
    parsed: object  # SafetensorsFile | CkptFile
    prefix: str = ""


@dataclass
class Checkpoint:
    """What is stored where: entries by stored name (diffusers names get a ``<folder>/`` prefix)."""

    path: Path
    format: str
    entries: list[TensorEntry]
    metadata: dict[str, str]
    files: list[WeightFile]
    component: dict[str, str]  # stored name -> unet | vae | clip_l | openclip | other
    sd_name: dict[str, str]  # stored name -> SD name (identity for SD files; absent when unknown)
    variant: str = "unknown"
    variant_reason: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return FORMAT_LABELS[self.format]


INSPECTABLE = ("folder", "ckpt", "sd", "ms-safetensors", "partial", "diffusers-weights", "safetensors", "no-tensors")


def sniff_format(path: Path) -> str:
    """``safetensors``, ``ckpt`` or ``diffusers`` from what is on disk (``formats.sniff``: content first).

    Files this tool does not read (PyTorch pickles, LoRAs, empty files) are refused with what they are and which
    command takes them.
    """
    found = expect(sniff(path, partial_of), INSPECTABLE, "inspect / diff", "a checkpoint file or a diffusers folder")
    if found.kind == "folder":
        return "diffusers"
    return "ckpt" if found.kind == "ckpt" else "safetensors"


def _detect(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], path: Path) -> tuple[str, str, list[str]]:
    """Variant (a row of ``sdxl.variants`` or unknown), the reason, and notes; unknown is not an error here."""
    try:
        found = infer_architecture(shapes, metadata, path=path).detection
    except SdxlCkptError as err:
        message = str(err).removeprefix(f"{path}: ")
        return "unknown", message, []
    assert found is not None
    return found.variant, found.reason, [found.note] if found.note else []


def _ms_to_sd(names: list[str], variant: str) -> dict[str, str]:
    """MindSpore -> SD names by the rename rules (a name the rules would not give back stays unmapped)."""
    if variant == "unknown":
        return {}
    out = {}
    for name in names:
        sd = sd_name(name)
        if sd_to_ms_name(sd)[0] == name:
            out[name] = sd
    return out


def _from_tensors(
    path: Path, fmt: str, files: list[WeightFile], entries: list[TensorEntry], metadata: dict[str, str], keys: str
) -> Checkpoint:
    shapes = {e.name: e.shape for e in entries}
    if fmt == "sd" and any(n.endswith(MS_SUFFIXES) for n in shapes):
        fmt = "ms-safetensors"
    if keys == "auto":
        variant, reason, notes = _detect(shapes, metadata, path)
    else:
        variant, reason, notes = keys, "--keys", []
    names = [e.name for e in entries]
    sd_name = {n: n for n in names} if fmt == "sd" else _ms_to_sd(names, variant)
    component = {n: component_of(sd_name.get(n, n)) for n in names}
    return Checkpoint(path, fmt, entries, metadata, files, component, sd_name, variant, reason, notes)


def _open_safetensors(path: Path, keys: str) -> Checkpoint:
    parsed = read_safetensors(path)
    fmt = "ms-safetensors" if parsed.metadata.get("format") == "ms" else "sd"
    return _from_tensors(path, fmt, [WeightFile(path, "safetensors", parsed)], parsed.entries, parsed.metadata, keys)


def _open_ckpt(path: Path, keys: str) -> Checkpoint:
    parsed = scan_ckpt(path)
    metadata: dict[str, str] = {}
    ckpt = _from_tensors(path, "ckpt", [WeightFile(path, "ckpt", parsed)], parsed.entries, metadata, keys)
    ckpt.notes.append(f"{parsed.records} records; crc32 trailer {'present' if parsed.crc is not None else 'absent'}")
    return ckpt


def _prefixed(entries: list[TensorEntry], prefix: str) -> list[TensorEntry]:
    return [dataclasses.replace(e, name=prefix + e.name) for e in entries]


def _component_folder_kind(folder: Path) -> str | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"not a readable JSON file ({exc.__class__.__name__})", path=config) from None
    return COMPONENT_CLASSES.get(data.get("_class_name")) if isinstance(data, dict) else None


def _open_diffusers(path: Path, keys: str, variant: str | None) -> Checkpoint:
    single = _component_folder_kind(path)
    if single is not None:
        parts = [read_component(single, path, variant)]
        fmt = "diffusers-component"
    else:
        present = [name for name in DIFFUSERS_FOLDERS if (path / name).is_dir()]
        if not present:
            raise InputError(
                "no unet/, vae/, text_encoder*/ folders and no config.json: not a diffusers folder", path=path
            )
        parts = [read_component(name, path / name, variant) for name in present]
        fmt = "diffusers"
    files: list[WeightFile] = []
    entries: list[TensorEntry] = []
    component: dict[str, str] = {}
    notes: list[str] = []
    for part in parts:
        prefix = "" if fmt == "diffusers-component" else f"{part.name}/"
        for weight in part.weights.files:
            files.append(WeightFile(weight, "safetensors", read_safetensors(weight), prefix))
        mine = _prefixed(part.entries, prefix)
        entries += mine
        component.update({e.name: DIFFUSERS_FOLDERS[part.name] for e in mine})
        notes += [f"{part.name}: {n}" for n in part.notes]
    ckpt = Checkpoint(path, fmt, entries, {}, files, component, {}, notes=notes)
    if fmt == "diffusers":
        _detect_pipeline(ckpt, {p.name: p for p in parts}, keys)
        needed = [n for n in DIFFUSERS_FOLDERS if not (ckpt.variant == "refiner" and n == "text_encoder")]
        missing = [n for n in needed if n not in present]
        if missing:
            ckpt.notes.append(f"incomplete pipeline: no {', '.join(missing)} folder (diffusers-to-sd needs it)")
        extra = sorted(
            p.name
            for p in path.iterdir()
            if p.is_dir() and _component_folder_kind(p) == "unet" and p.name not in DIFFUSERS_FOLDERS
        )
        if extra:
            ckpt.notes.append(f"other UNet folders here (not part of the pipeline): {', '.join(extra)}")
    else:
        ckpt.variant_reason = f"a single {parts[0].name} folder: the other components decide"
        if parts[0].name == "unet":  # a UNet alone can still say what it is (guidance embedding, input channels)
            try:
                found = detect_variant("base", parts[0].config, frozenset())
            except SdxlCkptError:
                found = None
            if found is not None and found.variant in ("lcm", "inpaint", "pix2pix"):
                ckpt.variant, ckpt.variant_reason = found.variant, f"a UNet folder: {found.reason}"
    return ckpt


def _detect_pipeline(ckpt: Checkpoint, parts: dict[str, Component], keys: str) -> None:
    if keys != "auto":
        ckpt.variant, ckpt.variant_reason = keys, "--keys"
        return
    if "unet" not in parts or "text_encoder_2" not in parts:
        missing = [n for n in ("unet", "text_encoder_2") if n not in parts]
        ckpt.variant_reason = f"no {' and no '.join(missing)} folder"
        return
    try:
        _structure, found = detect_from_configs(
            parts["unet"].config,
            parts["text_encoder_2"].config,
            read_scheduler_config(ckpt.path),
            parts["vae"].config if "vae" in parts else None,
            path=ckpt.path,
        )
    except SdxlCkptError as err:
        ckpt.variant_reason = str(err)
        return
    structure_reason = "UNet added-conditioning width (addition_time_embed_dim)"
    ckpt.variant = found.variant
    ckpt.variant_reason = structure_reason if found.variant == _structure else f"{found.reason} (from the configs)"
    if found.note:
        ckpt.notes.append(found.note)


def open_checkpoint(path: str | Path, *, keys: str = "auto", weight_variant: str | None = None) -> Checkpoint:
    """Describe ``path`` (file or diffusers folder) from headers only; ``keys`` forces the variant's keymap."""
    if keys != "auto" and keys not in VARIANT_NAMES:
        raise InputError(f"--keys must be auto or one of {', '.join(VARIANT_NAMES)}, not {keys!r}")
    path = Path(path)
    kind = sniff_format(path)
    if kind == "diffusers":
        return _open_diffusers(path, keys, weight_variant)
    if kind == "ckpt":
        return _open_ckpt(path, keys)
    return _open_safetensors(path, keys)
