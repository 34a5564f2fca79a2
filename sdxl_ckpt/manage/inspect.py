"""``sdxl-ckpt inspect``: what a checkpoint is, from its header or record scan alone (tensor bytes only with --hash).

The report answers the questions asked before converting a file of unknown origin: which layout and SDXL variant,
which components with how many tensors / parameters / bytes in which dtypes, what metadata, which keys belong to
no known component, and (with ``--hash``) content hashes and any NaN / Inf values.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from sdxl_ckpt.formats.ckpt_io import verify_crc
from sdxl_ckpt.formats.safetensors_io import SafetensorsFile
from sdxl_ckpt.manage.hashing import ContentHash, TensorDigest, component_hash, hash_entries, hash_safetensors
from sdxl_ckpt.manage.sources import Checkpoint, open_checkpoint
from sdxl_ckpt.report import human_bytes, key_listing, render_table
from sdxl_ckpt.sdxl.components import COMPONENTS

MODELSPEC_HASH = "modelspec.hash_sha256"
SHOWN_VALUE_CHARS = 100
SHOWN_KEYS = 20


def _dtype_counts(dtypes: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(dtypes).items()))


def _hash_files(ckpt: Checkpoint, quiet: bool) -> tuple[list[dict[str, Any]], dict[str, TensorDigest]]:
    """Hash every weight file in one pass each; per-tensor digests keyed by stored (prefixed) name."""
    rows: list[dict[str, Any]] = []
    digests: dict[str, TensorDigest] = {}
    for weight in ckpt.files:
        if isinstance(weight.parsed, SafetensorsFile):
            result: ContentHash = hash_safetensors(weight.parsed, quiet=quiet)
            stored = weight.parsed.metadata.get(MODELSPEC_HASH)
            convention = "modelspec: sha256 of the bytes after the header"
        else:
            result = hash_entries(weight.parsed.entries, quiet=quiet, desc=f"hashing {weight.path.name}")
            stored = None
            convention = "sha256 of the tensor contents in record order"
            if verify_crc(weight.parsed):  # a stored crc32 that does not match raises CorruptFileError
                convention += "; crc32 trailer verified"
        row = {
            "file": str(weight.path),
            "content_sha256": result.content_sha256,
            "bytes_hashed": result.nbytes,
            "convention": convention,
        }
        if stored is not None:
            row["stored_hash_sha256"] = stored
            row["stored_hash_matches"] = stored.lower() == result.content_sha256
        rows.append(row)
        digests.update({weight.prefix + name: digest for name, digest in result.tensors.items()})
    return rows, digests


def inspect_checkpoint(
    path: str | Path,
    *,
    keys: str = "auto",
    with_hash: bool = False,
    quiet: bool = True,
    weight_variant: str | None = None,
) -> dict[str, Any]:
    """The inspect report of ``path`` as a JSON-ready dict (``render_inspect`` turns it into text)."""
    start = time.perf_counter()
    ckpt = open_checkpoint(path, keys=keys, weight_variant=weight_variant)
    scan_seconds = time.perf_counter() - start
    by_component: dict[str, list] = {c: [] for c in COMPONENTS}
    for entry in ckpt.entries:
        by_component[ckpt.component[entry.name]].append(entry)
    report: dict[str, Any] = {
        "command": "inspect",
        "path": str(ckpt.path),
        "format": ckpt.format,
        "format_label": ckpt.label,
        "variant": ckpt.variant,
        "variant_reason": ckpt.variant_reason,
        "files": [{"file": str(w.path), "bytes": w.path.stat().st_size} for w in ckpt.files],
        "file_bytes": sum(w.path.stat().st_size for w in ckpt.files),
        "tensors": len(ckpt.entries),
        "parameters": sum(e.numel for e in ckpt.entries),
        "tensor_bytes": sum(e.nbytes for e in ckpt.entries),
        "dtypes": _dtype_counts([e.dtype for e in ckpt.entries]),
        "components": [
            {
                "component": c,
                "tensors": len(items),
                "parameters": sum(e.numel for e in items),
                "bytes": sum(e.nbytes for e in items),
                "dtypes": _dtype_counts([e.dtype for e in items]),
            }
            for c, items in by_component.items()
            if items
        ],
        "unknown_keys": [e.name for e in by_component["other"]],
        "metadata": ckpt.metadata,
        "notes": list(ckpt.notes),
        "scan_seconds": round(scan_seconds, 4),
    }
    if ckpt.format in ("ms-safetensors", "ckpt") and ckpt.variant != "unknown":
        unmapped = [e.name for e in ckpt.entries if e.name not in ckpt.sd_name]
        if unmapped:
            report["notes"].append(
                f"{len(unmapped)} names are not MindSpore names of the {ckpt.variant} keymap, e.g. {unmapped[0]!r}"
            )
    if (
        ckpt.format == "sd"
        and ckpt.entries
        and len(by_component["other"]) == len(ckpt.entries)
        and (ckpt.path.parent / "config.json").is_file()
    ):
        report["notes"].append(
            "no SD names here: this looks like one diffusers component's weight file; "
            f"inspect its folder ({ckpt.path.parent}) or the pipeline folder instead"
        )
    tensors = [
        {
            "name": e.name,
            "sd_name": ckpt.sd_name.get(e.name),
            "component": ckpt.component[e.name],
            "dtype": e.dtype,
            "shape": list(e.shape),
            "bytes": e.nbytes,
        }
        for e in ckpt.entries
    ]
    if with_hash:
        hash_start = time.perf_counter()
        report["hashes"], digests = _hash_files(ckpt, quiet)
        for row in report["components"]:
            mine = {ckpt.sd_name.get(e.name, e.name): digests[e.name] for e in by_component[row["component"]]}
            row["sha256"] = component_hash(mine)
        for item in tensors:
            digest = digests[item["name"]]
            item["sha256"] = digest.sha256
            item["nan"], item["inf"] = digest.nonfinite.nan, digest.nonfinite.inf
        report["nonfinite"] = [
            {"key": t["name"], "nan": t["nan"], "inf": t["inf"]} for t in tensors if t["nan"] or t["inf"]
        ]
        report["hash_seconds"] = round(time.perf_counter() - hash_start, 3)
    report["tensor_list"] = tensors
    return report


def _short(value: str) -> str:
    flat = " ".join(value.split())
    if len(flat) <= SHOWN_VALUE_CHARS:
        return flat
    return f"{flat[:SHOWN_VALUE_CHARS]}... ({len(value)} chars)"


def _relative(file: str, root: str) -> str:
    """A weight file's path inside the inspected folder (its name when the inspected path is the file)."""
    path, base = Path(file), Path(root)
    return str(path.relative_to(base)) if base.is_dir() and path.is_relative_to(base) else path.name


def render_inspect(report: dict[str, Any]) -> str:
    """The human-readable inspect report (the JSON form has every tensor)."""
    lines = [
        f"{report['path']}: {report['format_label']}",
        f"variant: {report['variant']} ({report['variant_reason']})",
        f"{len(report['files'])} file(s), {human_bytes(report['file_bytes'])}; {report['tensors']} tensors, "
        f"{report['parameters']:,} parameters, {human_bytes(report['tensor_bytes'])} of tensor data; dtypes "
        + " ".join(f"{k}:{v}" for k, v in report["dtypes"].items()),
    ]
    columns = ["component", "tensors", "parameters", "size", "dtypes"]
    rows = []
    for row in report["components"]:
        shown = {
            "component": row["component"],
            "tensors": row["tensors"],
            "parameters": row["parameters"],
            "size": human_bytes(row["bytes"]),
            "dtypes": " ".join(f"{k}:{v}" for k, v in row["dtypes"].items()),
        }
        if "sha256" in row:
            shown["sha256"] = row["sha256"]
        rows.append(shown)
    lines.append(render_table(rows, columns + (["sha256"] if any("sha256" in r for r in rows) else [])))
    lines += key_listing("keys in no known component", report["unknown_keys"], SHOWN_KEYS) or [
        "keys in no known component: none"
    ]
    metadata = report["metadata"]
    lines.append(f"metadata ({len(metadata)} keys)" + (":" if metadata else ""))
    lines += [f"  {k}: {_short(v)}" for k, v in metadata.items()]
    for row in report.get("hashes", []):
        check = ""
        if "stored_hash_matches" in row:
            check = (
                "  (matches modelspec.hash_sha256)"
                if row["stored_hash_matches"]
                else f"  MISMATCH: modelspec.hash_sha256 says {row['stored_hash_sha256']}"
            )
        lines.append(f"content sha256 {_relative(row['file'], report['path'])}: {row['content_sha256']}{check}")
    if "nonfinite" in report:
        bad = report["nonfinite"]
        lines.append("non-finite values: none" if not bad else f"non-finite values in {len(bad)} tensor(s):")
        lines += [f"  {b['key']}: {b['nan']} NaN, {b['inf']} Inf" for b in bad[:SHOWN_KEYS]]
    lines += [f"note: {n}" for n in report["notes"]]
    timing = f"header scan {report['scan_seconds']:.3f} s"
    if "hash_seconds" in report:
        timing += f", hashing {report['hash_seconds']:.2f} s"
    lines.append(timing)
    return "\n".join(lines)


def warn_report(report: dict[str, Any]) -> None:
    """Problems that must not go unseen, as ``warning:`` lines on stderr (the report itself goes to stdout)."""
    import sys

    bad = report.get("nonfinite") or []
    if bad:
        first = bad[0]
        print(
            f"warning: {len(bad)} tensor(s) hold NaN / Inf values, e.g. key {first['key']!r}: "
            f"{first['nan']} NaN, {first['inf']} Inf",
            file=sys.stderr,
        )
    for row in report.get("hashes", []):
        if row.get("stored_hash_matches") is False:
            print(
                f"warning: {row['file']}: content does not match its modelspec.hash_sha256 "
                f"(corrupt or modified after hashing)",
                file=sys.stderr,
            )
