"""``st-to-ms`` and ``ms-to-st``: SD safetensors <-> MindSpore ckpt, checked exactly, one tensor at a time.

Every input is validated before the output is opened: the architecture is read from its names and shapes
(``sdxl.architecture``), and the file must hold exactly the keys, shapes and dtype classes that architecture has
(``keymaps.expected``), whatever its widths. All problems are reported together, each naming its key; nothing
is written then. MindSpore names come from the rename rules (``keymaps.sd_ms``).
Values are never changed (``--dtype`` casts floating tensors only when asked); ``position_ids`` is dropped on the
way in and regenerated on the way out.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_ckpt.errors import InputError, KeyMismatchError
from sdxl_ckpt.formats.atomic import check_output, drop_cached_inputs, output_format
from sdxl_ckpt.formats.castpipe import cast_entry
from sdxl_ckpt.formats.ckpt_io import scan_ckpt, verify_crc, write_ckpt
from sdxl_ckpt.formats.digest import MODELSPEC_HASH, ContentDigest
from sdxl_ckpt.formats.dtypes import DTYPE_CHOICES, FLOAT_DTYPES, ITEMSIZE, numpy_dtype, target_dtype
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.formats.safetensors_io import read_safetensors, write_safetensors
from sdxl_ckpt.formats.sniff import expect, sniff
from sdxl_ckpt.keymaps.expected import ExpectedKey, expected_keys
from sdxl_ckpt.keymaps.mindone import check_lists, read_list
from sdxl_ckpt.keymaps.sd_extras import prepare_sd
from sdxl_ckpt.keymaps.sd_ms import ms_entries_as_sd, sd_to_ms_name
from sdxl_ckpt.sdxl.architecture import HEAD_FIELDS, OPENCLIP, Architecture, infer_architecture
from sdxl_ckpt.sdxl.components import missing_components, partial_of
from sdxl_ckpt.sdxl.variants import (
    MARKERS,
    MODELSPEC_ARCHITECTURE,
    PRESENCE_MARKERS,
    VARIANT_METADATA,
    VARIANT_NAMES,
    VARIANTS,
    Detection,
    structure_of,
)

FORMATS = ("ckpt", "safetensors")
KEY_CHOICES = ("auto", *VARIANT_NAMES)
MAX_LISTED_PROBLEMS = 40  # unexpected keys that get a close-match hint
SHOWN_PROBLEMS = 10  # problems printed; ``--json`` has them all


@dataclass
class Check:
    """An input judged against the exact key set of the architecture read from it (problems raised by the caller)."""

    architecture: Architecture
    expected: dict[str, ExpectedKey]
    problems: list[tuple[str | None, str]] = field(default_factory=list)
    mode: str = "exact"


def _dtype_problem(spec: ExpectedKey, dtype: str) -> str | None:
    if spec.dtype == "float" and dtype not in FLOAT_DTYPES:
        return f"dtype {dtype} where a floating tensor is expected"
    if spec.dtype == "int" and dtype in FLOAT_DTYPES:
        return f"dtype {dtype} where an integer tensor is expected"
    return None


def check_exact(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str], architecture: Architecture) -> Check:
    """Every SD-named key of the input against ``expected_keys(architecture)``: names, shapes and dtype classes."""
    check = Check(architecture, expected_keys(architecture))
    expected = check.expected
    what = f"an SDXL {architecture.structure} of these widths"
    unexpected = [name for name in shapes if name not in expected]
    for name in unexpected[:MAX_LISTED_PROBLEMS]:
        close = difflib.get_close_matches(name, list(expected), n=1, cutoff=0.9)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        check.problems.append((name, f"unexpected key (not in {what}){hint}"))
    for name in unexpected[MAX_LISTED_PROBLEMS:]:
        check.problems.append((name, "unexpected key"))
    for name, spec in expected.items():
        if name not in shapes:
            if spec.required:
                check.problems.append((name, f"missing ({what} has it)"))
            continue
        problem = _dtype_problem(spec, dtypes[name])
        if problem:
            check.problems.append((name, problem))
        if tuple(shapes[name]) != spec.shape:
            check.problems.append(
                (name, f"shape {list(shapes[name])}; the architecture read from this file gives {list(spec.shape)}")
            )
    return check


def read_architecture(
    keys: str, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], path: object
) -> tuple[Architecture, Detection]:
    """The architecture of an input and its variant: detected (``auto``) or forced by ``--keys``."""
    if keys not in KEY_CHOICES:
        raise InputError(f"--keys must be one of {', '.join(KEY_CHOICES)}, not {keys!r}")
    if keys == "auto":
        architecture = infer_architecture(shapes, metadata, path=path)
        assert architecture.detection is not None
        return architecture, architecture.detection
    unforced = {k: v for k, v in metadata.items() if k != VARIANT_METADATA}
    architecture = infer_architecture(shapes, unforced, path=path)
    if structure_of(keys) != architecture.structure:
        raise InputError(
            f"--keys {keys}: but this file has the {architecture.structure} key structure "
            f"(its OpenCLIP encoder is under {OPENCLIP[architecture.structure]!r})",
            path=path,
        )
    detection = Detection(keys, "--keys")
    return dataclasses.replace(architecture, variant=keys, detection=detection), detection


def raise_problems(problems: list[tuple[str | None, str]], path: object) -> None:
    """One KeyMismatchError listing every problem (each with its key); no-op without problems."""
    if not problems:
        return
    lines = [f"  key {key!r}: {message}" if key else f"  {message}" for key, message in problems]
    shown = lines[:SHOWN_PROBLEMS]
    if len(lines) > len(shown):
        shown.append(f"  ... and {len(lines) - len(shown)} more (--json FILE lists them all)")
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
    error = KeyMismatchError(head, path=path, key=first_key if len(problems) == 1 else None)
    error.problems = [{"key": key, "problem": message} for key, message in problems]
    raise error


class _Planner:
    """Output entries under their new names (cast when asked), and the bytes per output dtype for the report.

    With ``hash_content`` the writer also hashes every tensor byte it writes (``formats.digest``); without it no
    byte is read twice, which keeps a conversion within reach of a plain copy.
    """

    def __init__(self, hash_content: bool) -> None:
        self.bytes_by_dtype: Counter = Counter()
        self.digest = ContentDigest() if hash_content else None

    def wrap(
        self,
        entry: TensorEntry,
        name: str,
        dtype: str,
        convert: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> TensorEntry:
        """``entry`` written as ``name`` in ``dtype``: a float cast when it differs (chunked on worker threads),
        or ``convert`` for the integer buffers whose type the target declares otherwise."""
        self.bytes_by_dtype[dtype] += math.prod(entry.shape) * ITEMSIZE[dtype]
        if convert is not None:
            return TensorEntry(name, dtype, entry.shape, lambda: convert(entry.load()), source=entry.source)
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
    detection: Detection,
    check: Check,
    written: list[TensorEntry],
    dropped: dict[str, str],
    restored: dict[str, str],
    absent: list[str],
    planner: _Planner,
    **extra: Any,
) -> dict[str, Any]:
    architecture = check.architecture
    return {
        "command": direction,
        "source": str(src),
        "output": str(out),
        "variant": detection.variant,
        "variant_reason": detection.reason,
        "note": detection.note,
        "structure": architecture.structure,
        "check": check.mode,
        "head_counts": {k: architecture.provenance[k] for k in HEAD_FIELDS if k in architecture.provenance},
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
    fmt: str | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    key_torch: str | None = None,
    key_ms: str | None = None,
    vae: str | os.PathLike | None = None,
    hash_content: bool = False,
) -> dict[str, Any]:
    """SD safetensors -> MindSpore names in a ``.ckpt`` (or safetensors, by the output's extension); the report.

    ``vae``: an SD or LDM VAE file whose VAE is used (a file without one is refused otherwise).
    ``hash_content``: the report gets ``content_sha256`` (a safetensors output also stores it as ModelSpec
    ``modelspec.hash_sha256``).
    """
    started = time.monotonic()
    src, out = Path(src), Path(out)
    fmt = output_format(out, fmt, FORMATS, "st-to-ms")
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, not {dtype!r}")
    if (key_torch is None) != (key_ms is None):
        raise InputError("--key-torch and --key-ms go together")
    check_output(out, overwrite, inputs=(src, key_torch, key_ms))
    found = sniff(src, partial_of)
    # a checkpoint lacking only its VAE is the architecture check's to judge: ``--vae FILE`` completes it
    vae_only = found.kind == "partial" and missing_components(found.names) == ["vae"]
    expect(found, ("sd", "partial") if vae_only else ("sd",), "st-to-ms", "an SD safetensors file")
    source = read_safetensors(src)
    vae_entries = read_safetensors(Path(vae)).by_name() if vae is not None else None
    prepared = prepare_sd(source.by_name(), vae=vae_entries, vae_path=vae, path=src)
    entries = prepared.entries
    weights = {n: e for n, e in entries.items() if n not in prepared.markers}
    shapes = {n: e.shape for n, e in weights.items()}
    marked = {**shapes, **{m: entries[m].shape for m in prepared.markers}}
    architecture, detection = read_architecture(keys, marked, source.metadata, src)
    check = check_exact(shapes, {n: e.dtype for n, e in weights.items()}, architecture)
    if key_torch is not None:
        skippable = {k: e.why for k, e in check.expected.items() if not e.required or sd_to_ms_name(k)[0] is None}
        skippable.update(prepared.markers)
        check.problems += check_lists(read_list(key_torch), read_list(key_ms), shapes, skippable, key_torch, key_ms)
    raise_problems(check.problems, src)

    requested = DTYPE_CHOICES[dtype]
    with _Planner(hash_content) as planner:
        planned, dropped, renamed, generated = [], dict(prepared.dropped), 0, {}
        for name in [*check.expected, *prepared.markers]:
            entry = entries.get(name)
            ms, rule = sd_to_ms_name(name)
            if entry is None and rule.dtype is not None and name in check.expected:
                entry = _restore(name, check.expected[name])  # mindone's network declares it: always written
                generated[name] = f"absent from the SD file: written as {rule.dtype} 0..n-1"
            if entry is None:
                continue
            if ms is None:
                dropped[name] = rule.why
                continue
            if name in PRESENCE_MARKERS and entry.numel == 0 and fmt == "ckpt":
                entry = _presence(entry, (1,))
                prepared.notes.append(f"{name} is empty: stored as one zero (a ckpt holds no empty tensor)")
            if rule.dtype is not None:  # an integer buffer mindone declares with another integer type
                convert = lambda a, d=rule.dtype: a.astype(numpy_dtype(d))  # noqa: E731
                planned.append(planner.wrap(entry, ms, rule.dtype, convert))
            else:
                planned.append(planner.wrap(entry, ms, target_dtype(entry.dtype, requested)))
            renamed += ms != name
        absent = [k for k, e in check.expected.items() if not e.required and k not in entries]
        if fmt == "ckpt":
            written = write_ckpt(out, planned, overwrite=overwrite, quiet=quiet, desc="st-to-ms", digest=planner.digest)
            drop_cached_inputs((src, vae))  # so MindSpore's load_checkpoint finds the memory free
        else:
            # the source's ModelSpec hash describes the source's data section, not this file's
            kept = {k: v for k, v in source.metadata.items() if k != MODELSPEC_HASH}
            metadata = {**kept, "format": "ms", VARIANT_METADATA: detection.variant}
            written = write_safetensors(
                out, planned, metadata, overwrite=overwrite, quiet=quiet, desc="st-to-ms", digest=planner.digest
            )
        return _report(
            "st-to-ms",
            src,
            out,
            detection,
            check,
            written,
            dropped,
            {},
            absent,
            planner,
            renamed=renamed,
            stored_hash=stored_hash_note(source.metadata, src),
            markers=prepared.markers,
            notes=prepared.notes,
            generated=generated,
            format=fmt,
            dtype=dtype,
            seconds=round(time.monotonic() - started, 3),
        )


def stored_hash_note(metadata: Mapping[str, str], src: Path) -> str | None:
    """What became of the source's ``modelspec.hash_sha256``: a conversion reads the tensors in keymap order, not
    the file's byte order the hash covers, so it is not checked here; the note says so and how to check it."""
    stored = metadata.get("modelspec.hash_sha256")
    if not stored:
        return None
    return f"the source's modelspec.hash_sha256 ({stored[:18]}...) was not checked; `sdxl-ckpt inspect --hash {src}`"


def _read_ms(src: Path, kind: str) -> tuple[list[TensorEntry], dict[str, str], dict[str, Any]]:
    if kind != "ckpt":
        source = read_safetensors(src)
        return source.entries, source.metadata, {}
    ckpt = scan_ckpt(src)
    crc_checked = verify_crc(ckpt)
    return ckpt.entries, {}, {"records": ckpt.records, "crc_checked": crc_checked}


def _restore(name: str, spec: ExpectedKey) -> TensorEntry:
    """``position_ids``: int64 0..n-1 in the shape the architecture gives (the only key a ckpt may lack)."""
    if not name.endswith(".position_ids"):
        raise InputError("no way to restore this key", key=name)
    values = np.arange(math.prod(spec.shape), dtype=np.int64).reshape(spec.shape)
    return TensorEntry(name, "I64", spec.shape, lambda: values, source="restored")


def sd_metadata(variant: str, src: Path) -> dict[str, str]:
    """Stability ModelSpec keys + this project's provenance keys for an SD file made from ``src``."""
    from sdxl_ckpt import __version__

    row = VARIANTS[variant]
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[row.structure],
        "modelspec.implementation": "sgm",
        "modelspec.title": src.stem,
        VARIANT_METADATA: variant,
        "sdxl_ckpt.source.ckpt": str(src),
        "sdxl_ckpt.version": __version__,
    }
    if row.prediction_type == "v_prediction":
        metadata["modelspec.prediction_type"] = "v"
    return metadata


def _presence(entry: TensorEntry, shape: tuple[int, ...]) -> TensorEntry:
    """A presence marker (``v_pred``, ``ztsnr``) in the given shape, zeros of its dtype."""
    values = np.zeros(shape, dtype=numpy_dtype(entry.dtype))
    return TensorEntry(entry.name, entry.dtype, shape, lambda: values, source=entry.source)


def _as_int64(entry: TensorEntry, name: str) -> TensorEntry:
    """An integer tensor (mindone's int32 ``position_ids``) as the int64 SD files hold."""
    if entry.dtype == "I64":
        return entry
    return TensorEntry(name, "I64", entry.shape, lambda: entry.load().astype(np.int64), source=entry.source)


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
    output_format(out, None, ("safetensors",), "ms-to-st")
    check_output(out, overwrite, inputs=(src,))
    found = expect(
        sniff(src, partial_of),
        ("ckpt", "ms-safetensors"),
        "ms-to-st",
        "a MindSpore ckpt or MindSpore-named safetensors",
    )
    entries, metadata, extra = _read_ms(src, found.kind)
    sd_entries, problems = ms_entries_as_sd(entries)
    raise_problems(problems, src)
    markers = {n: MARKERS[n] for n in sd_entries if n in MARKERS}
    weights = {n: e for n, e in sd_entries.items() if n not in markers}
    shapes = {n: e.shape for n, e in weights.items()}
    architecture, detection = read_architecture(keys, {**shapes, **{m: () for m in markers}}, metadata, src)
    check = check_exact(shapes, {n: e.dtype for n, e in weights.items()}, architecture)
    raise_problems([(sd_to_ms_name(k)[0] or k if k else k, m) for k, m in check.problems], src)

    with _Planner(hash_content) as planner:
        planned, restored, notes = [], {}, []
        for name, spec in check.expected.items():
            entry = sd_entries.get(name)
            if entry is not None and spec.dtype == "int" and entry.dtype != "I64":
                notes.append(f"{name}: {entry.dtype} in MindSpore, written as int64 as SD files hold it")
                planned.append(planner.wrap(_as_int64(entry, name), name, "I64"))
            elif entry is not None:
                planned.append(planner.wrap(entry, name, entry.dtype))
            elif sd_to_ms_name(name)[0] is None or name.endswith(".position_ids"):
                planned.append(planner.wrap(_restore(name, spec), name, "I64"))
                restored[name] = "absent from the MindSpore file: regenerated as int64 0..n-1"
        for name in markers:
            entry = sd_entries[name]
            if name in PRESENCE_MARKERS and entry.shape == (1,):
                entry = _presence(entry, (0,))
                notes.append(f"{name}: written empty, as ComfyUI saves it (its presence is the fact)")
            planned.append(planner.wrap(entry, name, entry.dtype))
        absent = [k for k, e in check.expected.items() if not e.required and k not in sd_entries and k not in restored]
        written = write_safetensors(
            out,
            planned,
            sd_metadata(detection.variant, src),
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
            detection,
            check,
            written,
            {},
            restored,
            absent,
            planner,
            renamed=renamed,
            stored_hash=stored_hash_note(metadata, src),
            markers=markers,
            notes=notes,
            **extra,
            seconds=round(time.monotonic() - started, 3),
        )


def render_report(report: Mapping[str, Any]) -> str:
    """The human summary of an st-to-ms / ms-to-st report (the JSON form has everything)."""
    from sdxl_ckpt.report import human_bytes, render_table

    lines = [
        f"{report['command']}: {report['source']} -> {report['output']}",
        f"variant {report['variant']} ({report['variant_reason']}); {report['structure']} structure, "
        f"keys and shapes checked exactly against the architecture read from the weights",
    ]
    for key in ("note", "stored_hash"):
        if report.get(key):
            lines.append(f"note: {report[key]}")
    heads = sorted(set(report["head_counts"].values()))
    if heads:
        lines.append(f"attention head counts (shapes cannot tell them): {'; '.join(heads)}")
    lines.append(
        f"tensors written {report['keys_written']} (renamed {report['renamed']}), "
        f"{human_bytes(report['tensor_bytes'])} in {report['seconds']:.2f} s"
    )
    if report.get("content_sha256"):
        lines.append(f"content sha256 (as inspect --hash shows it): {report['content_sha256']}")
    rows = [{"dtype": k, "bytes": v, "size": human_bytes(v)} for k, v in report["bytes_by_dtype"].items()]
    lines.append(render_table(rows, ["dtype", "bytes", "size"]))
    for title, items in (
        ("dropped", report["dropped"]),
        ("restored", report["restored"]),
        ("generated", report.get("generated", {})),
    ):
        for key, why in items.items():
            lines.append(f"{title}: {key} ({why})")
    for key, meaning in report.get("markers", {}).items():
        lines.append(f"kept: {key} ({meaning})")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    for key in report["optional_absent"]:
        lines.append(f"optional, absent: {key}")
    return "\n".join(lines)
