"""Bodies of ``sdxl-ckpt reference`` and ``sdxl-ckpt verify``: compose library calls, print, pick the exit code."""

from __future__ import annotations

import os
import sys
from typing import Any

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.formats.atomic import check_output
from sdxl_ckpt.formats.sniff import expect, sniff
from sdxl_ckpt.report import render_table, write_json
from sdxl_ckpt.sdxl.components import partial_of

SOURCE_KINDS = ("folder", "sd")
SOURCE_WANTS = "a diffusers folder or an SD safetensors file"
MS_KINDS = ("ckpt", "ms-safetensors")
MS_WANTS = "a MindSpore ckpt or MindSpore-named safetensors"


def _check_source(src: str, command: str, settings: dict[str, Any]) -> None:
    """The reference's inputs: what each is (one line when wrong), before torch is loaded."""
    found = expect(sniff(src, partial_of), SOURCE_KINDS, command, SOURCE_WANTS)
    if found.kind == "sd" and found.path.suffix != ".safetensors":
        # diffusers' single-file loader picks the format by extension and would unpickle anything else
        raise InputError(
            f"an SD safetensors file named {found.path.suffix or 'without an extension'}: "
            f"{command} needs the .safetensors name (rename or link it)",
            path=src,
        )
    for option in ("unet", "config_dir"):
        if settings.get(option) is not None:
            expect(sniff(settings[option]), ("folder",), f"{command} --{option.removesuffix('_dir')}", "a folder")


def _check_same_model(ckpt: str, ref: Any) -> None:
    """A base ckpt against a refiner reference (or the reverse, or an inpainting / instruct-pix2pix ckpt against
    another kind's reference) is one short line, not thousands of key names."""
    from sdxl_ckpt.manage.sources import open_checkpoint
    from sdxl_ckpt.sdxl.variants import VARIANTS

    ours = open_checkpoint(ckpt).variant
    theirs = str(ref.meta.get("variant"))
    # the key structure, or the UNet's input channels (inpainting, instruct-pix2pix): the other rows are left to
    # the loader and the stages
    kind = lambda name: (VARIANTS[name].structure, VARIANTS[name].in_channels)  # noqa: E731
    if ours in VARIANTS and theirs in VARIANTS and kind(ours) != kind(theirs):
        raise InputError(
            f"this {ours} checkpoint does not fit the {theirs} model the reference was made with; "
            f"verify it against a reference of its own source",
            path=ckpt,
        )


def reference_command(
    src: str, output: str, *, json_out: str | None = None, quiet: bool = False, overwrite: bool = False, **settings: Any
) -> int:
    """Run the PyTorch reference and write REF.npz; prints what was stored."""
    from sdxl_ckpt.reference.reference import run_reference, summary_rows
    from sdxl_ckpt.verify.verify import resolve_sampler

    settings["sampler"] = resolve_sampler(settings.get("sampler")) or "euler"
    check_output(output, overwrite, inputs=(src, settings.get("unet"), settings.get("config_dir")))
    _check_source(src, "reference", settings)
    path, ref = run_reference(src, output, overwrite=overwrite, **settings)
    s = ref.settings
    if json_out == "-":
        write_json({"command": "reference", "output": str(path), "meta": ref.meta, "arrays": summary_rows(ref)}, "-")
        return 0
    print(
        f"reference: {ref.meta['variant']} ({ref.meta['source']['kind']}), sampler {s['sampler']}, "
        f"{s['steps_run']} step(s), {s['height']}x{s['width']}, seed {s['seed']}, guidance {s['guidance']}, "
        f"CFG {'on' if s['cfg'] else 'off'} (uncond: {s['uncond']})"
    )
    if not quiet:
        print(render_table(summary_rows(ref)))
    print(f"wrote {path}")
    write_json({"command": "reference", "output": str(path), "meta": ref.meta, "arrays": summary_rows(ref)}, json_out)
    return 0


def verify_command(
    ckpt: str,
    *,
    reference: str | None,
    source: str | None,
    sampler: str | None,
    device: str,
    dtype: str,
    rtol_override: list[str] | None,
    json_out: str | None,
    quiet: bool,
    save_reference: str | None = None,
    fail_fast: bool = False,
    **settings: Any,
) -> int:
    """verify CKPT against REF.npz (or a reference computed now from --source); exit 0 pass / 1 fail."""
    from sdxl_ckpt.formats.reference_npz import load_reference
    from sdxl_ckpt.verify.compare import parse_overrides
    from sdxl_ckpt.verify.verify import check_override_names, render, resolve_sampler, verify_checkpoint

    overrides = parse_overrides(rtol_override)
    check_override_names(overrides)
    sampler = resolve_sampler(sampler)
    if (reference is None) == (source is None):
        raise InputError("give exactly one of --reference REF.npz and --source SRC")
    expect(sniff(ckpt, partial_of), MS_KINDS, "verify", MS_WANTS)
    if reference is not None and os.path.exists(reference):  # a missing one: load_reference says so
        expect(sniff(reference), ("npz",), "verify --reference", "a REF.npz written by `reference`")
    if source is not None:
        _check_source(source, "verify --source", settings)
    if save_reference is not None:
        check_output(save_reference, True, inputs=(ckpt, source, settings.get("unet"), settings.get("config_dir")))
    if source is not None:
        from sdxl_ckpt.reference.reference import make_reference, run_reference

        if save_reference is not None:
            _, ref = run_reference(source, save_reference, overwrite=True, sampler=sampler or "euler", **settings)
        else:
            ref = make_reference(source, sampler=sampler or "euler", **settings)
        ref.meta.setdefault("path", save_reference or f"(computed from {source})")
    else:
        ref = load_reference(reference)
    _check_same_model(ckpt, ref)
    report = verify_checkpoint(
        ckpt, ref, sampler=sampler, device=device, dtype=dtype, overrides=overrides, quiet=quiet, fail_fast=fail_fast
    )
    if json_out != "-":
        print(render(report))
    write_json({"command": "verify", **report.as_dict()}, json_out)
    sys.stdout.flush()
    return 0 if report.passed else 1
