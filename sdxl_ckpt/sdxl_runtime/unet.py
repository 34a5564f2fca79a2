"""The SDXL UNet in sgm's openaimodel layout (``model.diffusion_model.*``), built from a UNetConfig.

Layout (what the checkpoint names are made of):
  time_embed.{0,2}          Linear-SiLU-Linear on the cos-first sinusoidal embedding of t
  time_cond_proj            (LCM with guidance embedding only) Linear without bias added to that embedding
  label_emb.0.{0,2}         Linear-SiLU-Linear on y (pooled text ++ size/crop embeddings), added to the time embedding
  input_blocks.0.0          conv_in
  input_blocks.N.{0,1}      ResBlock (+ SpatialTransformer at attention levels), N = 1 + level*(resnets+1) + j
  input_blocks.N.0.op       Downsample (3x3 stride-2 conv) at the end of every level but the last
  middle_block.{0,1,2}      ResBlock, SpatialTransformer, ResBlock
  output_blocks.N.{0,1,2}   ResBlock on [h ++ skip] (+ SpatialTransformer) (+ Upsample ``.conv`` ending a level > 0)
  out.{0,2}                 GroupNorm-SiLU-conv_out
Every count comes from the config, so the 3-level base, the 4-level refiner and the tiny models all come out.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from sdxl_ckpt.sdxl_runtime.config import UNetConfig
from sdxl_ckpt.sdxl_runtime.device import Runtime
from sdxl_ckpt.sdxl_runtime.layers import (
    GELU,
    GroupNorm,
    LayerNorm,
    Upsample,
    attention,
    conv2d,
    dense,
    timestep_embedding,
)


class ResBlock(nn.Cell):
    """``in_layers`` (norm, SiLU, conv), ``emb_layers`` (SiLU, Linear), ``out_layers`` (norm, SiLU, dropout, conv),
    ``skip_connection`` (1x1 conv when the width changes, else identity with no parameters)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, cfg: UNetConfig, rt: Runtime) -> None:
        super().__init__()
        self.in_layers = nn.SequentialCell(
            [
                GroupNorm(cfg.norm_num_groups, channels, cfg.norm_eps, rt),
                nn.SiLU(),
                conv2d(channels, out_channels, 3, rt, padding=1),
            ]
        )
        self.emb_layers = nn.SequentialCell([nn.SiLU(), dense(emb_channels, out_channels, rt)])
        self.out_layers = nn.SequentialCell(
            [
                GroupNorm(cfg.norm_num_groups, out_channels, cfg.norm_eps, rt),
                nn.SiLU(),
                nn.Identity(),
                conv2d(out_channels, out_channels, 3, rt, padding=1),
            ]
        )
        self.has_skip_conv = channels != out_channels
        if self.has_skip_conv:
            self.skip_connection = conv2d(channels, out_channels, 1, rt)

    def construct(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).astype(h.dtype).expand_dims(-1).expand_dims(-1)
        h = self.out_layers(h)
        return (self.skip_connection(x) if self.has_skip_conv else x) + h


class CrossAttention(nn.Cell):
    """``to_q/to_k/to_v`` without bias, ``to_out.0`` with; self-attention when no context is given."""

    def __init__(self, dim: int, context_dim: int, heads: int, rt: Runtime) -> None:
        super().__init__()
        self.heads, self.rt = heads, rt
        self.to_q = dense(dim, dim, rt, bias=False)
        self.to_k = dense(context_dim, dim, rt, bias=False)
        self.to_v = dense(context_dim, dim, rt, bias=False)
        self.to_out = nn.SequentialCell([dense(dim, dim, rt)])

    def construct(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        ctx = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads, self.rt))


class GEGLU(nn.Cell):
    """``proj`` to twice the inner width; first half times GELU(second half) (exact GELU).

    The gate is copied out of the projection before the GELU: its four elementwise kernels run about 1.4x faster
    on a contiguous tensor than on the strided half (MindSpore CPU), and the result is the same.
    """

    def __init__(self, dim: int, inner: int, rt: Runtime) -> None:
        super().__init__()
        self.proj = dense(dim, 2 * inner, rt)
        self.gelu = GELU()

    def construct(self, x: Tensor) -> Tensor:
        hidden, gate = ops.chunk(self.proj(x), 2, axis=-1)
        return hidden * self.gelu(gate.contiguous())


class FeedForward(nn.Cell):
    """``net.0`` GEGLU, ``net.1`` dropout (identity at inference), ``net.2`` Linear."""

    def __init__(self, dim: int, rt: Runtime, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.SequentialCell([GEGLU(dim, mult * dim, rt), nn.Identity(), dense(mult * dim, dim, rt)])

    def construct(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    def __init__(self, dim: int, heads: int, cfg: UNetConfig, rt: Runtime) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, rt)
        self.ff = FeedForward(dim, rt)
        self.attn2 = CrossAttention(dim, cfg.context_dim, heads, rt)
        self.norm1 = LayerNorm(dim, cfg.layer_norm_eps, rt)
        self.norm2 = LayerNorm(dim, cfg.layer_norm_eps, rt)
        self.norm3 = LayerNorm(dim, cfg.layer_norm_eps, rt)

    def construct(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Cell):
    """GroupNorm, ``proj_in``, ``depth`` transformer blocks on [B, HW, C], ``proj_out``, residual.

    The projections are Linear on the tokens (SDXL, ``use_linear_projection``) or 1x1 convs on the feature map
    (weights [C, C, 1, 1]; the same map, applied before the reshape to tokens and after the reshape back).
    ``depth`` may be 0 (distilled UNets keep the norm and projections of a thinned-out transformer).
    """

    def __init__(self, channels: int, heads: int, depth: int, cfg: UNetConfig, rt: Runtime) -> None:
        super().__init__()
        self.linear = cfg.linear_projection
        self.norm = GroupNorm(cfg.norm_num_groups, channels, cfg.transformer_norm_eps, rt)
        project = (
            (lambda: dense(channels, channels, rt)) if self.linear else (lambda: conv2d(channels, channels, 1, rt))
        )
        self.proj_in = project()
        self.transformer_blocks = nn.CellList([BasicTransformerBlock(channels, heads, cfg, rt) for _ in range(depth)])
        self.proj_out = project()

    def construct(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hidden = self.norm(x)
        if not self.linear:
            hidden = self.proj_in(hidden)
        tokens = hidden.reshape(b, c, h * w).transpose(0, 2, 1)
        if self.linear:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.linear:
            tokens = self.proj_out(tokens)
        hidden = tokens.transpose(0, 2, 1).reshape(b, c, h, w)
        if not self.linear:
            hidden = self.proj_out(hidden)
        return hidden + x


class Downsample(nn.Cell):
    """``op``: 3x3 conv, stride 2, padding 1."""

    def __init__(self, channels: int, rt: Runtime) -> None:
        super().__init__()
        self.op = conv2d(channels, channels, 3, rt, stride=2, padding=1)

    def construct(self, x: Tensor) -> Tensor:
        return self.op(x)


class TimestepEmbedSequential(nn.CellList):
    """A list of layers, each fed what it needs: ResBlocks the embedding, SpatialTransformers the context."""

    def construct(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Cell):
    """eps = UNet(x, t, context, y[, w_cond]): the ``model.diffusion_model`` of sgm."""

    def __init__(self, cfg: UNetConfig, rt: Runtime) -> None:
        super().__init__()
        self.cfg, self.rt = cfg, rt
        mc, ted = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.SequentialCell([dense(mc, ted, rt), nn.SiLU(), dense(ted, ted, rt)])
        if cfg.time_cond_proj_dim is not None:
            self.time_cond_proj = dense(cfg.time_cond_proj_dim, mc, rt, bias=False)
        self.label_emb = nn.SequentialCell(
            [nn.SequentialCell([dense(cfg.adm_in_channels, ted, rt), nn.SiLU(), dense(ted, ted, rt)])]
        )

        def transformer(level: int, channels: int, depth: int) -> SpatialTransformer:
            return SpatialTransformer(channels, cfg.num_heads[level], depth, cfg, rt)

        blocks: list[list[nn.Cell]] = [[conv2d(cfg.in_channels, mc, 3, rt, padding=1)]]
        skip_channels, ch = [mc], mc
        for level, width in enumerate(cfg.block_out_channels):
            for j in range(cfg.layers_per_block[level]):
                layers: list[nn.Cell] = [ResBlock(ch, ted, width, cfg, rt)]
                ch = width
                if cfg.attention[level]:
                    layers.append(transformer(level, ch, cfg.transformer_depth[level][j]))
                blocks.append(layers)
                skip_channels.append(ch)
            if level != cfg.num_levels - 1:
                blocks.append([Downsample(ch, rt)])
                skip_channels.append(ch)
        self.input_blocks = nn.CellList([TimestepEmbedSequential(b) for b in blocks])

        self.middle_block = TimestepEmbedSequential(
            [
                ResBlock(ch, ted, ch, cfg, rt),
                SpatialTransformer(ch, cfg.num_heads_middle, cfg.transformer_depth_middle, cfg, rt),
                ResBlock(ch, ted, ch, cfg, rt),
            ]
        )

        blocks = []
        for level in reversed(range(cfg.num_levels)):
            width = cfg.block_out_channels[level]
            for i in range(cfg.layers_per_block[level] + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, width, cfg, rt)]
                ch = width
                if cfg.attention_up[level]:
                    layers.append(transformer(level, ch, cfg.transformer_depth_up[level][i]))
                if level and i == cfg.layers_per_block[level]:
                    layers.append(Upsample(ch, rt))
                blocks.append(layers)
        self.output_blocks = nn.CellList([TimestepEmbedSequential(b) for b in blocks])
        self.out = nn.SequentialCell(
            [
                GroupNorm(cfg.norm_num_groups, ch, cfg.norm_eps, rt),
                nn.SiLU(),
                conv2d(mc, cfg.out_channels, 3, rt, padding=1),
            ]
        )

    def embed(self, t: Tensor, y: Tensor, w_cond: Tensor | None = None) -> Tensor:
        """Time (+ guidance) embedding plus the label (y) embedding: the ``emb`` every ResBlock receives."""
        t_emb = timestep_embedding(t, self.cfg.model_channels).astype(self.rt.ms_dtype)
        if w_cond is not None:
            if self.cfg.time_cond_proj_dim is None:
                raise ValueError("this UNet has no time_cond_proj: it takes no guidance embedding (w_cond)")
            t_emb = t_emb + self.time_cond_proj(w_cond.astype(self.rt.ms_dtype))
        return self.time_embed(t_emb) + self.label_emb(y.astype(self.rt.ms_dtype))

    def construct(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor, w_cond: Tensor | None = None) -> Tensor:
        """x [B, 4, h, w], t [B] (float or int timesteps), context [B, N, context_dim], y [B, adm_in_channels],
        w_cond [B, time_cond_proj_dim] (the guidance-scale embedding, LCM with cond_proj only) -> eps [B, 4, h, w]."""
        emb = self.embed(t, y, w_cond)
        context = context.astype(self.rt.ms_dtype)
        h = x.astype(self.rt.ms_dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(ops.cat([h, skips.pop()], axis=1), emb, context)
        return self.out(h).astype(ms.float32)


class DiffusionWrapper(nn.Cell):
    """sgm's ``model`` (OpenAIWrapper): holds the UNet at ``.diffusion_model``."""

    def __init__(self, cfg: UNetConfig, rt: Runtime) -> None:
        super().__init__()
        self.diffusion_model = UNetModel(cfg, rt)


def guidance_scale_embedding(w: np.ndarray | float, dim: int) -> np.ndarray:
    """The ``w_cond`` an LCM UNet with ``time_cond_proj`` takes: sin-first embedding of ``w * 1000`` [B, dim].

    ``w = guidance_scale - 1``; the rule (and float32 order) of diffusers' ``get_guidance_scale_embedding``,
    which differs from the timestep embedding: sin first, and frequencies over ``half - 1``. exp, sin and cos
    are evaluated in float64 and rounded (see ``layers.sinusoid_frequencies``).
    """
    w = np.asarray(w, dtype=np.float32).reshape(-1) * np.float32(1000.0)
    half = dim // 2
    step = np.float32(np.log(np.float32(10000.0))) / np.float32(half - 1)
    freqs = np.exp((np.arange(half, dtype=np.float32) * -step).astype(np.float64)).astype(np.float32)
    args = (w[:, None] * freqs[None, :]).astype(np.float64)  # rounded to float32 first, as in diffusers
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1).astype(np.float32)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)
