"""``st-to-ms`` and ``ms-to-st``: SD safetensors <-> MindSpore ckpt, checked against the keymap, one tensor at a time.

Every input is validated before the output is opened: unknown and missing keys, dtype classes, and shapes. A
full-size input must match the keymap's shapes exactly; a smaller SDXL-shaped input (the tiny test models) must
be internally consistent: every axis carries a dimension symbol (``d320``...) and all axes with one symbol must
have one size. All problems are reported together, each naming its key; nothing is written then.
Values are never changed (``--dtype`` casts floating tensors only when asked); ``position_ids`` is dropped on the
way in and regenerated on the way out.
"""

from __future__ import annotations

import difflib
import math
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_ckpt.errors import InputError, KeyMismatchError
from sdxl_ckpt.formats.atomic import check_output
from sdxl_ckpt.formats.castpipe import cast_entry
from sdxl_ckpt.formats.ckpt_io import scan_ckpt, verify_crc, write_ckpt
from sdxl_ckpt.formats.digest import MODELSPEC_HASH, ContentDigest
from sdxl_ckpt.formats.dtypes import DTYPE_CHOICES, FLOAT_DTYPES, ITEMSIZE, target_dtype
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.formats.safetensors_io import read_safetensors, write_safetensors
from sdxl_ckpt.keymaps import VARIANTS, Keymap, KeySpec, load_keymap
from sdxl_ckpt.keymaps.mindone import check_lists, read_list
from sdxl_ckpt.sdxl.detect import Detection, detect_variant

FORMATS = ("ckpt", "safetensors")
KEY_CHOICES = ("auto", *VARIANTS)
MAX_LISTED_PROBLEMS = 40
ARCHITECTURE = {
    "base": "stable-diffusion-xl-v1-base",
    "lcm": "stable-diffusion-xl-v1-base",
    "refiner": "stable-diffusion-xl-v1-refiner",
}


@dataclass
class Check:
    """The outcome of validating an input against a keymap (raised as KeyMismatchError when ``problems``)."""

    mode: str = "full-size"  # or "structure" (SDXL-shaped, other widths)
    bindings: dict[str, int] = field(default_factory=dict)  # dimension symbol -> size in this input
    problems: list[tuple[str | None, str]] = field(default_factory=list)


def _dtype_problem(spec: KeySpec, dtype: str) -> str | None:
    if spec.dtype == "float" and dtype not in FLOAT_DTYPES:
        return f"dtype {dtype} where a floating tensor is expected"
    if spec.dtype == "int" and dtype in FLOAT_DTYPES:
        return f"dtype {dtype} where an integer tensor is expected"
    return None


def check_against_keymap(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str], keymap: Keymap) -> Check:
    """Validate SD-named ``shapes``/``dtypes`` against ``keymap``; returns the Check (problems not raised here)."""
    check = Check()
    known = keymap.by_sd
    unexpected = [name for name in shapes if name not in known]
    for name in unexpected[:MAX_LISTED_PROBLEMS]:
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.9)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        check.problems.append((name, f"unexpected key (not in the {keymap.variant} keymap){hint}"))
    for name in unexpected[MAX_LISTED_PROBLEMS:]:
        check.problems.append((name, "unexpected key"))
    for spec in keymap.specs:
        if spec.sd not in shapes and spec.required and spec.ms is not None:
            check.problems.append((spec.sd, f"missing (the {keymap.variant} keymap requires it)"))
    present = [known[name] for name in shapes if name in known]
    for spec in present:
        problem = _dtype_problem(spec, dtypes[spec.sd])
        if problem:
            check.problems.append((spec.sd, problem))
        if len(shapes[spec.sd]) != len(spec.shape):
            check.problems.append(
                (
                    spec.sd,
                    f"shape {list(shapes[spec.sd])} has rank {len(shapes[spec.sd])}; the keymap has {list(spec.shape)}",
                )
            )
    ranked = [s for s in present if len(shapes[s.sd]) == len(s.shape)]
    exact = sum(tuple(shapes[s.sd]) == s.shape for s in ranked)
    if ranked and exact * 2 >= len(ranked):
        check.mode = "full-size"
        for spec in ranked:
            if tuple(shapes[spec.sd]) != spec.shape:
                check.problems.append(
                    (spec.sd, f"shape {list(shapes[spec.sd])}; the full-size model has {list(spec.shape)}")
                )
        check.bindings = {d: n for s in ranked for d, n in zip(s.dims, s.shape)}
    else:
        check.mode = "structure"
        check.bindings = _bind_symbols(ranked, shapes, check.problems)
    return check


def _bind_symbols(
    specs: list[KeySpec], shapes: Mapping[str, tuple[int, ...]], problems: list[tuple[str | None, str]]
) -> dict[str, int]:
    """Give each dimension symbol the size most of its axes have; every other axis is a problem."""
    seen: dict[str, Counter] = {}
    where: dict[tuple[str, int], str] = {}
    for spec in specs:
        for size, symbol in zip(shapes[spec.sd], spec.dims):
            seen.setdefault(symbol, Counter())[size] += 1
            where.setdefault((symbol, size), spec.sd)
    bindings = {symbol: counts.most_common(1)[0][0] for symbol, counts in seen.items()}
    for spec in specs:
        for axis, (size, symbol) in enumerate(zip(shapes[spec.sd], spec.dims)):
            if size != bindings[symbol]:
                other = where[(symbol, bindings[symbol])]
                problems.append(
                    (
                        spec.sd,
                        f"shape {list(shapes[spec.sd])}: axis {axis} is {size} but this "
                        f"dimension ({symbol} full-size) is {bindings[symbol]} elsewhere, "
                        f"e.g. in {other!r}",
                    )
                )
    return bindings


def raise_problems(problems: list[tuple[str | None, str]], path: object) -> None:
    """One KeyMismatchError listing every problem (each with its key); no-op without problems."""
    if not problems:
        return
    lines = [f"  key {key!r}: {message}" if key else f"  {message}" for key, message in problems]
    shown = lines[:MAX_LISTED_PROBLEMS]
    if len(lines) > len(shown):
        shown.append(f"  ... and {len(lines) - len(shown)} more")
    first_key, first_message = problems[0]
    kinds = Counter(
        m.split()[0] if m.split()[0] in ("unexpected", "missing", "shape", "dtype") else "other" for _k, m in problems
    )
    summary = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
    head = (
        f"{first_message}"
        if len(problems) == 1
        else f"{len(problems)} problems ({summary}), nothing written:\n" + "\n".join(shown)
    )
    raise KeyMismatchError(head, path=path, key=first_key if len(problems) == 1 else None)


def _choose_keymap(
    keys: str, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], path: object
) -> tuple[Keymap, Detection]:
    if keys not in KEY_CHOICES:
        raise InputError(f"--keys must be one of {', '.join(KEY_CHOICES)}, not {keys!r}")
    if keys == "auto":
        detection = detect_variant(shapes, metadata, path=path)
    else:
        detection = Detection(keys, "--keys")
    return load_keymap(detection.variant), detection


class _Planner:
    """Output entries under their new names (cast when asked), and the bytes per output dtype for the report.

    With ``hash_content`` the writer also hashes every tensor byte it writes (``formats.digest``); without it no
    byte is read twice, which keeps a conversion within reach of a plain copy.
    """

    def __init__(self, hash_content: bool) -> None:
        self.bytes_by_dtype: Counter = Counter()
        self.digest = ContentDigest() if hash_content else None

    def wrap(self, entry: TensorEntry, name: str, dtype: str) -> TensorEntry:
        """``entry`` written as ``name`` in ``dtype`` (a cast when it differs: chunked on worker threads)."""
        self.bytes_by_dtype[dtype] += math.prod(entry.shape) * ITEMSIZE[dtype]
        if dtype != entry.dtype:
            return cast_entry(entry, name, dtype)
        # unchanged bytes can still be copied in the kernel
        return TensorEntry(name, dtype, entry.shape, entry.loader, source=entry.source, span=entry.passthrough_span)

    def content_hash(self) -> str | None:
        return None if self.digest is None else self.digest.value()

    def __enter__(self) -> _Planner:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.digest is not None:
            self.digest.__exit__(exc_type, exc, tb)


def _report(
    direction: str,
    src: Path,
    out: Path,
    keymap: Keymap,
    detection: Detection,
    check: Check,
    written: list[TensorEntry],
    dropped: dict[str, str],
    restored: dict[str, str],
    absent: list[str],
    planner: _Planner,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "command": direction,
        "source": str(src),
        "output": str(out),
        "variant": keymap.variant,
        "variant_reason": detection.reason,
        "note": detection.note,
        "check": check.mode,
        "keys_written": len(written),
        "renamed": extra.pop("renamed", 0),
        "dropped": dropped,
        "restored": restored,
        "optional_absent": absent,
        "bytes_by_dtype": dict(sorted(planner.bytes_by_dtype.items())),
        "tensor_bytes": sum(planner.bytes_by_dtype.values()),
        # --hash: "0x" + sha256 of the tensor bytes in written order = `inspect --hash`'s content sha256 of the output
        "content_sha256": planner.content_hash(),
        **extra,
    }


def st_to_ms(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    keys: str = "auto",
    dtype: str = "keep",
    fmt: str = "ckpt",
    overwrite: bool = False,
    quiet: bool = True,
    key_torch: str | None = None,
    key_ms: str | None = None,
    hash_content: bool = False,
) -> dict[str, Any]:
    """SD safetensors -> MindSpore names in a ``.ckpt`` (or safetensors); returns the report.

    ``hash_content``: the report gets ``content_sha256`` (a safetensors output also stores it as ModelSpec
    ``modelspec.hash_sha256``).
    """
    started = time.monotonic()
    src, out = Path(src), Path(out)
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, not {dtype!r}")
    if (key_torch is None) != (key_ms is None):
        raise InputError("--key-torch and --key-ms go together")
    check_output(out, overwrite)
    source = read_safetensors(src)
    entries = source.by_name()
    shapes = {n: e.shape for n, e in entries.items()}
    keymap, detection = _choose_keymap(keys, shapes, source.metadata, src)
    check = check_against_keymap(shapes, {n: e.dtype for n, e in entries.items()}, keymap)
    if key_torch is not None:
        check.problems += check_lists(read_list(key_torch), read_list(key_ms), shapes, keymap, key_torch, key_ms)
    raise_problems(check.problems, src)

    requested = DTYPE_CHOICES[dtype]
    with _Planner(hash_content) as planner:
        planned, dropped, renamed = [], {}, 0
        for spec in keymap.specs:
            entry = entries.get(spec.sd)
            if entry is None:
                continue
            if spec.ms is None:
                dropped[spec.sd] = spec.why
                continue
            dst = target_dtype(entry.dtype, requested)
            planned.append(planner.wrap(entry, spec.ms, dst))
            renamed += spec.ms != spec.sd
        absent = [k for k in keymap.optional_sd if k not in entries]
        if fmt == "ckpt":
            written = write_ckpt(out, planned, overwrite=overwrite, quiet=quiet, desc="st-to-ms", digest=planner.digest)
        else:
            # the source's ModelSpec hash describes the source's data section, not this file's
            kept = {k: v for k, v in source.metadata.items() if k != MODELSPEC_HASH}
            metadata = {**kept, "format": "ms", "sdxl_ckpt.variant": keymap.variant}
            written = write_safetensors(
                out, planned, metadata, overwrite=overwrite, quiet=quiet, desc="st-to-ms", digest=planner.digest
            )
        return _report(
            "st-to-ms",
            src,
            out,
            keymap,
            detection,
            check,
            written,
            dropped,
            {},
            absent,
            planner,
            renamed=renamed,
            format=fmt,
            dtype=dtype,
            seconds=round(time.monotonic() - started, 3),
        )


def _read_ms(src: Path) -> tuple[list[TensorEntry], dict[str, str], dict[str, Any]]:
    if src.suffix == ".safetensors":
        source = read_safetensors(src)
        return source.entries, source.metadata, {}
    ckpt = scan_ckpt(src)
    crc_checked = verify_crc(ckpt)
    return ckpt.entries, {}, {"records": ckpt.records, "crc_checked": crc_checked}


def _restore(spec: KeySpec, bindings: Mapping[str, int]) -> TensorEntry:
    shape = tuple(bindings.get(d, n) for d, n in zip(spec.dims, spec.shape))
    if spec.restore != "arange":
        raise InputError(f"keymap has no way to restore this key ({spec.restore!r})", key=spec.sd)
    values = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    return TensorEntry(spec.sd, "I64", shape, lambda: values, source="restored")


def sd_metadata(keymap: Keymap, src: Path) -> dict[str, str]:
    """Stability ModelSpec keys + this project's provenance keys for an SD file made from ``src``."""
    from sdxl_ckpt import __version__

    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURE[keymap.variant],
        "modelspec.implementation": "sgm",
        "modelspec.title": src.stem,
        "sdxl_ckpt.variant": keymap.variant,
        "sdxl_ckpt.source.ckpt": str(src),
        "sdxl_ckpt.version": __version__,
    }


def ms_to_st(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    keys: str = "auto",
    overwrite: bool = False,
    quiet: bool = True,
    hash_content: bool = False,
) -> dict[str, Any]:
    """MindSpore ckpt (or MindSpore-named safetensors) -> SD safetensors, record by record; returns the report.

    ``hash_content``: the report gets ``content_sha256``, also stored as ModelSpec ``modelspec.hash_sha256``.
    """
    started = time.monotonic()
    src, out = Path(src), Path(out)
    check_output(out, overwrite)
    entries, metadata, extra = _read_ms(src)
    ms_shapes = {e.name: e.shape for e in entries}
    keymap, detection = _choose_keymap(keys, ms_shapes, metadata, src)
    by_ms = keymap.by_ms
    sd_entries: dict[str, TensorEntry] = {}
    problems: list[tuple[str | None, str]] = []
    for entry in entries:
        spec = by_ms.get(entry.name)
        if spec is None:
            close = difflib.get_close_matches(entry.name, list(by_ms), n=1, cutoff=0.9)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append((entry.name, f"unexpected key (not a MindSpore name of the {keymap.variant} keymap){hint}"))
        else:
            sd_entries[spec.sd] = entry
    check = check_against_keymap(
        {n: e.shape for n, e in sd_entries.items()}, {n: e.dtype for n, e in sd_entries.items()}, keymap
    )
    raise_problems(problems + [(keymap.sd_to_ms.get(k, k) if k else k, m) for k, m in check.problems], src)

    with _Planner(hash_content) as planner:
        planned, restored = [], {}
        for spec in keymap.specs:
            if spec.ms is None:
                if spec.restore:
                    planned.append(planner.wrap(_restore(spec, check.bindings), spec.sd, "I64"))
                    restored[spec.sd] = spec.why
                continue
            entry = sd_entries.get(spec.sd)
            if entry is not None:
                planned.append(planner.wrap(entry, spec.sd, entry.dtype))
        absent = [k for k in keymap.optional_sd if k not in sd_entries]
        written = write_safetensors(
            out,
            planned,
            sd_metadata(keymap, src),
            overwrite=overwrite,
            quiet=quiet,
            desc="ms-to-st",
            digest=planner.digest,
        )
        renamed = sum(1 for e in written if e.name in sd_entries and sd_entries[e.name].name != e.name)
        return _report(
            "ms-to-st",
            src,
            out,
            keymap,
            detection,
            check,
            written,
            {},
            restored,
            absent,
            planner,
            renamed=renamed,
            **extra,
            seconds=round(time.monotonic() - started, 3),
        )


def render_report(report: Mapping[str, Any]) -> str:
    """The human summary of an st-to-ms / ms-to-st report (the JSON form has everything)."""
    from sdxl_ckpt.report import human_bytes, render_table

    lines = [
        f"{report['command']}: {report['source']} -> {report['output']}",
        f"variant {report['variant']} ({report['variant_reason']}); check: {report['check']}",
    ]
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    lines.append(
        f"tensors written {report['keys_written']} (renamed {report['renamed']}), "
        f"{human_bytes(report['tensor_bytes'])} in {report['seconds']:.2f} s"
    )
    if report.get("content_sha256"):
        lines.append(f"content sha256 (as inspect --hash shows it): {report['content_sha256']}")
    rows = [{"dtype": k, "bytes": v, "size": human_bytes(v)} for k, v in report["bytes_by_dtype"].items()]
    lines.append(render_table(rows, ["dtype", "bytes", "size"]))
    for title, items in (("dropped", report["dropped"]), ("restored", report["restored"])):
        for key, why in items.items():
            lines.append(f"{title}: {key} ({why})")
    for key in report["optional_absent"]:
        lines.append(f"optional, absent: {key}")
    return "\n".join(lines)
