"""``sdxl-ckpt lora inspect``: what a LoRA file is (format, structure), what it patches and with which rank / alpha."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from sdxl_ckpt.lora.read import read_lora
from sdxl_ckpt.report import key_listing, render_table


def _values(values: list[Any]) -> str:
    counts = Counter(values)
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in sorted(counts))


def inspect_lora(path: str | Path, *, alpha: float | None = None) -> dict[str, Any]:
    """The report of ``lora inspect`` (headers and the alpha scalars only; no factor is read)."""
    lora = read_lora(path, alpha=alpha, strict=False)
    rows = []
    for component in ("unet", "text_encoder", "text_encoder_2"):
        mine = [g for g in lora.groups if g.module.component == component]
        if not mine:
            continue
        rows.append(
            {
                "component": component,
                "modules": len(mine),
                "ranks": _values([g.rank for g in mine]),
                "alphas": _values([g.alpha for g in mine]),
                "scales": _values([round(g.scale, 6) for g in mine]),
                "kinds": ", ".join(f"{k} {n}" for k, n in sorted(Counter(g.kind for g in mine).items())),
                "alpha from": ", ".join(sorted({g.alpha_source for g in mine})),
            }
        )
    return {
        "command": "lora inspect",
        "path": str(lora.path),
        "format": lora.format,
        "structure": lora.structure,
        "components": rows,
        "modules": [
            {
                "module": g.module.label,
                "sd_key": g.module.sd_key,
                "part": g.module.part,
                "rank": g.rank,
                "alpha": g.alpha,
                "alpha_source": g.alpha_source,
                "kind": g.kind,
                "keys": g.keys,
            }
            for g in lora.groups
        ],
        "unmatched": lora.unmatched,
        "notes": lora.notes,
    }


def render_inspect(report: dict[str, Any]) -> str:
    lines = [f"{report['path']}: {report['format']} LoRA for SDXL {report['structure']}"]
    lines.append(render_table(report["components"]))
    lines += key_listing("unmatched keys (no module of this structure)", report["unmatched"])
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
