"""Shared, built-once artefacts of the verify tests: converted tiny ckpts, references, planted faults.

Session caching lives here (a module imported once) so that test_verify_pass.py and test_verify_faults.py share
one ckpt and one reference per case instead of rebuilding them (each build costs seconds on 2 cores).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

_CACHE: dict[str, Any] = {}

# small on purpose: the tiny base UNet needs a latent divisible by 4, the 4-level refiner by 8
BASE_SIZE = {"height": 32, "width": 32}
REFINER_SIZE = {"height": 64, "width": 64}


def cached(key: str, build: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def convert(folder: Path, out_dir: Path, name: str, unet_dir: Path | None = None, lcm: bool = False) -> Path:
    """diffusers folder -> SD file -> MindSpore ckpt, with the project's converters."""
    from sdxl_ckpt.convert.diffusers_to_sd import convert_diffusers_to_sd
    from sdxl_ckpt.convert.sd_ms import st_to_ms

    sd, ckpt = out_dir / f"{name}.safetensors", out_dir / f"{name}.ckpt"
    convert_diffusers_to_sd(folder, sd, unet_dir=unet_dir, lcm=lcm, overwrite=True)
    st_to_ms(sd, ckpt, overwrite=True)
    return ckpt


def reference(src: Path, out: Path, **settings: Any) -> Path:
    from sdxl_ckpt.reference.reference import run_reference

    run_reference(src, out, overwrite=True, **settings)
    return out


def plant(ckpt: Path, out: Path, edits: dict[str, Callable[[dict[str, Any]], np.ndarray]]) -> Path:
    """Copy ``ckpt`` record by record (KEYMAP's ckpt_io), replacing the named tensors by ``edit(entries)``."""
    from sdxl_ckpt.formats.ckpt_io import scan_ckpt, write_ckpt

    entries = scan_ckpt(ckpt).entries
    by_name = {e.name: e for e in entries}
    missing = set(edits) - set(by_name)
    assert not missing, f"no such keys in {ckpt}: {missing}"
    planted = [
        replace(e, loader=(lambda e=e: np.ascontiguousarray(edits[e.name](by_name)))) if e.name in edits else e
        for e in entries
    ]
    write_ckpt(out, planted, overwrite=True)
    return out


def swap(a: str, b: str) -> dict[str, Callable[[dict[str, Any]], np.ndarray]]:
    """Two same-shape tensors exchanged."""
    return {a: lambda by: by[b].load(), b: lambda by: by[a].load()}


def square_projection_model(src: Path, dst: Path, seed: int = 5) -> Path:
    """A copy of a tiny base folder whose OpenCLIP text_projection is SQUARE, as in the real bigG (1280x1280).

    The tiny model's projection is 64 -> 32, so an untransposed copy would be refused at load (shape mismatch);
    with a square one the fault loads silently, as it does at full size. projection_dim 32 -> 64 changes the
    UNet's y width (32 + 6*16 -> 64 + 6*16): new random text_projection and label_emb input weights.
    """
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    te2_cfg = json.loads((dst / "text_encoder_2" / "config.json").read_text())
    hidden = te2_cfg["hidden_size"]
    te2_cfg["projection_dim"] = hidden
    (dst / "text_encoder_2" / "config.json").write_text(json.dumps(te2_cfg, indent=2))
    path = dst / "text_encoder_2" / "model.safetensors"
    tensors = load_file(path)
    tensors["text_projection.weight"] = (rng.standard_normal((hidden, hidden)) / hidden**0.5).astype(np.float32)
    save_file(tensors, path, metadata={"format": "pt"})

    unet_cfg = json.loads((dst / "unet" / "config.json").read_text())
    adm = hidden + 6 * unet_cfg["addition_time_embed_dim"]
    unet_cfg["projection_class_embeddings_input_dim"] = adm
    (dst / "unet" / "config.json").write_text(json.dumps(unet_cfg, indent=2))
    path = dst / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    out_dim = tensors["add_embedding.linear_1.weight"].shape[0]
    tensors["add_embedding.linear_1.weight"] = (rng.standard_normal((out_dim, adm)) / adm**0.5).astype(np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


def base_case(tiny_base: Path, tmp_path_factory: Any) -> tuple[Path, Path]:
    """(ckpt converted from the tiny base, its Euler reference at 32x32): built once per session."""

    def build() -> tuple[Path, Path]:
        out = tmp_path_factory.mktemp("verify_base")
        return convert(tiny_base, out, "base"), reference(tiny_base, out / "ref.npz", **BASE_SIZE)

    return cached("base_case", build)


def seed1_ckpt(tmp_path_factory: Any) -> Path:
    """The ckpt of a tiny base built with another seed (every weight differs): built once per session."""

    def build() -> Path:
        from sdxl_ckpt.testmodels.tiny import build_tiny_model

        out = tmp_path_factory.mktemp("seed1")
        return convert(build_tiny_model("base", out / "pipe", seed=1), out, "seed1")

    return cached("seed1_ckpt", build)
