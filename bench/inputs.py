"""The synthetic SDXL inputs every case reads, made once per scale and reused (they take minutes at full size).

Per scale, under ``WORKDIR/<scale>/``:
- ``diffusers/``: an SDXL base pipeline folder with fp16 variant weight files (``*.fp16.safetensors``), from the
  tiny-model generator (tiny: real key structure, tiny widths; full: real shapes, random data, written streaming),
  or an existing folder given with ``--diffusers-src`` (e.g. one the generator already left on this machine);
- ``sd.safetensors``: the SD single file made from it by ``sdxl-ckpt diffusers-to-sd`` (fp16 kept);
- ``ms_keep.ckpt``: the MindSpore ckpt made from that by ``sdxl-ckpt st-to-ms --dtype keep`` (input of ms-to-st);
- ``inputs.json``: what was made, from where, and the sizes, so a later run can tell it may reuse them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import commands

WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
MANIFEST = "inputs.json"


# full-size SDXL base: each input ~6.9 GB; the largest transient output (fp32 ckpt) ~13.9 GB
FULL_INPUTS_BYTES = 21_000_000_000
FULL_OUTPUT_BYTES = 14_500_000_000


class InputBuildError(RuntimeError):
    """An input could not be made (a converter failed, no disk space); the message says which and why."""


def check_free_space(root: Path, need: int, what: str) -> None:
    """Refuse to start a full-size step that would fill the disk (and disturb everything else on it)."""
    free = shutil.disk_usage(root).free
    if free < need:
        raise InputBuildError(
            f"{what} needs about {need / 1e9:.0f} GB free in {root}, only {free / 1e9:.1f} GB "
            "are: pass --workdir on a bigger disk"
        )


@dataclass(frozen=True)
class Inputs:
    scale: str
    root: Path
    diffusers: Path
    sd: Path
    ckpt: Path

    @property
    def reference(self) -> Path:
        """The torch reference run (``sdxl-ckpt reference``) that the verify case checks the ckpt against."""
        return self.root / "reference.npz"

    @property
    def variant(self) -> str | None:
        """ "fp16" when the folder has fp16 variant weight files (the bench's own inputs always do)."""
        fp16 = [p for c in WEIGHT_COMPONENTS for p in (self.diffusers / c).glob("*.fp16*.safetensors")]
        return "fp16" if fp16 else None

    def weight_files(self) -> list[Path]:
        """The diffusers weight files a conversion reads: the fp16 variant files (all shards) when present."""
        files: list[Path] = []
        for component in WEIGHT_COMPONENTS:
            folder = self.diffusers / component
            fp16 = sorted(folder.glob("*.fp16*.safetensors"))
            files.extend(fp16 or sorted(p for p in folder.glob("*.safetensors")))
        return files

    def files(self, kind: str) -> list[Path]:
        """The input files of kind "diffusers" | "sd" | "ckpt" | "lora" (| "verify", "reference", "reference_sd")."""
        if kind in ("diffusers", "reference"):
            return self.weight_files()
        if kind == "lora":
            return [ensure_lora(self)]
        return [{"sd": self.sd, "ckpt": self.ckpt, "verify": self.ckpt, "reference_sd": self.sd}[kind]]

    def size(self, kind: str) -> int:
        return sum(p.stat().st_size for p in self.files(kind))


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        raise InputBuildError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n" + "\n".join(tail))


def _manifest_ok(inputs: Inputs, manifest: dict) -> bool:
    """Reuse only when every recorded file is still there with its recorded size."""
    try:
        sizes = manifest["sizes"]
        return Path(manifest["diffusers"]) == inputs.diffusers and all(
            Path(p).is_file() and Path(p).stat().st_size == n for p, n in sizes.items()
        )
    except (KeyError, TypeError, OSError):
        return False


def build_diffusers(scale: str, out: Path, log=print) -> None:
    """Generate the fp16-variant SDXL base folder at ``out`` with the project's generator (in a subprocess)."""
    log(f"[bench] generating the {scale} synthetic SDXL base folder at {out} ...")
    if out.exists():  # our own folder, left incomplete by an interrupted run (no model_index.json yet)
        shutil.rmtree(out)
    _run(commands.generate_model(scale, out), f"generating the {scale} model")


def ensure_inputs(scale: str, workdir: Path, diffusers_src: Path | None = None, log=print) -> Inputs:
    """Make (or reuse) the three inputs of ``scale`` under ``workdir/scale``."""
    root = (workdir / scale).resolve()
    root.mkdir(parents=True, exist_ok=True)
    diffusers = diffusers_src.resolve() if diffusers_src else root / "diffusers"
    inputs = Inputs(scale, root, diffusers, root / "sd.safetensors", root / "ms_keep.ckpt")
    manifest_path = root / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        if _manifest_ok(inputs, manifest):
            log(f"[bench] reusing the {scale} inputs in {root}")
            return inputs
    manifest_path.unlink(missing_ok=True)
    if scale == "full":
        check_free_space(root, FULL_INPUTS_BYTES + FULL_OUTPUT_BYTES, "making the full-size inputs")
    if diffusers_src is None and not (diffusers / "model_index.json").is_file():
        build_diffusers(scale, diffusers, log)
    if not inputs.weight_files():
        raise InputBuildError(f"no weight files under {diffusers}")
    for path in (inputs.sd, inputs.ckpt, inputs.reference):  # all derived from the folder: remade together
        path.unlink(missing_ok=True)
    log(f"[bench] diffusers-to-sd -> {inputs.sd}")
    _run(commands.diffusers_to_sd(diffusers, inputs.sd, inputs.variant), "diffusers-to-sd (making the SD input)")
    log(f"[bench] st-to-ms --dtype keep -> {inputs.ckpt}")
    _run(commands.st_to_ms(inputs.sd, inputs.ckpt, "keep"), "st-to-ms (making the ckpt input)")
    sizes = {str(p): p.stat().st_size for p in [*inputs.weight_files(), inputs.sd, inputs.ckpt]}
    manifest_path.write_text(
        json.dumps(
            {
                "scale": scale,
                "diffusers": str(diffusers),
                "generated": diffusers_src is None,
                "sizes": sizes,
                "python": sys.executable,
                "created": time.time(),
            },
            indent=2,
        )
        + "\n"
    )
    return inputs


def ensure_lora(inputs: Inputs) -> Path:
    """The merge case's LoRA (UNet attention, rank 16, fp16), made once from the SD input's own shapes (numpy)."""
    path = inputs.root / "lora.safetensors"
    if not path.is_file():
        from sdxl_ckpt.testmodels.lora import synthetic_lora

        synthetic_lora(path, inputs.sd)
    return path


def ensure_reference(inputs: Inputs, log=print) -> Path:
    """Make (once) the reference the verify case needs; torch runs here, not inside the measured case."""
    if not inputs.reference.is_file():
        log(f"[bench] sdxl-ckpt reference -> {inputs.reference}")
        _run(commands.reference(inputs.diffusers, inputs.reference, inputs.scale), "making the verify reference")
    return inputs.reference
