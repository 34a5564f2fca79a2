"""A small MindSpore SDXL whose parameter names ARE the MindSpore keymap names.

Networks and loading: ``config`` (shapes from diffusers configs, presets), ``text_encoders``, ``conditioner``,
``unet``, ``vae``, ``model`` (the whole net, nested like sgm), ``loader`` (strict streaming fill), ``api``
(``SDXLRuntime``: numpy in, numpy out). Sampling math: ``sampling``. MindSpore only: torch is never imported here.
Submodules are imported on first use, so ``sdxl_runtime.sampling`` does not pull in MindSpore.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "SDXLRuntime": "sdxl_ckpt.sdxl_runtime.api",
    "SDXLConfig": "sdxl_ckpt.sdxl_runtime.config",
    "preset": "sdxl_ckpt.sdxl_runtime.config",
    "from_diffusers_configs": "sdxl_ckpt.sdxl_runtime.config",
    "from_metadata": "sdxl_ckpt.sdxl_runtime.config",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
