"""Outputs stay byte-identical across refactors: fixed sha256 values of the tiny base, refiner and LCM conversions.

The values were recorded from the code as it stood before the package was re-layered. A change that alters
them changes what users get, so it must be deliberate: update the values in the same commit and say why.
The base and LCM ckpt values changed once on purpose: the ckpt now holds CLIP-L's ``position_ids`` as the int32
Parameter mindone's network declares (the SD values and the refiner ckpt, which has no CLIP-L, did not change).
The SD files carry their source paths in the metadata, so for them the tensor index and the tensor bytes are
hashed (the header without ``__metadata__``, the data section); a ``.ckpt`` stores no metadata and is hashed whole.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.torch, pytest.mark.slow]

# variant -> (SD tensor index sha256, SD data sha256, metadata keys, ckpt sha256)
GOLDEN: dict[str, tuple[str, str, str, str]] = {
    "base": (
        "55fc2c83f5995996b19aac59cebebb391c16c34b05d31f1164f6665455ee7a6d",
        "09aafb7317d20857e44d6519b3c55ff6476c5d83c8e94d9c63555b6b10382ac1",
        "modelspec.architecture,modelspec.implementation,modelspec.sai_model_spec,modelspec.title,"
        "sdxl_ckpt.config.text_encoder,sdxl_ckpt.config.text_encoder_2,sdxl_ckpt.config.unet,sdxl_ckpt.config.vae,"
        "sdxl_ckpt.variant,sdxl_ckpt.version",
        "ed97690de2ea95496759140bd09fbacd3e2d3e4b986a7995438e85d0d11d2926",
    ),
    "refiner": (
        "db65b6d12a95104040d7fcac04126416dffed1450202d8f78d5723ddc7635988",
        "f474c66e864bce597743e819589b0f3af794eac55a13adf8a7e0ac8eff525e69",
        "modelspec.architecture,modelspec.implementation,modelspec.sai_model_spec,modelspec.title,"
        "sdxl_ckpt.config.text_encoder_2,sdxl_ckpt.config.unet,sdxl_ckpt.config.vae,sdxl_ckpt.variant,sdxl_ckpt.version",
        "7eabe19591f92e36c74aeaa969e3d88e6f0ccf8327a23570a1c99e2ab3913543",
    ),
    "lcm": (
        "cf39754aaf63e6cad2404555dd8f8726e8ff660ed6bf4557a1a8fc4177b2a89b",
        "c119949199c7cdeea63b677678b8a525dbc48cbe87262e5bafa48860142d92eb",
        "modelspec.architecture,modelspec.implementation,modelspec.sai_model_spec,modelspec.title,"
        "sdxl_ckpt.config.text_encoder,sdxl_ckpt.config.text_encoder_2,sdxl_ckpt.config.unet,sdxl_ckpt.config.vae,"
        "sdxl_ckpt.variant,sdxl_ckpt.version",
        "b366e4bffc2ef4a2de90a21292493ea7d1886feb71866934fd950dd9fd18d0c3",
    ),
}


def _cli(*argv: object) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sdxl_ckpt.cli", *map(str, argv)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr


def _sd_hashes(path: Path) -> tuple[str, str, str]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    metadata = header.pop("__metadata__", {})
    index = json.dumps(header, sort_keys=True).encode()
    keys = ",".join(sorted(k for k in metadata if not k.startswith("sdxl_ckpt.source.")))
    return hashlib.sha256(index).hexdigest(), hashlib.sha256(raw[8 + length :]).hexdigest(), keys


def outputs(variant: str, work: Path) -> tuple[str, str, str, str]:
    """Build the tiny ``variant`` (seed 0), convert it to SD and to ckpt, and hash both outputs."""
    model = work / "model"
    _cli("tiny-model", "--model", variant, "-o", model, "-q", *(["--cond-proj"] if variant == "lcm" else []))
    sd, ckpt = work / "model.safetensors", work / "model.ckpt"
    extra = ["--unet", model / "lcm-unet", "--lcm"] if variant == "lcm" else []
    _cli("diffusers-to-sd", model, "-o", sd, "-q", *extra)
    _cli("st-to-ms", sd, "-o", ckpt, "-q")
    return (*_sd_hashes(sd), hashlib.sha256(ckpt.read_bytes()).hexdigest())


@pytest.mark.parametrize("variant", ["base", "refiner", "lcm"])
def test_outputs_unchanged(variant: str, tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    assert outputs(variant, tmp_path) == GOLDEN[variant]


if __name__ == "__main__":  # prints the GOLDEN table for the current code
    import tempfile

    for name in ("base", "refiner", "lcm"):
        with tempfile.TemporaryDirectory() as tmp:
            print(f"    {name!r}: {outputs(name, Path(tmp))!r},")
