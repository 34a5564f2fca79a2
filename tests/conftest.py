"""Session-wide tiny SDXL-shaped pipelines (built once, offline, a few seconds each).

Tests must treat these folders as read-only: copy one (shutil.copytree) before changing anything in it.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, variant: str, **kwargs) -> Path:
    pytest.importorskip("diffusers")
    from sdxl_ckpt.testmodels.tiny import build_tiny_model

    return build_tiny_model(variant, tmp_path_factory.mktemp(name) / "pipe", seed=0, **kwargs)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL base pipeline folder (fp32, CLIP-L keys with ``text_model.``, unsharded)."""
    return _build(tmp_path_factory, "tiny_base", "base")


@pytest.fixture(scope="session")
def tiny_refiner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL refiner pipeline folder (no text_encoder/tokenizer; 4-level UNet)."""
    return _build(tmp_path_factory, "tiny_refiner", "refiner")


@pytest.fixture(scope="session")
def tiny_lcm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base pipeline whose ``lcm-unet/`` subfolder holds the distilled UNet (base structure, seed 1)."""
    return _build(tmp_path_factory, "tiny_lcm", "lcm")


@pytest.fixture(scope="session")
def tiny_lcm_cond_proj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As ``tiny_lcm``, but ``lcm-unet/`` has ``time_cond_proj_dim`` 16 and ``time_embedding.cond_proj.weight``."""
    return _build(tmp_path_factory, "tiny_lcm_cp", "lcm", cond_proj=True)
