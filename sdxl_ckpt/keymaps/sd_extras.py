"""SD single files as other tools save them, brought to the SD layout this project's rules expect, saying what changed.

Nothing is dropped or changed silently; every step below names the keys in the report:

* marker tensors (``edm_mean``, ``v_pred``...: ``sdxl.variants.MARKERS``) are KEPT unchanged in every format;
* trainer leftovers (DDPM buffers, ``denoiser.sigmas``, ``model_ema.*``) are DROPPED, each with its reason;
* floating ``position_ids`` are NORMALISED to int64 (rounded, as ComfyUI reads them);
* VAE attention saved in diffusers style inside an SGM file (``mid.attn_1.to_q.weight``, linear shapes) is
  RENAMED to ``q`` / ``k`` / ``v`` / ``proj_out`` with the 1x1 conv shape (same bytes);
* a file without a VAE is refused unless another file gives one (``--vae``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.formats.dtypes import FLOAT_DTYPES, to_float32
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.keymaps.transforms import TRANSFORMS
from sdxl_ckpt.sdxl.variants import MARKERS, leftover_reason

VAE_PREFIX = "first_stage_model."
POSITION_IDS = ".position_ids"
# diffusers' VAE attention names inside an LDM file -> LDM names (a Linear (C, C) becomes a Conv 1x1 (C, C, 1, 1))
VAE_ATTENTION = re.compile(
    r"(?P<p>first_stage_model\.(?:encoder|decoder)\.mid\.attn_1\.)(?P<n>to_q|to_k|to_v|to_out\.0|group_norm)"
    r"\.(?P<w>weight|bias)"
)
VAE_ATTENTION_NAMES = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out", "group_norm": "norm"}


@dataclass
class Prepared:
    """The input's tensors under SD names, ready for the exact check, and what was done to get there."""

    entries: dict[str, TensorEntry]
    markers: dict[str, str] = field(default_factory=dict)  # kept marker tensor -> what it says
    dropped: dict[str, str] = field(default_factory=dict)  # dropped key -> why
    notes: list[str] = field(default_factory=list)


def _rounded_ids(entry: TensorEntry) -> TensorEntry:
    def load() -> np.ndarray:
        array = entry.load()
        values = to_float32(array, entry.dtype) if entry.dtype in FLOAT_DTYPES else array
        return np.rint(values).astype(np.int64).reshape(entry.shape)

    return TensorEntry(entry.name, "I64", entry.shape, load, source=entry.source)


def _vae_attention(entry: TensorEntry, name: str) -> TensorEntry:
    if len(entry.shape) != 2:
        return replace(entry, name=name)
    conv = TRANSFORMS["conv1x1"]
    shape = conv.shape([entry.shape])
    # same bytes in the same order: the source span may still be copied as it is
    return TensorEntry(
        name,
        entry.dtype,
        shape,
        lambda: conv.forward([entry.load()]),
        source=entry.source,
        span=entry.passthrough_span,
    )


def _with_vae(entries: dict[str, TensorEntry], vae: Mapping[str, TensorEntry], vae_path: object) -> list[str]:
    """Take the VAE from another file (SD names, or an LDM VAE file without the ``first_stage_model.`` prefix)."""
    taken = {}
    for name, entry in vae.items():
        if name.startswith(VAE_PREFIX):
            taken[name] = entry
        elif name.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
            taken[VAE_PREFIX + name] = entry
    if not taken:
        raise InputError("no VAE tensors (first_stage_model.* or encoder.* / decoder.* in LDM names)", path=vae_path)
    if any(".down_blocks." in n or ".up_blocks." in n for n in taken):
        raise InputError(
            "a VAE in diffusers names (down_blocks / up_blocks): give its folder to diffusers-to-sd --vae instead",
            path=vae_path,
        )
    replaced = [n for n in entries if n.startswith(VAE_PREFIX)]
    for name in replaced:
        del entries[name]
    entries.update({n: replace(e, name=n) for n, e in taken.items()})
    verb = "replaced by" if replaced else "taken from"
    return [f"VAE ({len(taken)} tensors) {verb} {vae_path}"]


def prepare_sd(
    entries: Mapping[str, TensorEntry],
    *,
    vae: Mapping[str, TensorEntry] | None = None,
    vae_path: object = None,
    path: object = None,
) -> Prepared:
    """Markers kept, leftovers dropped, oddities normalised, the VAE taken from ``vae`` when given (names only)."""
    prepared = Prepared({})
    renamed_attention = []
    for name, entry in entries.items():
        if name in MARKERS:
            prepared.markers[name] = MARKERS[name]
            prepared.entries[name] = entry
            continue
        why = leftover_reason(name)
        if why is not None:
            prepared.dropped[name] = why
            continue
        match = VAE_ATTENTION.fullmatch(name)
        if match:
            new = f"{match['p']}{VAE_ATTENTION_NAMES[match['n']]}.{match['w']}"
            prepared.entries[new] = _vae_attention(entry, new)
            renamed_attention.append(name)
            continue
        if name.endswith(POSITION_IDS) and entry.dtype in FLOAT_DTYPES:
            prepared.entries[name] = _rounded_ids(entry)
            prepared.notes.append(f"{name} is {entry.dtype}: written as int64 (rounded), the dtype SDXL files use")
            continue
        prepared.entries[name] = entry
    if renamed_attention:
        prepared.notes.append(
            f"VAE attention in diffusers style ({len(renamed_attention)} tensors such as {renamed_attention[0]!r}) "
            "renamed to the LDM names q / k / v / proj_out / norm, linear weights as 1x1 convs (same bytes)"
        )
    if vae is not None:
        prepared.notes += _with_vae(prepared.entries, vae, vae_path)
    elif not any(n.startswith(VAE_PREFIX) for n in prepared.entries):
        raise InputError(
            "no VAE in this file (no first_stage_model.* tensors); pass --vae FILE to take it from another file",
            path=path,
        )
    return prepared
