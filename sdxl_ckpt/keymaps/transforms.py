"""The value transforms between the diffusers and the SD layout, each defined once: shape rule, forward, inverse.

A rule in ``keymaps.diffusers_sd`` names its transform; everything that needs to know what the name means (the
diffusers -> SD plan, the keymap generator, the way back to diffusers) reads this table. Adding a transform is
one entry here plus the rule that names it.

  none        copy
  transpose   2-D matrix transposed (OpenCLIP ``text_projection``: SD computes x @ P, HF x @ W.T)
  conv1x1     Linear (C, C) -> Conv 1x1 (C, C, 1, 1) (VAE mid-attention weights)
  concat_qkv  the q, k, v tensors concatenated along dim 0 in q, k, v order (OpenCLIP ``attn.in_proj_*``)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Transform:
    """How a group of diffusers tensors becomes one SD tensor, and back.

    ``accepts`` tells whether the source shapes fit (checked while planning, before anything is written);
    ``inverse_shape`` gives the diffusers shapes one SD tensor splits into, or None when the SD shape cannot be an
    output of this transform (the way back checks it while planning, as ``accepts`` does on the way there);
    ``byte_preserving``: the SD tensor holds exactly the source bytes, so a writer may copy them unchanged.
    """

    name: str
    sources: int  # how many diffusers tensors feed one SD tensor
    accepts: Callable[[Sequence[Shape]], bool]
    shape: Callable[[Sequence[Shape]], Shape]
    forward: Callable[[list[np.ndarray]], np.ndarray]
    inverse: Callable[[np.ndarray], list[np.ndarray]]
    inverse_shape: Callable[[Shape], list[Shape] | None]
    byte_preserving: bool
    needs: str = ""  # what ``accepts`` demands, for the error message


def _split3(array: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(part) for part in np.split(array, 3, axis=0)]


def _split3_shape(shape: Shape) -> list[Shape] | None:
    if not shape or shape[0] % 3:
        return None
    return [(shape[0] // 3, *shape[1:])] * 3


TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform(
            "none",
            1,
            accepts=lambda shapes: True,
            shape=lambda shapes: shapes[0],
            forward=lambda arrays: arrays[0],
            inverse=lambda array: [array],
            inverse_shape=lambda shape: [shape],
            byte_preserving=True,
        ),
        Transform(
            "transpose",
            1,
            accepts=lambda shapes: len(shapes[0]) == 2,
            shape=lambda shapes: (shapes[0][1], shapes[0][0]),
            forward=lambda arrays: np.ascontiguousarray(arrays[0].T),
            inverse=lambda array: [np.ascontiguousarray(array.T)],
            inverse_shape=lambda shape: [(shape[1], shape[0])] if len(shape) == 2 else None,
            byte_preserving=False,
            needs="a 2-D matrix",
        ),
        Transform(
            "conv1x1",
            1,
            accepts=lambda shapes: len(shapes[0]) == 2,
            shape=lambda shapes: (*shapes[0], 1, 1),
            forward=lambda arrays: arrays[0].reshape(*arrays[0].shape, 1, 1),
            inverse=lambda array: [array.reshape(array.shape[:2])],
            inverse_shape=lambda shape: [shape[:2]] if len(shape) == 4 and shape[2:] == (1, 1) else None,
            byte_preserving=True,
            needs="a 2-D matrix",
        ),
        Transform(
            "concat_qkv",
            3,
            accepts=lambda shapes: bool(shapes[0]) and all(s == shapes[0] for s in shapes),
            shape=lambda shapes: (sum(s[0] for s in shapes), *shapes[0][1:]),
            forward=lambda arrays: np.concatenate(arrays, axis=0),
            inverse=_split3,
            inverse_shape=_split3_shape,
            byte_preserving=False,
            needs="q, k, v of one shape, not scalars",
        ),
    )
}
