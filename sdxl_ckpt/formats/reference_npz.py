"""The reference file: one ``.npz`` of named arrays plus a JSON metadata string, shared by ``reference`` and ``verify``.

numpy only (no torch), so the MindSpore side can read what the PyTorch side wrote. ``ARRAYS`` declares every
array the file may hold (B = 2 with CFG, batch order [uncond, cond]); the writer refuses an undeclared name, so
the two sides cannot drift apart silently.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_ckpt.errors import CorruptFileError, InputError
from sdxl_ckpt.formats.atomic import atomic_output

FORMAT = "sdxl-ckpt-reference/1"
META_KEY = "meta_json"
# name -> (required, what it holds); a name with "{b}" exists once per encoded text branch (``cond``, and
# ``uncond`` when the unconditional prompt was encoded rather than zeroed)
ARRAYS: dict[str, tuple[bool, str]] = {
    "ids1_{b}": (False, "(1, 77) int64 token ids of CLIP-L (base only)"),
    "ids2_{b}": (False, "(1, 77) int64 token ids of OpenCLIP"),
    "te1_hidden_{b}": (False, "CLIP-L layer-11 hidden state (base only)"),
    "te2_hidden_{b}": (False, "OpenCLIP penultimate hidden state"),
    "te2_pooled_{b}": (False, "OpenCLIP pooled, projected output"),
    "time_ids": (True, "(B, 6 | 5) size/crop (refiner: size/crop/aesthetic) scalars"),
    "context": (True, "(B, 77, C) cross-attention context"),
    "y": (True, "(B, adm) the UNet's vector conditioning"),
    "timestep_cond": (False, "(1, d) LCM guidance embedding, only for UNets with time_cond_proj"),
    "noise": (True, "(1, 4, h, w) the initial noise"),
    "sigmas": (True, "(n+1,) sigmas of the steps run"),
    "timesteps": (True, "(n,) the UNet timesteps of the steps run: int64 (DDPM) or float32 c_noise (EDM)"),
    "init_image": (False, "(1, 3, H, W) in [-1, 1]: img2img (refiner), inpainting or instruct-pix2pix input"),
    "init_latent": (False, "(1, 4, h, w) its VAE encoding (posterior mean, scaled): refiner, inpainting strength < 1"),
    "inpaint_mask": (False, "(1, 1, H, W) inpainting mask given to the pipeline (1 = repaint)"),
    "masked_image": (False, "(1, 3, H, W) what inpainting VAE-encoded: init_image * (mask < 0.5)"),
    "inpaint_mask_latent": (False, "(1, 1, h, w) the mask at latent size (nearest): UNet input channel 4"),
    "masked_image_latent": (False, "(1, 4, h, w) masked image, posterior mean * scaling: UNet input channels 5-8"),
    "image_latent": (False, "(1, 4, h, w) instruct-pix2pix: init_image posterior mean, unscaled: channels 4-7"),
    "step_noise": (False, "(n-1, 1, 4, h, w) fresh noise the LCM sampler drew between steps"),
    "unet_in_x": (True, "first UNet call: input sample"),
    "unet_in_t": (True, "first UNet call: timestep (int64, or float32 c_noise for EDM)"),
    "unet_in_context": (True, "first UNet call: context"),
    "unet_in_y": (True, "first UNet call: y"),
    "unet_out": (True, "first UNet call: output"),
    "latents": (True, "(n, 1, 4, h, w) the sample after every step, in the scheduler's space (meta latent_space)"),
    "final_latent": (True, "the last sample"),
    "decoded": (True, "(1, 3, H, W) raw VAE output"),
    "image": (True, "(1, H, W, 3) in [0, 1]"),
    "image_u8": (True, "(1, H, W, 3) uint8, as the pipeline's PIL image"),
}
BRANCHES = ("cond", "uncond")
REQUIRED = tuple(name for name, (required, _) in ARRAYS.items() if required)
DECLARED = frozenset(name.format(b=b) for name in ARRAYS for b in BRANCHES)


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
    undeclared = sorted(set(ref.arrays) - DECLARED)
    if undeclared:  # a programming error: the schema above is the contract between the two sides
        raise ValueError(f"reference arrays not declared in reference_npz.ARRAYS: {undeclared}")
    meta = dict(ref.meta, format=FORMAT)
    with atomic_output(path, overwrite) as handle:
        np.savez(
            handle,
            **{k: ref.arrays[k] for k in sorted(ref.arrays)},
            **{META_KEY: np.array(json.dumps(meta, sort_keys=True))},
        )
    return Path(path)


# what a malformed zip / .npy member can raise from zipfile, zlib and numpy's header parser
_NPZ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    ValueError,
    OSError,
    EOFError,
    KeyError,
    RuntimeError,
    NotImplementedError,
    SyntaxError,
    struct.error,
    zlib.error,
)
MAX_DEFLATE_RATIO = 1100  # deflate cannot expand beyond ~1032:1; a member claiming more is a lie or a bomb


def _check_members(p: Path) -> None:
    """Every member is a ``.npy`` whose header's shape fits in the bytes the zip really holds, so a hostile header
    (a shape of 10**12 elements in a 1 KiB file) is refused before numpy allocates anything."""
    archive_size = p.stat().st_size
    with zipfile.ZipFile(p) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise CorruptFileError(f"member {info.filename!r} is not a .npy array", path=p)
            if info.compress_size > archive_size or info.file_size > max(info.compress_size, 1) * MAX_DEFLATE_RATIO:
                raise CorruptFileError(f"member {info.filename!r} claims an impossible size", path=p)
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, _fortran, dtype = np.lib.format.read_array_header_1_0(member)
                else:
                    shape, _fortran, dtype = np.lib.format.read_array_header_2_0(member)
            if dtype.hasobject:
                raise CorruptFileError(f"member {info.filename!r} holds Python objects (never unpickled)", path=p)
            if math.prod(shape) * dtype.itemsize > info.file_size:
                raise CorruptFileError(
                    f"member {info.filename!r} claims shape {list(shape)} {dtype} but holds {info.file_size} bytes",
                    path=p,
                )


def load_reference(path: str | os.PathLike) -> Reference:
    """Read a reference file; any problem becomes one InputError/CorruptFileError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise InputError("reference file not found", path=p)
    try:
        _check_members(p)
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except _NPZ_ERRORS as exc:
        text = " ".join(str(exc).split())[:200]
        raise CorruptFileError(f"not a readable .npz reference ({exc.__class__.__name__}: {text})", path=p) from None
    if META_KEY not in arrays:
        raise CorruptFileError("no metadata: not written by 'sdxl-ckpt reference'", path=p)
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
    except (ValueError, RecursionError) as exc:
        raise CorruptFileError(f"metadata is not valid JSON ({exc.__class__.__name__})", path=p) from None
    if not isinstance(meta, dict):
        raise CorruptFileError("metadata is not a JSON object", path=p)
    if meta.get("format") != FORMAT:
        raise InputError(f"unsupported reference format {meta.get('format')!r} (expected {FORMAT})", path=p)
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise CorruptFileError("reference lacks arrays: " + ", ".join(missing), path=p)
    meta["path"] = str(p)
    return Reference(arrays, meta)
