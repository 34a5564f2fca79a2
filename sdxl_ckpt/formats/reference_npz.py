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
