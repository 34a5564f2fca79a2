"""``sdxl-ckpt diff A B``: compare two checkpoints of any layout, tensor by tensor under their SD names.

Both sides are opened from headers (``manage.sources``); MindSpore names are mapped to SD names through the keymap
and a diffusers folder through the diffusers -> SD plan (with its transforms), so an SD file, its ckpt and its
diffusers folder all compare name to name. Then one tensor pair at a time is loaded and compared:
- ``identical``: same shape, same dtype, same bytes;
- ``dtype``: different dtypes whose values are equal once both are widened (e.g. F16 vs F32 of the same numbers);
- ``values``: values differ: max |a - b|, max relative difference max |a - b| / max |a| (A is the reference),
  and how many elements differ (NaN against NaN counts as equal, NaN against a number as a difference);
- ``shape``: shapes differ (values not compared).
MindSpore's int32 ``position_ids`` is compared as the int64 the SD layout holds; a ckpt from before it was kept
lacks it, and that is listed as not comparable, not as a difference.
Exit status: 0 identical, 1 any difference, 2 bad input.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.formats.dtypes import to_float32
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.formats.nonfinite import count_nonfinite
from sdxl_ckpt.keymaps import load_keymap
from sdxl_ckpt.keymaps.diffusers_plan import plan_sd_entries
from sdxl_ckpt.keymaps.sd_ms import sd_to_ms_name
from sdxl_ckpt.manage.sources import Checkpoint, open_checkpoint
from sdxl_ckpt.progress import byte_bar
from sdxl_ckpt.report import key_listing, render_table
from sdxl_ckpt.sdxl.components import COMPONENTS, component_of
from sdxl_ckpt.sdxl.variants import structure_of

CHUNK_ELEMENTS = 4 * 1024 * 1024  # widened values are compared in chunks to bound memory
SHOWN = 20
MS_FORMATS = ("ckpt", "ms-safetensors")


@dataclass
class Side:
    """One side of a diff: the checkpoint, its entries under SD names, and SD keys its format cannot store."""

    ckpt: Checkpoint
    entries: dict[str, TensorEntry]
    cannot_store: dict[str, str]  # SD key -> why


def _side(path: str | Path, keys: str, weight_variant: str | None) -> Side:
    ckpt = open_checkpoint(path, keys=keys, weight_variant=weight_variant)
    if ckpt.format == "diffusers-component":
        raise InputError("diff needs a whole pipeline folder (or a single file), not one component folder", path=path)
    if ckpt.format == "diffusers":
        planned, _metadata, _report = plan_sd_entries(path, variant=weight_variant, lcm=keys == "lcm")
        return Side(ckpt, {e.name: e for e in planned}, {})
    if ckpt.format in MS_FORMATS and ckpt.variant == "unknown":
        raise InputError(f"cannot map MindSpore names to SD names: {ckpt.variant_reason}; pass --keys", path=path)
    entries = {ckpt.sd_name.get(e.name, e.name): e for e in ckpt.entries}
    cannot: dict[str, str] = {}
    if ckpt.format in MS_FORMATS:
        for name, entry in list(entries.items()):
            if sd_to_ms_name(name)[1].dtype is not None and entry.dtype != "I64":  # int32 by rule, int64 in SD
                entries[name] = TensorEntry(
                    name, "I64", entry.shape, lambda e=entry: e.load().astype(np.int64), source=entry.source
                )
        keymap = load_keymap(structure_of(ckpt.variant))
        ids = [s for s in keymap.optional_sd if s.endswith(".position_ids") and s not in entries]
        cannot.update({name: "ckpts written before it was kept do not hold it" for name in ids})
    return Side(ckpt, entries, cannot)


def _wide(array: np.ndarray, dtype: str, wide: type) -> np.ndarray:
    if dtype == "BF16":
        return to_float32(array, dtype).astype(wide, copy=False)
    return array.astype(wide, copy=False)


def compare_arrays(a: np.ndarray, a_dtype: str, b: np.ndarray, b_dtype: str) -> dict[str, Any]:
    """max_abs, max_rel, differing elements and NaN mismatches of two same-shape arrays (chunked)."""
    wide = np.float32 if {a_dtype, b_dtype} <= {"F16", "BF16", "F32"} else np.float64
    fa, fb = a.reshape(-1), b.reshape(-1)
    max_abs, ref, differing, nan_mismatch = 0.0, 0.0, 0, 0
    for start in range(0, max(fa.size, 1), CHUNK_ELEMENTS):
        xa = _wide(fa[start : start + CHUNK_ELEMENTS], a_dtype, wide)
        xb = _wide(fb[start : start + CHUNK_ELEMENTS], b_dtype, wide)
        na, nb = np.isnan(xa), np.isnan(xb)
        nan_mismatch += int(np.count_nonzero(na != nb))
        same = (xa == xb) | (na & nb)
        differing += int(np.count_nonzero(~same))
        both = ~(na | nb) & ~same  # numbers on both sides that differ (inf vs number gives inf)
        if both.any():
            with np.errstate(invalid="ignore", over="ignore"):
                max_abs = max(max_abs, float(np.max(np.abs(xa[both] - xb[both]))))
        finite_a = xa[np.isfinite(xa)]
        if finite_a.size:
            ref = max(ref, float(np.max(np.abs(finite_a))))
    if max_abs == 0.0:
        max_rel = 0.0
    else:
        max_rel = max_abs / ref if ref > 0 else float("inf")
    return {"max_abs": max_abs, "max_rel": max_rel, "differing": differing, "nan_mismatch": nan_mismatch}


def compare_entries(key: str, a: TensorEntry, b: TensorEntry) -> dict[str, Any]:
    """Load one pair and compare it; the row says which kind of difference (if any) it is."""
    row: dict[str, Any] = {
        "key": key,
        "component": component_of(key),
        "a_dtype": a.dtype,
        "b_dtype": b.dtype,
        "a_shape": list(a.shape),
        "b_shape": list(b.shape),
    }
    if a.shape != b.shape:
        row["status"] = "shape"
        return row
    xa, xb = a.load(), b.load()
    row["a_nonfinite"] = count_nonfinite(xa, a.dtype)
    row["b_nonfinite"] = count_nonfinite(xb, b.dtype)
    if a.dtype == b.dtype and np.array_equal(xa.reshape(-1).view(np.uint8), xb.reshape(-1).view(np.uint8)):
        row.update(status="identical", max_abs=0.0, max_rel=0.0, differing=0, nan_mismatch=0)
        return row
    row.update(compare_arrays(xa, a.dtype, xb, b.dtype))
    row["status"] = "values" if row["differing"] else ("dtype" if a.dtype != b.dtype else "identical")
    return row


def _summary(rows: list[dict[str, Any]], only_a: list[str], only_b: list[str]) -> list[dict[str, Any]]:
    out = []
    for component in COMPONENTS:
        mine = [r for r in rows if r["component"] == component]
        a_only = sum(component_of(k) == component for k in only_a)
        b_only = sum(component_of(k) == component for k in only_b)
        if not mine and not a_only and not b_only:
            continue
        valued = [r for r in mine if "max_abs" in r]
        out.append(
            {
                "component": component,
                "compared": len(mine),
                "identical": sum(r["status"] == "identical" for r in mine),
                "different": sum(r["status"] != "identical" for r in mine),
                "only_in_a": a_only,
                "only_in_b": b_only,
                "max_abs": max((r["max_abs"] for r in valued), default=0.0),
                "max_rel": max((r["max_rel"] for r in valued), default=0.0),
            }
        )
    return out


def _not_comparable(only: list[str], other: Side, which: str) -> tuple[list[str], list[dict[str, str]]]:
    keep, skipped = [], []
    for key in only:
        if key in other.cannot_store:
            skipped.append(
                {
                    "key": key,
                    "only_in": which,
                    "why": f"{other.ckpt.label} does not store it",
                    "detail": other.cannot_store[key],
                }
            )
        else:
            keep.append(key)
    return keep, skipped


def _about(path: str | Path, side: Side) -> dict[str, Any]:
    return {"path": str(path), "format": side.ckpt.label, "variant": side.ckpt.variant, "tensors": len(side.entries)}


def diff_checkpoints(
    a: str | Path, b: str | Path, *, keys: str = "auto", quiet: bool = True, weight_variant: str | None = None
) -> dict[str, Any]:
    """Compare ``a`` and ``b`` (any supported layouts); the report's ``identical`` decides the exit status."""
    side_a, side_b = _side(a, keys, weight_variant), _side(b, keys, weight_variant)
    only_a, skipped_a = _not_comparable([k for k in side_a.entries if k not in side_b.entries], side_b, "A")
    only_b, skipped_b = _not_comparable([k for k in side_b.entries if k not in side_a.entries], side_a, "B")
    common = [k for k in side_a.entries if k in side_b.entries]
    rows: list[dict[str, Any]] = []
    total = sum(side_a.entries[k].nbytes + side_b.entries[k].nbytes for k in common)
    with byte_bar(total, "diff", quiet) as bar:
        for key in common:
            ea, eb = side_a.entries[key], side_b.entries[key]
            rows.append(compare_entries(key, ea, eb))
            bar.update(ea.nbytes + eb.nbytes)
    nonfinite = []
    for row in rows:
        fa, fb = row.pop("a_nonfinite", None), row.pop("b_nonfinite", None)
        if fa or fb:
            nonfinite.append({"key": row["key"], "a_nan": fa.nan, "a_inf": fa.inf, "b_nan": fb.nan, "b_inf": fb.inf})
    differences = [r for r in rows if r["status"] != "identical"]
    return {
        "command": "diff",
        "a": _about(a, side_a),
        "b": _about(b, side_b),
        "identical": not differences and not only_a and not only_b,
        "compared": len(rows),
        "summary": _summary(rows, only_a, only_b),
        "only_in_a": only_a,
        "only_in_b": only_b,
        "not_comparable": skipped_a + skipped_b,
        "differences": sorted(differences, key=lambda r: (r["status"] != "shape", -r.get("max_abs", 0.0))),
        "nonfinite": nonfinite,
    }


def _describe(row: Mapping[str, Any]) -> str:
    if row["status"] == "shape":
        return f"shape A {row['a_shape']} {row['a_dtype']}, B {row['b_shape']} {row['b_dtype']}"
    text = f"max abs {row['max_abs']:.4g}, max rel {row['max_rel']:.4g}, {row['differing']} elements differ"
    if row["nan_mismatch"]:
        text += f" ({row['nan_mismatch']} NaN only on one side)"
    if row["a_dtype"] != row["b_dtype"]:
        text = f"dtype {row['a_dtype']} vs {row['b_dtype']}; " + (text if row["status"] == "values" else "values equal")
    return text


def render_diff(report: dict[str, Any]) -> str:
    """The human-readable diff: per-component summary, then each kind of difference (largest first)."""
    lines = [
        f"A: {report['a']['path']} ({report['a']['format']}, {report['a']['variant']}, "
        f"{report['a']['tensors']} tensors)",
        f"B: {report['b']['path']} ({report['b']['format']}, {report['b']['variant']}, "
        f"{report['b']['tensors']} tensors)",
    ]
    lines.append(
        render_table(
            report["summary"],
            ["component", "compared", "identical", "different", "only_in_a", "only_in_b", "max_abs", "max_rel"],
        )
    )
    lines += key_listing("only in A", report["only_in_a"], SHOWN)
    lines += key_listing("only in B", report["only_in_b"], SHOWN)
    diffs = report["differences"]
    if diffs:
        lines.append(f"different tensors ({len(diffs)}):")
        lines += [f"  {r['key']}: {_describe(r)}" for r in diffs[:SHOWN]]
        if len(diffs) > SHOWN:
            lines.append(f"  ... and {len(diffs) - SHOWN} more (see --json)")
    for item in report["not_comparable"]:
        lines.append(f"not compared: {item['key']} (only in {item['only_in']}; {item['why']})")
    for item in report["nonfinite"][:SHOWN]:
        lines.append(
            f"non-finite: {item['key']}: A {item['a_nan']} NaN {item['a_inf']} Inf, "
            f"B {item['b_nan']} NaN {item['b_inf']} Inf"
        )
    verdict = (
        "identical"
        if report["identical"]
        else (
            f"different: {len(diffs)} tensor(s) differ, {len(report['only_in_a'])} only in A, "
            f"{len(report['only_in_b'])} only in B"
        )
    )
    lines.append(f"result: {verdict} ({report['compared']} tensors compared)")
    return "\n".join(lines)


def warn_diff(report: dict[str, Any]) -> None:
    """NaN / Inf found while comparing, as one ``warning:`` line on stderr."""
    bad = report["nonfinite"]
    if bad:
        print(f"warning: {len(bad)} tensor(s) hold NaN / Inf values, e.g. key {bad[0]['key']!r}", file=sys.stderr)
