"""``sdxl-ckpt lora convert``: one LoRA format to another, every key mapped name to name through the module index.

Every source key must name a module of the structure (unknown keys are refused with their names); the scale
alpha / rank of every module is carried over (see ``lora.write`` for how each target stores it). Output is
written atomically: safetensors for kohya / PEFT, a MindSpore ckpt for mindone.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.formats.atomic import check_output
from sdxl_ckpt.lora.read import read_lora
from sdxl_ckpt.lora.write import TARGETS, kohya_entries, mindone_entries, peft_entries, peft_metadata
from sdxl_ckpt.report import render_table


def convert_lora(
    src: str | Path,
    output: str | Path,
    *,
    to: str,
    alpha: float | None = None,
    kohya_names: str = "sgm",
    allow_undeclared: bool = False,
    overwrite: bool = False,
    quiet: bool = True,
) -> dict[str, Any]:
    """Convert ``src`` to format ``to`` at ``output``; returns the report."""
    from sdxl_ckpt.formats.ckpt_io import write_ckpt
    from sdxl_ckpt.formats.safetensors_io import write_safetensors

    if to not in TARGETS:
        raise InputError(f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    check_output(output, overwrite)
    lora = read_lora(src, alpha=alpha)
    notes = list(lora.notes)
    if to == "kohya":
        entries = kohya_entries(lora.groups, lora.structure, kohya_names)
        write_safetensors(output, entries, {"ss_network_module": "networks.lora"}, overwrite=overwrite, quiet=quiet)
    elif to == "peft":
        entries = peft_entries(lora.groups)
        write_safetensors(output, entries, peft_metadata(lora.groups), overwrite=overwrite, quiet=quiet)
    else:
        entries = mindone_entries(lora.groups, allow_undeclared)
        write_ckpt(output, entries, overwrite=overwrite, quiet=quiet)
        folded = sum(g.scale != 1.0 for g in lora.groups)
        notes.append(
            f"mindone stores no alpha: scale alpha/rank folded into lora_B for {folded} of {len(lora.groups)} "
            "modules; load with lora_alpha unset (= rank)"
        )
    defaulted = [g for g in lora.groups if g.alpha_source == "default (= rank)"]
    if defaulted and lora.format in ("peft", "old-diffusers", "mindone"):
        notes.append(f"{len(defaulted)} modules had no alpha in the source: alpha = rank (give --alpha to change)")
    rows = [
        {
            "component": c,
            "modules": n,
            "ranks": ", ".join(str(r) for r in sorted({g.rank for g in lora.groups if g.module.component == c})),
        }
        for c, n in sorted(Counter(g.module.component for g in lora.groups).items())
    ]
    return {
        "command": "lora convert",
        "source": str(src),
        "source_format": lora.format,
        "structure": lora.structure,
        "output": str(output),
        "target_format": to,
        "kohya_names": kohya_names if to == "kohya" else None,
        "modules": len(lora.groups),
        "tensors": len(entries),
        "components": rows,
        "alpha_sources": dict(Counter(g.alpha_source for g in lora.groups)),
        "notes": notes,
    }


def render_convert(report: dict[str, Any]) -> str:
    lines = [
        f"{report['source']} ({report['source_format']}, SDXL {report['structure']}) -> "
        f"{report['output']} ({report['target_format']}): {report['modules']} modules, {report['tensors']} tensors"
    ]
    lines.append(render_table(report["components"]))
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
