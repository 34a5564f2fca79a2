"""``sdxl-ckpt demo``: the whole job on a built-in tiny SDXL-shaped model, each step printed, then the verdict.

    tiny-model -> diffusers-to-sd -> st-to-ms -> reference (diffusers, torch) -> verify (MindSpore)

The reference is computed from the diffusers FOLDER (the original weights), and verify loads the ckpt that went
through both conversions, so a pass proves the whole chain. Small on purpose: 32x32 pixels (64x64 for the
4-level refiner), 4 sampling steps with CFG 5.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdxl_ckpt.errors import InputError

DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "base": {"sampler": "euler", "steps": 4, "height": 32, "width": 32},
    "lcm": {"sampler": "lcm", "steps": 4, "height": 32, "width": 32},
    # img2img from a synthetic image: 8-step schedule at strength 0.5 = 4 steps run; 64 px for 4 UNet levels
    "refiner": {"sampler": "euler", "steps": 8, "strength": 0.5, "height": 64, "width": 64},
}


def _step(n: int, title: str) -> Callable[[str], None]:
    start = time.perf_counter()
    print(f"[{n}/5] {title} ...", flush=True)

    def done(detail: str) -> None:
        print(f"      {detail} ({time.perf_counter() - start:.1f} s)", flush=True)

    return done


def run_demo(variant: str = "base", workdir: str | os.PathLike | None = None, quiet: bool = False) -> int:
    """Run the five steps in ``workdir`` (a temporary folder when None); returns verify's exit code."""
    if variant not in DEMO_SETTINGS:
        raise InputError(f"--model must be one of {', '.join(DEMO_SETTINGS)}, not {variant!r}")
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="sdxl-ckpt-demo-") as tmp:
            print(f"sdxl-ckpt demo: working in the temporary folder {tmp} (deleted at the end; --workdir DIR keeps it)")
            code = _run(variant, Path(tmp), quiet)
        print(f"deleted {tmp} (run with --workdir DIR to keep the files)")
        return code
    Path(workdir).mkdir(parents=True, exist_ok=True)
    print(f"sdxl-ckpt demo: working in {workdir} (kept)")
    code = _run(variant, Path(workdir), quiet)
    files = sorted(p.name for p in Path(workdir).iterdir() if p.name.startswith(("tiny-", "sdxl-", "ref-")))
    print(f"files kept in {workdir}: {', '.join(files)}")
    return code


def _run(variant: str, wd: Path, quiet: bool) -> int:
    from sdxl_ckpt.convert.diffusers_to_sd import convert_diffusers_to_sd
    from sdxl_ckpt.convert.sd_ms import st_to_ms
    from sdxl_ckpt.formats.reference_npz import load_reference
    from sdxl_ckpt.reference.reference import run_reference
    from sdxl_ckpt.testmodels.tiny import build_model_cli
    from sdxl_ckpt.verify.verify import render, verify_checkpoint

    total = time.perf_counter()
    print(f"tiny SDXL {variant}: five steps")
    folder = wd / f"tiny-{variant}"
    done = _step(1, f"tiny-model --model {variant} -o {folder}")
    build_model_cli(variant, folder, seed=0, overwrite=True)
    unet_dir = folder / "lcm-unet" if variant == "lcm" else None
    done("diffusers folder with random SDXL-shaped weights" + (" + lcm-unet/" if unet_dir else ""))

    sd_file, ckpt = wd / f"sdxl-{variant}.safetensors", wd / f"sdxl-{variant}.ckpt"
    ref_file = wd / f"ref-{variant}.npz"
    done = _step(2, f"diffusers-to-sd {folder.name} -o {sd_file.name}")
    rep = convert_diffusers_to_sd(folder, sd_file, unet_dir=unet_dir, lcm=variant == "lcm", overwrite=True, quiet=quiet)
    done(f"{rep['tensors']} tensors, {rep['architecture']} ({rep['variant']})")

    done = _step(3, f"st-to-ms {sd_file.name} -o {ckpt.name}")
    rep = st_to_ms(sd_file, ckpt, overwrite=True, quiet=quiet)
    done(f"{rep['keys_written']} records, {rep['renamed']} renamed, keymap {rep['variant']}")

    settings = DEMO_SETTINGS[variant]
    done = _step(4, f"reference {folder.name} (diffusers, torch) -o {ref_file.name}")
    _, ref = run_reference(folder, ref_file, overwrite=True, unet=unet_dir, **settings)
    s = ref.settings
    done(f"{s['sampler']}, {s['steps_run']} steps, {s['height']}x{s['width']}, guidance {s['guidance']}")

    done = _step(5, f"verify {ckpt.name} --reference {ref_file.name} (MindSpore, fp32, CPU)")
    report = verify_checkpoint(ckpt, load_reference(ref_file), quiet=quiet)
    done(f"{len(report.results)} stages compared")
    print(render(report))
    verdict = "PASS" if report.passed else "FAIL"
    print(
        f"demo {verdict}: the MindSpore ckpt {'reproduces' if report.passed else 'does NOT reproduce'} diffusers' "
        f"SDXL {variant} stage by stage ({time.perf_counter() - total:.0f} s in all)"
    )
    return 0 if report.passed else 1
