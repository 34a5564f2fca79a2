"""What is measured: each case is one command, the input it reads, and the plain copy it is judged against.

Every conversion has a plain copy of ITS OWN input bytes as its physical reference (the diffusers weight files
concatenated, the SD file, the ckpt), so "1.2x copy" means 1.2 times the time the disk and page cache need
just to move those bytes, on the same machine, in the same cache state, in the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import commands
from bench.inputs import Inputs, ensure_lora


@dataclass(frozen=True)
class Case:
    key: str  # stable id used in JSON
    title: str  # what the table shows
    # input kind: "diffusers" | "sd" | "ckpt" | "lora" (the LoRA cases' file) | "verify" (the ckpt, checked against
    # a reference) | "reference" (the diffusers weights the torch reference reads) | "reference_sd" (the SD file
    # it reads)
    reads: str
    kind: str  # "copy" | "convert" | "baseline" | "verify" (the numerical check: reference and verify runs)
    output: str  # output file name inside the run's out folder
    argv: Callable[[Inputs, Path], list[str]]
    needs: str | None = None  # sdxl-ckpt sub-command that must exist
    reference: str | None = None  # key of the case this one is compared against (a copy; verify: the reference)
    target_ratio: float | None = None  # wall-time target, times the reference case (judged at full size)
    target_rss: int | None = None  # peak RSS target, bytes (judged at full size)
    target_tiny_s: float | None = None  # wall-time target at tiny scale, seconds: start-up, process start to exit


GB = 1_000_000_000
RSS_TARGET = int(0.5 * GB)
LORA_RSS_TARGET = int(0.5 * GB)
COPY_TARGET = 1.10  # the byte-moving conversions: within 10 % of a plain copy of the same bytes
CAST_TARGET = 1.30  # fp16 -> fp32: of a plain copy of as many bytes as the output
STARTUP_TARGET_S = 0.3  # a tiny conversion (a LoRA, a folder of them) must not be start-up bound
# full-size reference and verify (fp32, 256x256, 2 steps, CFG) on a 24 GB machine: one model phase at a time
CHECK_RSS_TARGET = 12 * GB
VERIFY_TARGET = 1.20  # verify's wall time, times the torch reference's on the same inputs

CASES: tuple[Case, ...] = (
    Case(
        "copy_diffusers",
        "plain copy: diffusers fp16 weights",
        "diffusers",
        "copy",
        "copy_diffusers.bin",
        lambda i, o: commands.plain_copy(i.weight_files(), o),
    ),
    Case(
        "diffusers_to_sd",
        "diffusers-to-sd (fp16 keep)",
        "diffusers",
        "convert",
        "sd.safetensors",
        lambda i, o: commands.diffusers_to_sd(i.diffusers, o, i.variant),
        needs="diffusers-to-sd",
        reference="copy_diffusers",
        target_ratio=COPY_TARGET,
        target_rss=RSS_TARGET,
        target_tiny_s=STARTUP_TARGET_S,
    ),
    Case(
        "copy_sd",
        "plain copy: SD safetensors",
        "sd",
        "copy",
        "copy_sd.bin",
        lambda i, o: commands.plain_copy([i.sd], o),
    ),
    Case(
        "dd_sd",
        "user-space copy (dd bs=64M): SD safetensors",
        "sd",
        "copy",
        "dd_sd.bin",
        lambda i, o: commands.user_space_copy(i.sd, o),
        reference="copy_sd",
    ),
    Case(
        "st_to_ms_keep",
        "st-to-ms --dtype keep",
        "sd",
        "convert",
        "ms_keep.ckpt",
        lambda i, o: commands.st_to_ms(i.sd, o, "keep"),
        needs="st-to-ms",
        reference="copy_sd",
        target_ratio=COPY_TARGET,
        target_rss=RSS_TARGET,
        target_tiny_s=STARTUP_TARGET_S,
    ),
    Case(
        "copy_sd_twice",
        "plain copy: SD safetensors twice (as many bytes as the fp32 output)",
        "sd",
        "copy",
        "copy_sd_twice.bin",
        lambda i, o: commands.plain_copy([i.sd, i.sd], o),
    ),
    Case(
        "st_to_ms_fp32",
        "st-to-ms --dtype fp32",
        "sd",
        "convert",
        "ms_fp32.ckpt",
        lambda i, o: commands.st_to_ms(i.sd, o, "fp32"),
        needs="st-to-ms",
        reference="copy_sd_twice",
        target_ratio=CAST_TARGET,
        target_rss=RSS_TARGET,
    ),
    Case(
        "lora_merge",
        "lora merge (UNet attention LoRA, rank 16, into the SD file)",
        "sd",
        "convert",
        "lora_merged.safetensors",
        lambda i, o: commands.lora_merge(i.sd, ensure_lora(i), o),
        needs="lora",
        reference="copy_sd",
        target_rss=LORA_RSS_TARGET,
    ),
    Case(
        "lora_convert",
        "lora convert (that LoRA, PEFT -> kohya)",
        "lora",
        "convert",
        "lora_kohya.safetensors",
        lambda i, o: commands.lora_convert(ensure_lora(i), o, "kohya"),
        needs="lora",
        target_rss=LORA_RSS_TARGET,
        target_tiny_s=STARTUP_TARGET_S,
    ),
    Case(
        "baseline_fp32",
        "baseline: load_file + fp32 + save_checkpoint",
        "sd",
        "baseline",
        "baseline_fp32.ckpt",
        lambda i, o: commands.baseline(i.sd, o),
        reference="copy_sd",
    ),
    Case(
        "sd_to_diffusers",
        "sd-to-diffusers (fp16 keep, --variant fp16)",
        "sd",
        "convert",
        "diffusers_back",
        lambda i, o: commands.sd_to_diffusers(i.sd, o),
        needs="sd-to-diffusers",
        reference="copy_sd",
        target_rss=int(0.5 * GB),
    ),
    Case(
        "copy_ckpt",
        "plain copy: MindSpore ckpt",
        "ckpt",
        "copy",
        "copy_ckpt.bin",
        lambda i, o: commands.plain_copy([i.ckpt], o),
    ),
    Case(
        "ms_to_st",
        "ms-to-st",
        "ckpt",
        "convert",
        "back.safetensors",
        lambda i, o: commands.ms_to_st(i.ckpt, o),
        needs="ms-to-st",
        reference="copy_ckpt",
        target_ratio=COPY_TARGET,
        target_rss=RSS_TARGET,
        target_tiny_s=STARTUP_TARGET_S,
    ),
    Case(
        "startup_help",
        "start-up: sdxl-ckpt --help",
        "sd",
        "startup",
        "help.txt",
        lambda i, o: commands.help_text(),
        target_tiny_s=STARTUP_TARGET_S,
    ),
    Case(
        "reference",
        "reference (diffusers pipeline from the folder, fp32, 2 steps)",
        "reference",
        "verify",
        "reference.npz",
        lambda i, o: commands.reference(i.diffusers, o, i.scale),
        needs="reference",
        target_rss=CHECK_RSS_TARGET,
    ),
    Case(
        "reference_sd",
        "reference (diffusers pipeline from the SD file, fp32, 2 steps)",
        "reference_sd",
        "verify",
        "reference_sd.npz",
        lambda i, o: commands.reference(i.sd, o, i.scale, config=i.diffusers),
        needs="reference",
        target_rss=CHECK_RSS_TARGET,
    ),
    Case(
        "verify",
        "verify (ckpt vs torch reference, 2 steps)",
        "verify",
        "verify",
        "verify.json",
        lambda i, o: commands.verify(i.ckpt, i.reference, o),
        needs="verify",
        reference="reference",
        target_ratio=VERIFY_TARGET,
        target_rss=CHECK_RSS_TARGET,
    ),
)

DEFAULT_KEYS = tuple(c.key for c in CASES if c.kind != "verify")
VERIFY_KEYS = ("reference", "verify")  # what --verify adds: the wall-time target compares these two


def select(keys: list[str] | None, with_verify: bool) -> list[Case]:
    """The cases to run, in table order; unknown keys raise ValueError naming the valid ones."""
    valid = {c.key: c for c in CASES}
    wanted = list(keys) if keys else list(DEFAULT_KEYS)
    if with_verify:
        wanted += [k for k in VERIFY_KEYS if k not in wanted]
    unknown = [k for k in wanted if k not in valid]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; valid: {', '.join(valid)}")
    return [c for c in CASES if c.key in wanted]
