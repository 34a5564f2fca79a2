"""The weight change a LoRA group makes, in fp32, and how it lands on the SD tensor that holds the module's weight.

  linear  up (out, r) @ down (r, in)                                   -> (out, in)
  conv    up (out, r, 1, 1) with down (r, in, kh, kw): sum over r       -> (out, in, kh, kw)   (LoCon: 3x3 down, 1x1 up)
  tucker  up (out, r) . mid (r, r, kh, kw) . down (r, in): sum over both r -> (out, in, kh, kw) (LoCon lora_mid)
times ``scale`` = alpha / rank and the merge ratio. The three follow from the forward pass: x -> down -> (mid) -> up.

On the SD tensor (the module's rule transform): ``none`` adds it (reshaped when a 1x1 conv holds a linear's
weight); ``transpose`` adds its transpose (OpenCLIP ``text_projection`` is stored x @ P); ``concat_qkv`` adds it to
the q, k or v third of ``in_proj_weight``.
"""

from __future__ import annotations

import numpy as np

from sdxl_ckpt.errors import KeyMismatchError
from sdxl_ckpt.formats.dtypes import to_float32
from sdxl_ckpt.formats.entries import TensorEntry


def _f32(entry: TensorEntry) -> np.ndarray:
    return to_float32(entry.load(), entry.dtype).astype(np.float32, copy=False)


def lora_delta(down: TensorEntry, up: TensorEntry, mid: TensorEntry | None, scale: float) -> np.ndarray:
    """scale * (the product of the LoRA factors), fp32, in the module's own weight layout."""
    d, u = _f32(down), _f32(up)
    if d.ndim == 2:
        product = u @ d
    elif mid is None:
        product = np.einsum("or,rihw->oihw", u.reshape(u.shape[0], u.shape[1]), d)
    else:
        m = _f32(mid)
        product = np.einsum("oa,abhw,bi->oihw", u.reshape(u.shape[:2]), m, d.reshape(d.shape[:2]))
    return (product * np.float32(scale)).astype(np.float32, copy=False)


def delta_on_sd(delta: np.ndarray, transform: str, part: int | None, sd_shape: tuple[int, ...], key: str) -> np.ndarray:
    """The change of the whole SD tensor (fp32, ``sd_shape``) that ``delta`` of one module makes."""
    if transform == "transpose":
        delta = delta.reshape(delta.shape[0], -1).T
    if transform == "concat_qkv":
        rows = sd_shape[0] // 3
        full = np.zeros(sd_shape, dtype=np.float32)
        block = full[part * rows : (part + 1) * rows]
        if block.size != delta.size:
            raise KeyMismatchError(f"LoRA delta {list(delta.shape)} does not fit a third of {list(sd_shape)}", key=key)
        block += delta.reshape(block.shape)
        return full
    if delta.size != int(np.prod(sd_shape)) or delta.shape[:2] != tuple(sd_shape[:2]):
        raise KeyMismatchError(f"LoRA delta {list(delta.shape)} does not fit the weight {list(sd_shape)}", key=key)
    return np.ascontiguousarray(delta.reshape(sd_shape))
