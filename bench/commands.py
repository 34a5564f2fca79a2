"""The exact command lines the bench runs: the real ``sdxl-ckpt`` CLI, a shell copy, the baseline script.

Kept in one place so the bench measures what a user types, and so a changed CLI flag is fixed here only.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import cache, lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cli() -> tuple[str, ...]:
    """The installed ``sdxl-ckpt`` entry point next to this interpreter (else on PATH, else ``python -m``)."""
    beside = Path(sys.executable).with_name("sdxl-ckpt")
    if beside.is_file():
        return (str(beside),)
    found = shutil.which("sdxl-ckpt")
    return (found,) if found else (sys.executable, "-m", "sdxl_ckpt.cli")


@cache
def has_command(name: str) -> bool:
    """Whether ``sdxl-ckpt NAME --help`` works (commands land one by one while the project grows)."""
    proc = subprocess.run([*cli(), name, "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc.returncode == 0


def generate_model(scale: str, out: Path) -> list[str]:
    """The synthetic SDXL base folder with fp16 variant files: tiny widths, or the real (full) shapes."""
    size = ["--full"] if scale == "full" else []
    return [*cli(), "tiny-model", "--model", "base", "--output", str(out), *size, "--fp16-variant", "--quiet"]


def diffusers_to_sd(src: Path, out: Path, variant: str | None) -> list[str]:
    read = ["--variant", variant] if variant else []
    return [*cli(), "diffusers-to-sd", str(src), "--output", str(out), *read, "--dtype", "keep", "--quiet"]


def st_to_ms(src: Path, out: Path, dtype: str) -> list[str]:
    return [*cli(), "st-to-ms", str(src), "--output", str(out), "--dtype", dtype, "--quiet"]


def sd_to_diffusers(src: Path, out: Path) -> list[str]:
    """The SD file back to a diffusers folder (a folder output: the bench measures and deletes it whole)."""
    return [*cli(), "sd-to-diffusers", str(src), "--output", str(out), "--variant", "fp16", "--quiet"]


def ms_to_st(src: Path, out: Path) -> list[str]:
    return [*cli(), "ms-to-st", str(src), "--output", str(out), "--quiet"]


def lora_merge(base: Path, lora: Path, out: Path) -> list[str]:
    return [*cli(), "lora", "merge", str(base), str(lora), "--output", str(out), "--quiet"]


def lora_convert(lora: Path, out: Path, to: str) -> list[str]:
    return [*cli(), "lora", "convert", str(lora), "--output", str(out), "--to", to, "--quiet"]


def help_text() -> list[str]:
    """The cheapest command: interpreter, CLI framework and command table, nothing else (start-up alone)."""
    return [*cli(), "--help"]


# full size on a CPU: a small image and two steps keep the reference and the check to minutes
VERIFY_SIZE = {"tiny": [], "full": ["--height", "256", "--width", "256"]}


def reference(src: Path, out: Path, scale: str, config: Path | None = None) -> list[str]:
    """``config``: a diffusers folder of the model, for an SD file (the tokenizers it does not carry)."""
    extra = ["--config", str(config)] if config is not None else []
    return [
        *cli(),
        "reference",
        str(src),
        "--output",
        str(out),
        "--steps",
        "2",
        *VERIFY_SIZE[scale],
        *extra,
        "--quiet",
    ]


def verify(ckpt: Path, reference: Path, out: Path) -> list[str]:
    return [*cli(), "verify", str(ckpt), "--reference", str(reference), "--json", str(out), "--quiet"]


def plain_copy(srcs: list[Path], out: Path) -> list[str]:
    """``cat SRC... > OUT`` then ``sync OUT``: the converters fsync their output, so the reference does too."""
    script = 'out="$1"; shift; cat "$@" > "$out" && sync "$out"'
    return ["sh", "-c", script, "sh", str(out), *map(str, srcs)]


def user_space_copy(src: Path, out: Path) -> list[str]:
    """``dd`` moves the bytes through a user-space buffer (read + write), as any Python converter must; GNU ``cat``
    copies inside the kernel (``copy_file_range``). The gap between the two is the floor a converter cannot beat
    without in-kernel copies of its own."""
    return ["dd", f"if={src}", f"of={out}", "bs=64M", "conv=fsync", "status=none"]


def baseline(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "bench.baseline_mindone", str(src), str(out)]
