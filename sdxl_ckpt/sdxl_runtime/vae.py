"""SDXL's AutoencoderKL in the LDM layout (``first_stage_model.*``): encoder, decoder, quant convs.

Names: ``encoder.down.i.block.j`` / ``encoder.down.i.downsample.conv``, ``{encoder,decoder}.mid.{block_1,attn_1,
block_2}`` (attn_1: ``norm``, 1x1-conv ``q``/``k``/``v``/``proj_out``), ``decoder.up.i.block.j`` /
``decoder.up.i.upsample.conv`` where ``i`` is the LEVEL (0 = full resolution; the decoder runs i = n-1 .. 0),
``norm_out``, ``conv_in/conv_out``, ``quant_conv`` (2z -> 2z) and ``post_quant_conv`` (z -> z).

``decode(z)`` takes the VAE latent (sampler latent / scaling_factor) and returns the image in [-1, 1];
``encode(image)`` returns the mean of the posterior (unscaled), as diffusers' ``latent_dist.mean``.
"""

from __future__ import annotations

import math

import mindspore as ms
from mindspore import Tensor, nn, ops

from sdxl_ckpt.sdxl_runtime.config import VAEConfig
from sdxl_ckpt.sdxl_runtime.device import Runtime
from sdxl_ckpt.sdxl_runtime.layers import GroupNorm, Upsample, batch_matmul, conv2d


class ResnetBlock(nn.Cell):
    """norm1, SiLU, conv1, norm2, SiLU, conv2, plus ``nin_shortcut`` (1x1) when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig, rt: Runtime) -> None:
        super().__init__()
        self.norm1 = GroupNorm(cfg.norm_num_groups, in_channels, cfg.norm_eps, rt)
        self.conv1 = conv2d(in_channels, out_channels, 3, rt, padding=1)
        self.norm2 = GroupNorm(cfg.norm_num_groups, out_channels, cfg.norm_eps, rt)
        self.conv2 = conv2d(out_channels, out_channels, 3, rt, padding=1)
        self.has_shortcut = in_channels != out_channels
        if self.has_shortcut:
            self.nin_shortcut = conv2d(in_channels, out_channels, 1, rt)

    def construct(self, x: Tensor) -> Tensor:
        h = self.conv1(ops.silu(self.norm1(x)))
        h = self.conv2(ops.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if self.has_shortcut else x) + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs (LDM), residual."""

    def __init__(self, channels: int, cfg: VAEConfig, rt: Runtime) -> None:
        super().__init__()
        self.norm = GroupNorm(cfg.norm_num_groups, channels, cfg.norm_eps, rt)
        self.q = conv2d(channels, channels, 1, rt)
        self.k = conv2d(channels, channels, 1, rt)
        self.v = conv2d(channels, channels, 1, rt)
        self.proj_out = conv2d(channels, channels, 1, rt)

    def construct(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q = self.q(hn).reshape(b, c, h * w).transpose(0, 2, 1)  # [B, HW, C]
        k = self.k(hn).reshape(b, c, h * w)  # [B, C, HW]
        v = self.v(hn).reshape(b, c, h * w).transpose(0, 2, 1)
        scores = batch_matmul(q, k).astype(ms.float32) * (1.0 / math.sqrt(c))
        out = batch_matmul(ops.softmax(scores, axis=-1).astype(v.dtype), v)  # [B, HW, C]
        return self.proj_out(out.transpose(0, 2, 1).reshape(b, c, h, w)) + x


class Downsample(nn.Cell):
    """Pad right and bottom by one, then a 3x3 stride-2 ``conv`` without padding (LDM / diffusers padding=0)."""

    def __init__(self, channels: int, rt: Runtime) -> None:
        super().__init__()
        self.conv = conv2d(channels, channels, 3, rt, stride=2)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class Mid(nn.Cell):
    def __init__(self, channels: int, cfg: VAEConfig, rt: Runtime) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg, rt)
        self.attn_1 = AttnBlock(channels, cfg, rt)
        self.block_2 = ResnetBlock(channels, channels, cfg, rt)

    def construct(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Cell):
    """One resolution: ``block`` (resnets) and optionally ``downsample`` (encoder) or ``upsample`` (decoder)."""

    def __init__(
        self, widths: list[tuple[int, int]], resample: nn.Cell | None, name: str, cfg: VAEConfig, rt: Runtime
    ) -> None:
        super().__init__()
        self.block = nn.CellList([ResnetBlock(i, o, cfg, rt) for i, o in widths])
        self.resample_name = name if resample is not None else None
        if resample is not None:
            setattr(self, name, resample)

    def construct(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Encoder(nn.Cell):
    def __init__(self, cfg: VAEConfig, rt: Runtime) -> None:
        super().__init__()
        chans = cfg.block_out_channels
        self.conv_in = conv2d(cfg.in_channels, chans[0], 3, rt, padding=1)
        levels, ch = [], chans[0]
        for i, width in enumerate(chans):
            widths = [(ch if j == 0 else width, width) for j in range(cfg.layers_per_block)]
            ch = width
            last = i == len(chans) - 1
            levels.append(Level(widths, None if last else Downsample(ch, rt), "downsample", cfg, rt))
        self.down = nn.CellList(levels)
        self.mid = Mid(ch, cfg, rt)
        self.norm_out = GroupNorm(cfg.norm_num_groups, ch, cfg.norm_eps, rt)
        self.conv_out = conv2d(ch, 2 * cfg.latent_channels, 3, rt, padding=1)

    def construct(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(ops.silu(self.norm_out(h)))


class Decoder(nn.Cell):
    def __init__(self, cfg: VAEConfig, rt: Runtime) -> None:
        super().__init__()
        chans = cfg.block_out_channels
        ch = chans[-1]
        self.conv_in = conv2d(cfg.latent_channels, ch, 3, rt, padding=1)
        self.mid = Mid(ch, cfg, rt)
        levels: list[Level] = []
        for i in reversed(range(len(chans))):
            width = chans[i]
            widths = [(ch if j == 0 else width, width) for j in range(cfg.layers_per_block + 1)]
            ch = width
            levels.insert(0, Level(widths, Upsample(ch, rt) if i else None, "upsample", cfg, rt))
        self.up = nn.CellList(levels)
        self.norm_out = GroupNorm(cfg.norm_num_groups, ch, cfg.norm_eps, rt)
        self.conv_out = conv2d(ch, cfg.out_channels, 3, rt, padding=1)

    def construct(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
        return self.conv_out(ops.silu(self.norm_out(h)))


class AutoencoderKL(nn.Cell):
    """``first_stage_model``: encoder + quant_conv, post_quant_conv + decoder."""

    def __init__(self, cfg: VAEConfig, rt: Runtime) -> None:
        super().__init__()
        self.cfg, self.rt = cfg, rt
        z = cfg.latent_channels
        self.encoder = Encoder(cfg, rt)
        self.decoder = Decoder(cfg, rt)
        self.quant_conv = conv2d(2 * z, 2 * z, 1, rt)
        self.post_quant_conv = conv2d(z, z, 1, rt)

    def decode(self, z: Tensor) -> Tensor:
        """VAE latent [B, z, h, w] (already divided by scaling_factor) -> image [B, 3, 8h, 8w] in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z.astype(self.rt.ms_dtype))).astype(ms.float32)

    def encode(self, image: Tensor) -> Tensor:
        """Image [B, 3, H, W] in [-1, 1] -> posterior mean [B, z, H/8, W/8] (not yet times scaling_factor)."""
        moments = self.quant_conv(self.encoder(image.astype(self.rt.ms_dtype)))
        return moments[:, : self.cfg.latent_channels].astype(ms.float32)

    def construct(self, z: Tensor) -> Tensor:
        return self.decode(z)
