"""Building blocks shared by the text encoders, the UNet and the VAE.

Parameters are created with a lazy ``zeros`` initializer in the compute dtype: building even the full-size
network allocates nothing until the loader fills each parameter (or a forward pass materialises the zeros), so
a ckpt is never held next to a second copy of the weights. Parameter NAMES come from MindSpore's own cells
(GroupNorm/LayerNorm ``gamma``/``beta``, Dense ``weight``/``bias``), plus ``weight``/``bias`` for convolutions and
``embedding_table`` for embeddings: exactly the MindSpore keymap names.
"""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from sdxl_ckpt.sdxl_runtime.device import Runtime


def dense(in_features: int, out_features: int, rt: Runtime, bias: bool = True) -> nn.Dense:
    """A Linear layer (``weight`` [out, in], ``bias`` [out])."""
    return nn.Dense(in_features, out_features, weight_init="zeros", bias_init="zeros", has_bias=bias, dtype=rt.ms_dtype)


IM2COL_CHUNK_BYTES = 256 * 1024 * 1024  # largest unfolded input built at once (a 1024px VAE decode needs GBs)


class Conv2d(nn.Cell):
    """A Conv2d with bias (``weight`` [O, C, k, k], ``bias`` [O]) and symmetric zero padding.

    MindSpore's CPU Conv2D kernel runs at about 0.5 GFLOP/s (a full-size UNet evaluation would take hours), its
    MatMul at tens of GFLOP/s: on CPU the convolution is computed as unfold (im2col) + MatMul, in bands of output
    rows so the unfolded input stays under ``IM2COL_CHUNK_BYTES``. MindSpore's own ``unfold`` kernel builds the
    columns (about 5x faster than stacking the k*k shifted windows with slices; the results are bit-identical).
    GPU / Ascend use the native kernel.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, rt: Runtime, stride: int = 1, padding: int = 0
    ) -> None:
        super().__init__()
        self.weight = Parameter(initializer("zeros", (out_channels, in_channels, kernel, kernel), rt.ms_dtype))
        self.bias = Parameter(initializer("zeros", (out_channels,), rt.ms_dtype))
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.native = rt.device != "CPU"

    def construct(self, x: Tensor) -> Tensor:
        if self.native:
            return ops.conv2d(
                x,
                self.weight,
                self.bias,
                stride=self.stride,
                pad_mode="pad" if self.padding else "valid",
                padding=self.padding,
            )
        return self._im2col(x)

    def _im2col(self, x: Tensor) -> Tensor:
        k, s, p = self.kernel, self.stride, self.padding
        b, c, h, w = x.shape
        o = self.weight.shape[0]
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        weight = self.weight.view(o, c * k * k)  # a view: reshape would copy the weight on every call
        if k == 1 and s == 1 and p == 0:
            return self._matmul(weight, x.reshape(b, c, h * w)).reshape(b, o, h, w)
        row_bytes = b * c * k * k * wo * x.itemsize
        rows = max(1, min(ho, IM2COL_CHUNK_BYTES // max(row_bytes, 1)))
        if rows == ho:
            cols = ops.unfold(x, kernel_size=k, padding=p, stride=s)  # [B, C*k*k, Ho*Wo], channel-major
            return self._matmul(weight, cols).reshape(b, o, ho, wo)
        if p:
            x = ops.pad(x, (p, p, p, p))
        outs = []
        for r0 in range(0, ho, rows):
            r1 = min(ho, r0 + rows)
            cols = ops.unfold(x[:, :, r0 * s : (r1 - 1) * s + k], kernel_size=k, stride=s)  # one band's input rows
            outs.append(self._matmul(weight, cols).reshape(b, o, r1 - r0, wo))
        return ops.cat(outs, axis=2)

    def _matmul(self, weight: Tensor, cols: Tensor) -> Tensor:
        """[O, C*k*k] x [B, C*k*k, L] + bias -> [B, O, L], one 2-D MatMul per image: the batched form broadcasts
        the weight to every image first (a copy of up to 118 MB per call in the UNet) and runs 1.5-5x slower."""
        bias = self.bias.view(-1, 1)
        outs = [ops.matmul(weight, cols[i]) + bias for i in range(cols.shape[0])]
        return outs[0].expand_dims(0) if len(outs) == 1 else ops.stack(outs)


def conv2d(in_channels: int, out_channels: int, kernel: int, rt: Runtime, stride: int = 1, padding: int = 0) -> Conv2d:
    """A Conv2d with bias and symmetric zero padding (``padding`` 0 means none)."""
    return Conv2d(in_channels, out_channels, kernel, rt, stride, padding)


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the activation dtype (sgm's GroupNorm32); ``gamma``/``beta``."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, rt: Runtime) -> None:
        super().__init__(num_groups, num_channels, eps=eps, gamma_init="zeros", beta_init="zeros", dtype=rt.ms_dtype)

    def construct(self, x: Tensor) -> Tensor:
        out = ops.group_norm(
            x.astype(ms.float32), self.num_groups, self.gamma.astype(ms.float32), self.beta.astype(ms.float32), self.eps
        )
        return out.astype(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last axis computed in float32; ``gamma``/``beta``; eps given explicitly."""

    def __init__(self, dim: int, eps: float, rt: Runtime) -> None:
        super().__init__((dim,), gamma_init="zeros", beta_init="zeros", epsilon=eps, dtype=rt.ms_dtype)

    def construct(self, x: Tensor) -> Tensor:
        # the LayerNorm primitive of nn.LayerNorm (ops.layer_norm has no CPU kernel)
        out, _, _ = self.layer_norm(x.astype(ms.float32), self.gamma.astype(ms.float32), self.beta.astype(ms.float32))
        return out.astype(x.dtype)


class Embedding(nn.Cell):
    """A lookup table whose parameter is named ``embedding_table`` (MindSpore's nn.Embedding name)."""

    def __init__(self, num: int, dim: int, rt: Runtime) -> None:
        super().__init__()
        self.embedding_table = Parameter(initializer("zeros", (num, dim), rt.ms_dtype))

    def construct(self, ids: Tensor) -> Tensor:
        return ops.gather(self.embedding_table, ids, 0)


class GELU(nn.Cell):
    """The exact (erf) GELU of torch.nn.GELU() / OpenCLIP; MindSpore's nn.GELU defaults to the tanh form.

    Written out as ``x / 2 * (1 + erf(x / sqrt 2))``: as accurate as ``ops.gelu(approximate="none")`` (both
    3e-8 relative L2 from the float64 value, torch's 7e-8) and twice as fast on MindSpore's CPU backend, where
    that kernel took 2.2 s of a 20 s full-size UNet evaluation.
    """

    def construct(self, x: Tensor) -> Tensor:
        return x * 0.5 * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))


class QuickGELU(nn.Cell):
    """OpenAI CLIP's activation: ``x * sigmoid(1.702 x)``."""

    def construct(self, x: Tensor) -> Tensor:
        return x * ops.sigmoid(1.702 * x)


def activation(name: str) -> nn.Cell:
    return {"gelu": GELU, "quick_gelu": QuickGELU}[name]()


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, N, H*D] -> [B, H, N, D]."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(0, 2, 1, 3)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, N, D] -> [B, N, H*D]."""
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


# q @ k^T with the transpose folded into the kernel: the same numbers as transposing k first, 1.4x faster on CPU
# for 1024-4096 tokens (no transposed copy of k)
_QK_T = ops.BatchMatMul(transpose_b=True)


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, rt: Runtime, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention over [B, N, H*D] inputs; softmax in float32; ``mask`` is added to the scores.

    On Ascend in fp16 (and without a mask) the fused FlashAttentionScore kernel computes the same thing.
    """
    scale = 1.0 / math.sqrt(q.shape[-1] // heads)
    if rt.flash_attention and mask is None:
        out = ops.flash_attention_score(
            split_heads(q, heads),
            split_heads(k, heads),
            split_heads(v, heads),
            heads,
            scalar_value=scale,
            input_layout="BNSD",
        )
        return merge_heads(out)
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    scores = _QK_T(qh, kh).astype(ms.float32) * scale
    if mask is not None:
        scores = scores + mask
    probs = ops.softmax(scores, axis=-1).astype(v.dtype)
    return merge_heads(ops.matmul(probs, vh))


def sinusoid_frequencies(dim: int, max_period: float = 10000.0) -> np.ndarray:
    """float32 ``exp(-ln(max_period) * i / half)``, i < half: diffusers' float32 exponent, correctly rounded exp.

    MindSpore's CPU float32 ``exp`` is off by an ulp for most inputs, and an ulp of a frequency times a timestep
    of 1000 is visible in the embedding; numpy's float64 ``exp`` rounded to float32 equals torch's float32 ``exp``
    for all but a few of them.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Cos-first sinusoidal embedding of float timesteps [B] -> [B, dim], float32.

    sgm's ``timestep_embedding`` and diffusers' ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`` are
    the same function: ``[cos(t*f), sin(t*f)]``, ``f = exp(-ln(max_period) * i / half)``. The product ``t*f`` is
    rounded to float32 as in diffusers; cos/sin are evaluated in float64 (MindSpore's float32 ones are less
    accurate than torch's) and rounded, so the embedding of t = 999 or of a size scalar of 1024 matches.
    """
    freqs = Tensor(sinusoid_frequencies(dim, max_period))
    args = (t.astype(ms.float32).reshape(-1, 1) * freqs.reshape(1, -1)).astype(ms.float64)
    emb = ops.cat([ops.cos(args), ops.sin(args)], axis=-1).astype(ms.float32)
    if dim % 2:
        emb = ops.pad(emb, (0, 1))
    return emb


def upsample_nearest2x(x: Tensor) -> Tensor:
    """Nearest-neighbour 2x upsampling of [B, C, H, W] (F.interpolate(scale_factor=2, mode="nearest")), exact."""
    b, c, h, w = x.shape
    x = ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2))
    return x.reshape(b, c, 2 * h, 2 * w)


class Upsample(nn.Cell):
    """Nearest 2x, then ``conv`` (3x3, padding 1): the same module (and parameter names) in UNet and VAE."""

    def __init__(self, channels: int, rt: Runtime) -> None:
        super().__init__()
        self.conv = conv2d(channels, channels, 3, rt, padding=1)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(upsample_nearest2x(x))
