"""sgm's GeneralConditioner: text encoders and size embedders -> (context, y) for the UNet.

Embedders, in ``conditioner.embedders.N`` order (the size embedders have no parameters but keep their slot, so
the text encoders sit at the indices the checkpoint names use):
  base:    0 CLIP-L (hidden), 1 OpenCLIP (hidden + pooled), 2 original_size, 3 crop_coords_top_left, 4 target_size
  refiner: 0 OpenCLIP (hidden + pooled), 1 original_size, 2 crop_coords_top_left, 3 aesthetic_score
context = concat(text hidden states) on the channel axis; y = [pooled | emb(scalar) for every size scalar],
each scalar a cos-first sinusoidal embedding of width ``addition_time_embed_dim`` (sgm's
ConcatTimestepEmbedderND = diffusers' ``add_time_proj`` on the flattened ``add_time_ids``).
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from sdxl_ckpt.sdxl_runtime.config import SDXLConfig
from sdxl_ckpt.sdxl_runtime.device import Runtime
from sdxl_ckpt.sdxl_runtime.layers import timestep_embedding
from sdxl_ckpt.sdxl_runtime.text_encoders import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2, eot_positions


class ConcatTimestepEmbedderND(nn.Cell):
    """Embeds each of the ``n`` scalars of one input (e.g. (h, w)) and concatenates: [B, n] -> [B, n*dim]."""

    def __init__(self, outdim: int, key: str) -> None:
        super().__init__()
        self.outdim, self.key = outdim, key

    def construct(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, -1)


class GeneralConditioner(nn.Cell):
    """``conditioner``: holds ``embedders`` and assembles context and y."""

    def __init__(self, config: SDXLConfig, rt: Runtime, with_text: bool = True) -> None:
        super().__init__()
        self.config = config
        dim = config.unet.addition_time_embed_dim
        size_keys = (
            "original_size_as_tuple",
            "crop_coords_top_left",
            "aesthetic_score" if config.is_refiner else "target_size_as_tuple",
        )
        text: list[nn.Cell] = []
        if with_text:
            if config.clip_l is not None:
                text.append(FrozenCLIPEmbedder(config.clip_l, rt))
            text.append(FrozenOpenCLIPEmbedder2(config.openclip, rt))
        self.num_text = len(text)
        self.embedders = nn.CellList(text + [ConcatTimestepEmbedderND(dim, k) for k in size_keys])

    def encode_text(self, ids_l: np.ndarray | None, ids_g: np.ndarray) -> tuple[Tensor | None, Tensor, Tensor]:
        """Token ids [B, 77] -> (CLIP-L penultimate hidden or None for the refiner, OpenCLIP penultimate, pooled)."""
        if self.num_text == 0:
            raise ValueError("this conditioner was built without text encoders")
        clip_l = None
        index = 0
        if self.config.clip_l is not None:
            if ids_l is None:
                raise ValueError("the base model needs CLIP-L token ids (ids_l)")
            clip_l = self.embedders[0](Tensor(np.asarray(ids_l), ms.int32))
            index = 1
        eot = Tensor(eot_positions(ids_g, self.config.openclip.eos_token_id), ms.int32)
        hidden, pooled = self.embedders[index](Tensor(np.asarray(ids_g), ms.int32), eot)
        return clip_l, hidden, pooled

    def vector(self, pooled: Tensor, sizes: list[np.ndarray]) -> Tensor:
        """y = [pooled | embedded size scalars]; ``sizes`` one [B, n] array per size embedder, in order."""
        size_embedders = [self.embedders[i] for i in range(self.num_text, len(self.embedders))]
        if len(sizes) != len(size_embedders):
            raise ValueError(f"expected {len(size_embedders)} size inputs, got {len(sizes)}")
        parts = [pooled.astype(ms.float32)]
        for emb, value in zip(size_embedders, sizes):
            parts.append(emb(Tensor(np.asarray(value, dtype=np.float32).reshape(pooled.shape[0], -1))))
        return ops.cat(parts, axis=-1)

    @staticmethod
    def context(hiddens: list[Tensor]) -> Tensor:
        return ops.cat([h.astype(ms.float32) for h in hiddens], axis=-1)
