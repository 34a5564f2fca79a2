"""SDXL's two text encoders, nested so that parameter names are the checkpoint keys.

* CLIP ViT-L (``conditioner.embedders.0.transformer.text_model.*``): Hugging Face CLIPTextModel layout (separate
  q/k/v projections, ``layer_norm1/2``, ``mlp.fc1/fc2``, quick-GELU). SDXL uses the hidden state after layer 11
  of 12 (transformers' ``hidden_states[-2]``), without the final LayerNorm; ``final_layer_norm`` is still a
  parameter of the file, so it is one here.
* OpenCLIP ViT-bigG (``conditioner.embedders.1.model.*``, the refiner's ``embedders.0``): open_clip layout (fused
  ``attn.in_proj_weight``, ``ln_1/ln_2``, ``mlp.c_fc/c_proj``, exact GELU, raw ``positional_embedding`` and
  ``text_projection`` parameters). SDXL uses the penultimate hidden state as context and
  ``ln_final(last hidden)[EOT] @ text_projection`` as the pooled vector.

Both are causal (CLIP's text tower attends to earlier tokens only) and pool at the end-of-text token: with
CLIP's legacy ``eos_token_id`` 2 at ``argmax(ids)`` (the EOT id is the largest in the vocabulary), else at the
first occurrence of ``eos_token_id`` -- the rule of transformers' CLIPTextTransformer.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from sdxl_ckpt.sdxl_runtime.config import TextEncoderConfig
from sdxl_ckpt.sdxl_runtime.device import Runtime
from sdxl_ckpt.sdxl_runtime.layers import Embedding, LayerNorm, activation, attention, dense, lazy_parameter, linear


def causal_mask(n: int) -> Tensor:
    """[n, n] additive mask: 0 on and below the diagonal, -inf above (each token sees itself and the past)."""
    return Tensor(np.triu(np.full((n, n), -np.inf, dtype=np.float32), k=1))


def eot_positions(ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """Index of the end-of-text token in each row of ``ids`` [B, N] (transformers' CLIPTextTransformer rule)."""
    ids = np.asarray(ids)
    if eos_token_id == 2:  # legacy configs: the EOT id is the largest id, so argmax finds it (first on ties)
        return ids.argmax(axis=-1)
    return (ids == eos_token_id).astype(np.int32).argmax(axis=-1)


# --- CLIP ViT-L, Hugging Face layout ------------------------------------------------------------------------------


class CLIPAttention(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, rt: Runtime) -> None:
        super().__init__()
        self.heads, self.rt = cfg.num_heads, rt
        self.q_proj = dense(cfg.hidden_size, cfg.hidden_size, rt)
        self.k_proj = dense(cfg.hidden_size, cfg.hidden_size, rt)
        self.v_proj = dense(cfg.hidden_size, cfg.hidden_size, rt)
        self.out_proj = dense(cfg.hidden_size, cfg.hidden_size, rt)

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, self.rt, mask)
        return self.out_proj(out)


class CLIPMLP(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, rt: Runtime) -> None:
        super().__init__()
        self.fc1 = dense(cfg.hidden_size, cfg.intermediate_size, rt)
        self.act = activation(cfg.hidden_act)
        self.fc2 = dense(cfg.intermediate_size, cfg.hidden_size, rt)

    def construct(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, rt: Runtime) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg, rt)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rt)
        self.mlp = CLIPMLP(cfg, rt)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rt)

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, rt: Runtime) -> None:
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, rt)
        self.position_embedding = Embedding(cfg.max_positions, cfg.hidden_size, rt)

    def construct(self, ids: Tensor) -> Tensor:
        positions = ops.arange(ids.shape[-1], dtype=ms.int32)
        return self.token_embedding(ids) + self.position_embedding(positions).expand_dims(0)


class CLIPEncoder(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, rt: Runtime) -> None:
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(cfg, rt) for _ in range(cfg.num_layers)])


class CLIPTextTransformer(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, rt: Runtime) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg, rt)
        self.encoder = CLIPEncoder(cfg, rt)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rt)


class CLIPTextModel(nn.Cell):
    """HF CLIPTextModel (``transformer.text_model.*``); returns the penultimate hidden state."""

    def __init__(self, cfg: TextEncoderConfig, rt: Runtime) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg, rt)

    def construct(self, ids: Tensor) -> Tensor:
        """ids [B, N] int32 -> hidden state after layer L-1 of L ([B, N, hidden]); the last layer is not run."""
        tm = self.text_model
        x = tm.embeddings(ids)
        mask = causal_mask(ids.shape[-1])
        for i in range(self.cfg.num_layers - 1):  # index, never slice: a sliced CellList re-parents its cells
            x = tm.encoder.layers[i](x, mask)
        return x


class FrozenCLIPEmbedder(nn.Cell):
    """sgm's wrapper: the HF model lives at ``.transformer``."""

    def __init__(self, cfg: TextEncoderConfig, rt: Runtime) -> None:
        super().__init__()
        self.transformer = CLIPTextModel(cfg, rt)

    def construct(self, ids: Tensor) -> Tensor:
        return self.transformer(ids)


# --- OpenCLIP ViT-bigG, open_clip layout --------------------------------------------------------------------------


class OpenCLIPAttention(nn.Cell):
    """torch.nn.MultiheadAttention's parameters: fused ``in_proj_weight`` [3C, C] (q, k, v) and ``out_proj``."""

    def __init__(self, cfg: TextEncoderConfig, rt: Runtime) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.heads, self.rt = cfg.num_heads, rt
        self.in_proj_weight = lazy_parameter((3 * c, c), rt)
        self.in_proj_bias = lazy_parameter((3 * c,), rt)
        self.out_proj = dense(c, c, rt)

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = ops.split(qkv, qkv.shape[-1] // 3, axis=-1)
        return self.out_proj(attention(q, k, v, self.heads, self.rt, mask))


class OpenCLIPMLP(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, rt: Runtime) -> None:
        super().__init__()
        self.c_fc = dense(cfg.hidden_size, cfg.intermediate_size, rt)
        self.gelu = activation(cfg.hidden_act)
        self.c_proj = dense(cfg.intermediate_size, cfg.hidden_size, rt)

    def construct(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, rt: Runtime) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rt)
        self.attn = OpenCLIPAttention(cfg, rt)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rt)
        self.mlp = OpenCLIPMLP(cfg, rt)

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, rt: Runtime) -> None:
        super().__init__()
        self.resblocks = nn.CellList([ResidualAttentionBlock(cfg, rt) for _ in range(cfg.num_layers)])


class OpenCLIPTextModel(nn.Cell):
    """open_clip's CLIP without the visual tower (``model.*``)."""

    def __init__(self, cfg: TextEncoderConfig, rt: Runtime) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, rt)
        self.positional_embedding = lazy_parameter((cfg.max_positions, cfg.hidden_size), rt)
        self.transformer = OpenCLIPTransformer(cfg, rt)
        self.ln_final = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rt)
        self.text_projection = lazy_parameter((cfg.hidden_size, cfg.projection_dim), rt)
        if cfg.has_logit_scale:  # CLIP's contrastive temperature: in the file, unused for conditioning
            self.logit_scale = lazy_parameter((), rt)

    def construct(self, ids: Tensor, eot: Tensor) -> tuple[Tensor, Tensor]:
        """ids [B, N] int32, eot [B] int32 -> (penultimate hidden [B, N, C], pooled [B, projection_dim])."""
        n = ids.shape[-1]
        x = self.token_embedding(ids) + self.positional_embedding[:n].expand_dims(0)
        mask = causal_mask(n)
        blocks = self.transformer.resblocks
        for i in range(self.cfg.num_layers - 1):
            x = blocks[i](x, mask)
        penultimate = x
        last = self.ln_final(blocks[self.cfg.num_layers - 1](x, mask))
        at_eot = ops.gather_d(last, 1, eot.reshape(-1, 1, 1).broadcast_to((last.shape[0], 1, last.shape[2])))
        pooled = ops.matmul(at_eot.squeeze(1), self.text_projection)
        return penultimate, pooled


class FrozenOpenCLIPEmbedder2(nn.Cell):
    """sgm's wrapper: the open_clip model lives at ``.model``."""

    def __init__(self, cfg: TextEncoderConfig, rt: Runtime) -> None:
        super().__init__()
        self.model = OpenCLIPTextModel(cfg, rt)

    def construct(self, ids: Tensor, eot: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(ids, eot)
