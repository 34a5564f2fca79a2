"""``sdxl-ckpt lora merge``: add LoRA deltas to a base checkpoint, streaming, in the same or another layout.

The base is read lazily (SD safetensors, MindSpore ckpt, or a diffusers folder through the diffusers -> SD plan) and
seen under SD names; a LoRA module's weight is the SD tensor its module-index entry names. Only the tensors a LoRA
touches are computed: base value in fp32 + ratio * scale * delta of every LoRA on it (q/k/v into their third of
OpenCLIP's ``in_proj_weight``, ``text_projection`` transposed), stored back in the base tensor's dtype. Every other
tensor keeps its loader and byte span, so the writers copy it byte for byte. One tensor is in memory at a time.

Layouts out: ``sd`` (SD safetensors) or ``ckpt`` (MindSpore names through the variant's keymap). A MindSpore base
can only be written as ckpt (``ms-to-st`` turns the result into an SD file: it restores what MindSpore drops).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_ckpt.errors import InputError, KeyMismatchError
from sdxl_ckpt.formats.atomic import check_output
from sdxl_ckpt.formats.dtypes import cast_array, numpy_dtype, to_float32
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.keymaps.sd_ms import sd_to_ms_name
from sdxl_ckpt.lora.delta import delta_on_sd, lora_delta
from sdxl_ckpt.lora.read import LoraFile, LoraGroup, read_lora
from sdxl_ckpt.report import render_table
from sdxl_ckpt.sdxl.architecture import sd_name as sd_name_of

LAYOUTS = ("sd", "ckpt")
MS_SUFFIXES = (".gamma", ".beta", ".embedding_table")


@dataclasses.dataclass
class Base:
    """The base checkpoint: lazy entries under their stored names, the SD name of each, variant, layout."""

    path: Path
    layout: str  # "sd" | "ckpt" | "diffusers"
    entries: list[TensorEntry]
    sd_name: dict[str, str]  # stored name -> SD name
    variant: str
    metadata: dict[str, str]


def _variant(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], path: Path, keys: str) -> str:
    from sdxl_ckpt.sdxl.architecture import infer_architecture

    return keys if keys != "auto" else infer_architecture(shapes, metadata, path=path).variant


def open_base(path: str | Path, keys: str = "auto") -> Base:
    """Read the base's headers: an SD or MindSpore-named safetensors, a MindSpore ckpt, or a diffusers folder."""
    from sdxl_ckpt.formats.ckpt_io import scan_ckpt
    from sdxl_ckpt.formats.safetensors_io import read_safetensors

    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path=path)
    if path.is_dir():
        from sdxl_ckpt.keymaps.diffusers_plan import plan_sd_entries

        entries, metadata, plan = plan_sd_entries(path)
        return Base(path, "diffusers", entries, {e.name: e.name for e in entries}, plan["variant"], metadata)
    with open(path, "rb") as handle:
        head = handle.read(9)
    if path.suffix == ".ckpt" or head[:1] == b"\x0a":
        entries, metadata, layout = scan_ckpt(path).entries, {}, "ckpt"
    else:
        parsed = read_safetensors(path)
        entries, metadata = parsed.entries, parsed.metadata
        layout = "ckpt" if any(e.name.endswith(MS_SUFFIXES) for e in entries) else "sd"
    variant = _variant({e.name: e.shape for e in entries}, metadata, path, keys)
    if layout == "sd":
        sd_name = {e.name: e.name for e in entries}
    else:
        sd_name = {e.name: sd_name_of(e.name) for e in entries}
    return Base(path, layout, entries, sd_name, variant, metadata)


def _merged_loader(
    entry: TensorEntry, sd_key: str, patches: list[tuple[LoraGroup, float]], stats: dict[str, Any]
) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        weight = to_float32(entry.load(), entry.dtype).astype(np.float32, copy=True)
        total = np.zeros_like(weight)
        for group, ratio in patches:
            delta = lora_delta(group.down, group.up, group.mid, group.scale * ratio)
            total += delta_on_sd(delta, group.module.transform, group.module.part, entry.shape, sd_key)
        base_norm = float(np.linalg.norm(weight))
        weight += total
        stats[sd_key] = {
            "relative_change": float(np.linalg.norm(total)) / base_norm if base_norm else math.inf,
            "max_abs_change": float(np.abs(total).max()) if total.size else 0.0,
        }
        return np.ascontiguousarray(cast_array(weight, "F32", entry.dtype)).reshape(entry.shape)

    return load


def _output_layout(base: Base, to: str | None) -> str:
    layout = to or ("ckpt" if base.layout == "ckpt" else "sd")
    if layout not in LAYOUTS:
        raise InputError(f"--to must be sd or ckpt, not {layout!r}")
    if base.layout == "ckpt" and layout == "sd":
        raise InputError(
            "a MindSpore base is merged into a ckpt (--to ckpt); `ms-to-st` then writes the SD file", path=base.path
        )
    return layout


def merge_loras(
    base_path: str | Path,
    lora_paths: list[str | Path],
    output: str | Path,
    *,
    ratios: list[float] | None = None,
    to: str | None = None,
    alpha: float | None = None,
    keys: str = "auto",
    overwrite: bool = False,
    quiet: bool = True,
) -> dict[str, Any]:
    """Merge ``lora_paths`` (each times its ratio, default 1) into ``base_path``; write ``output``; the report."""
    from sdxl_ckpt.formats.ckpt_io import write_ckpt
    from sdxl_ckpt.formats.safetensors_io import write_safetensors
    from sdxl_ckpt.sdxl.variants import structure_of

    ratios = list(ratios or [])
    if len(ratios) > len(lora_paths):
        raise InputError(f"{len(ratios)} --ratio values for {len(lora_paths)} LoRA files")
    ratios += [1.0] * (len(lora_paths) - len(ratios))
    check_output(output, overwrite)
    base = open_base(base_path, keys)
    layout = _output_layout(base, to)
    structure = structure_of(base.variant)
    loras: list[LoraFile] = [read_lora(p, alpha=alpha, structure=structure) for p in lora_paths]
    by_sd = {base.sd_name[e.name]: e for e in base.entries if e.name in base.sd_name}
    patches: dict[str, list[tuple[LoraGroup, float]]] = {}
    for lora, ratio in zip(loras, ratios):
        for group in lora.groups:
            if group.module.sd_key not in by_sd:
                raise KeyMismatchError(
                    f"the base has no tensor {group.module.sd_key!r} for LoRA module {group.module.label}",
                    path=lora.path,
                    key=group.keys[0],
                )
            patches.setdefault(group.module.sd_key, []).append((group, ratio))
    stats: dict[str, dict[str, float]] = {}
    planned: list[TensorEntry] = []
    dropped: list[str] = []
    renaming = layout == "ckpt" and base.layout != "ckpt"  # SD names -> MindSpore names, as st-to-ms renames
    for entry in base.entries:
        sd_key = base.sd_name.get(entry.name)
        if sd_key in patches:
            entry = dataclasses.replace(entry, loader=_merged_loader(entry, sd_key, patches[sd_key], stats))
        if renaming:
            ms, rule = sd_to_ms_name(entry.name)
            if ms is None:
                dropped.append(entry.name)
                continue
            entry = dataclasses.replace(entry, name=ms)
            if rule.dtype is not None:  # an integer buffer mindone declares with another integer type
                entry = _as_dtype(entry, rule.dtype)
        planned.append(entry)
    if layout == "sd":
        metadata = dict(base.metadata)
        metadata["sdxl_ckpt.lora"] = ", ".join(f"{Path(p).name}*{r:g}" for p, r in zip(lora_paths, ratios))
        write_safetensors(output, planned, metadata, overwrite=overwrite, quiet=quiet, desc="lora merge")
    else:
        write_ckpt(output, planned, overwrite=overwrite, quiet=quiet, desc="lora merge")
    touched = [
        {
            "tensor": key,
            "modules": ", ".join(
                g.module.module + (f"[{'qkv'[g.module.part]}]" if g.module.part is not None else "")
                for g, _ in patches[key]
            ),
            "loras": len(patches[key]),
            **stats.get(key, {}),
        }
        for key in patches
    ]
    return {
        "command": "lora merge",
        "base": str(base.path),
        "base_layout": base.layout,
        "variant": base.variant,
        "output": str(output),
        "output_layout": layout,
        "loras": [
            {"path": str(lo.path), "format": lo.format, "ratio": r, "modules": len(lo.groups), "notes": lo.notes}
            for lo, r in zip(loras, ratios)
        ],
        "tensors": len(planned),
        "touched": touched,
        "copied": len(planned) - len(touched),
        "dropped": dropped,
    }


def render_merge(report: dict[str, Any], shown: int = 15) -> str:
    lines = [
        f"{report['base']} ({report['base_layout']}, {report['variant']}) + {len(report['loras'])} LoRA -> "
        f"{report['output']} ({report['output_layout']}): {len(report['touched'])} tensors merged, "
        f"{report['copied']} copied unchanged"
    ]
    lines.append(render_table([{k: v for k, v in lo.items() if k != "notes"} for lo in report["loras"]]))
    rows = sorted(report["touched"], key=lambda r: -r.get("relative_change", 0.0))
    lines.append(render_table(rows[:shown], ["tensor", "loras", "relative_change", "max_abs_change"]))
    if len(rows) > shown:
        lines.append(f"... and {len(rows) - shown} more (see --json)")
    if report["dropped"]:
        lines.append(f"not written to the ckpt (MindSpore has no such parameter): {', '.join(report['dropped'])}")
    return "\n".join(lines)


def _as_dtype(entry: TensorEntry, dtype: str) -> TensorEntry:
    """The same integer values in another integer dtype (mindone's int32 ``position_ids``)."""
    target = numpy_dtype(dtype)
    return dataclasses.replace(entry, dtype=dtype, loader=lambda: entry.load().astype(target))
