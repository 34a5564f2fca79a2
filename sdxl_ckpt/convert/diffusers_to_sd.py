"""diffusers SDXL folder -> one SD-layout safetensors file, streamed: plan every name from headers, then copy.

Composition: ``diffusers_folder`` (lazy entries per component) -> ``keymaps.diffusers_sd`` (names + transforms)
-> lazy SD entries (transform and cast inside each loader) -> ``safetensors_io.write_safetensors`` (one tensor in
memory at a time). Everything that can be wrong with the input (missing folders, ambiguous weights, unexpected
keys, shapes a transform cannot take) is found while planning, before the output file is created.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from sdxl_ckpt.formats.atomic import check_output, output_format
from sdxl_ckpt.formats.digest import ContentDigest
from sdxl_ckpt.formats.safetensors_io import write_safetensors
from sdxl_ckpt.formats.sniff import expect, sniff
from sdxl_ckpt.keymaps.diffusers_plan import plan_sd_entries


def convert_diffusers_to_sd(
    src_dir: str | Path,
    out: str | Path,
    unet_dir: str | Path | None = None,
    vae_dir: str | Path | None = None,
    variant: str | None = None,
    dtype: str | None = None,
    lcm: bool = False,
    overwrite: bool = False,
    quiet: bool = True,
    hash_content: bool = False,
) -> dict[str, Any]:
    """Write the SD file for ``src_dir`` at ``out`` (atomic, streaming) and return the report.

    ``hash_content``: the data section is hashed as it is written, stored as ModelSpec ``modelspec.hash_sha256``
    and reported as ``content_sha256`` (what ``inspect --hash`` shows for the file); off, no byte is hashed.
    """
    start = time.perf_counter()
    output_format(out, None, ("safetensors",), "diffusers-to-sd")
    out = check_output(out, overwrite, inputs=(src_dir, unet_dir, vae_dir))
    for folder in (src_dir, unet_dir, vae_dir):
        if folder is not None:
            expect(sniff(folder), ("folder",), "diffusers-to-sd", "a diffusers folder")
    entries, metadata, report = plan_sd_entries(src_dir, unet_dir, vae_dir, variant, dtype, lcm)
    with ContentDigest() if hash_content else nullcontext() as digest:
        write_safetensors(
            out, entries, metadata, overwrite=overwrite, quiet=quiet, desc="diffusers-to-sd", digest=digest
        )
        report["content_sha256"] = digest.value() if digest is not None else None
    report["output"] = str(out)
    report["file_bytes"] = out.stat().st_size
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def render_report(report: dict[str, Any]) -> str:
    """The human-readable report: one row per component, then dropped keys and notes."""
    from sdxl_ckpt.report import human_bytes, render_table

    rows = [
        {
            "component": r["component"],
            "keys in": r["keys_in"],
            "written": r["written"],
            "transformed": r["transformed"],
            "generated": len(r["generated"]),
            "dropped": r["dropped"],
            "dtypes": " ".join(f"{k}:{v}" for k, v in r["dtypes"].items()),
            "size": human_bytes(r["bytes"]),
        }
        for r in report["components"]
    ]
    lines = [
        f"{report['source']} -> {report.get('output', '(planned)')}  "
        f"[{report['variant']}, {report['architecture']} layout, dtype {report['dtype']}]",
        render_table(rows),
    ]
    for d in report["dropped"]:
        lines.append(f"dropped {d['component']}:{d['key']}: {d['reason']}")
    lines += [f"note: {n}" for n in report["notes"]]
    total = f"{report['tensors']} tensors, {human_bytes(report['bytes'])}"
    if "seconds" in report:
        total += f" in {report['seconds']:.2f} s"
    lines.append(total)
    if report.get("content_sha256"):
        lines.append(f"content sha256 (modelspec.hash_sha256, as inspect --hash shows it): {report['content_sha256']}")
    return "\n".join(lines)
