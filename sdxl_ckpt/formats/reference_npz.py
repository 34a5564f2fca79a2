"""The reference file: one ``.npz`` of named arrays plus a JSON metadata string, shared by ``reference`` and ``verify``.

numpy only (no torch), so the MindSpore side can read what the PyTorch side wrote. The arrays (B = 2 with CFG,
batch order [uncond, cond]; ``*_uncond`` arrays exist only when the unconditional branch was encoded):

- ``ids1_cond``, ``ids1_uncond``, ``ids2_cond``, ``ids2_uncond`` (1, 77) int64: token ids of CLIP-L / OpenCLIP
- ``te1_hidden_*`` CLIP-L layer-11 hidden state; ``te2_hidden_*`` OpenCLIP penultimate; ``te2_pooled_*`` pooled
- ``time_ids`` (B, 6 | 5): the size/crop (refiner: size/crop/aesthetic) scalars; ``context`` (B, 77, C); ``y`` (B, adm)
- ``timestep_cond`` (1, d): LCM guidance embedding, only for UNets with ``time_cond_proj``
- ``noise`` (1, 4, h, w): the initial noise; ``sigmas`` (n+1,), ``timesteps`` (n,) of the steps run
- ``init_image`` (1, 3, H, W), ``init_latent`` (1, 4, h, w): img2img (refiner) input and its VAE encoding
- ``step_noise`` (n-1, 1, 4, h, w): fresh noise the LCM sampler drew between steps
- ``unet_in_x``, ``unet_in_t``, ``unet_in_context``, ``unet_in_y``, ``unet_out``: the first UNet call
- ``latents`` (n, 1, 4, h, w): the sample after every step, in the scheduler's space (metadata ``latent_space``)
- ``final_latent``, ``decoded`` (1, 3, H, W) raw VAE output, ``image`` (1, H, W, 3) in [0, 1], ``image_u8``
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_ckpt.errors import CorruptFileError, InputError
from sdxl_ckpt.formats.atomic import atomic_output

FORMAT = "sdxl-ckpt-reference/1"
META_KEY = "meta_json"
REQUIRED = (
    "noise",
    "sigmas",
    "timesteps",
    "time_ids",
    "context",
    "y",
    "unet_in_x",
    "unet_in_t",
    "unet_in_context",
    "unet_in_y",
    "unet_out",
    "latents",
    "final_latent",
    "decoded",
    "image",
    "image_u8",
)


@dataclass
class Reference:
    """Arrays by name and the metadata dict (settings, versions, component configs, alignment notes)."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.arrays[name]
        except KeyError:
            raise InputError(f"reference has no array {name!r}", path=self.meta.get("path")) from None

    def get(self, name: str) -> np.ndarray | None:
        return self.arrays.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    @property
    def settings(self) -> dict[str, Any]:
        return self.meta["settings"]

    @property
    def configs(self) -> dict[str, Any]:
        return self.meta["configs"]


def save_reference(path: str | os.PathLike, ref: Reference, overwrite: bool = False) -> Path:
    """Write atomically; arrays in sorted order so two runs give the same members in the same order."""
    meta = dict(ref.meta, format=FORMAT)
    with atomic_output(path, overwrite) as handle:
        np.savez(
            handle,
            **{k: ref.arrays[k] for k in sorted(ref.arrays)},
            **{META_KEY: np.array(json.dumps(meta, sort_keys=True))},
        )
    return Path(path)


def load_reference(path: str | os.PathLike) -> Reference:
    """Read a reference file; any problem becomes one InputError/CorruptFileError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise InputError("reference file not found", path=p)
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CorruptFileError(f"not a readable .npz reference ({exc})", path=p) from None
    if META_KEY not in arrays:
        raise CorruptFileError("no metadata: not written by 'sdxl-ckpt reference'", path=p)
    meta = json.loads(str(arrays.pop(META_KEY)))
    if meta.get("format") != FORMAT:
        raise InputError(f"unsupported reference format {meta.get('format')!r} (expected {FORMAT})", path=p)
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise CorruptFileError("reference lacks arrays: " + ", ".join(missing), path=p)
    meta["path"] = str(p)
    return Reference(arrays, meta)
