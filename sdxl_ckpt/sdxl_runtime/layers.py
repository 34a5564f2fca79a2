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
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import initializer

from sdxl_ckpt.sdxl_runtime import im2col
from sdxl_ckpt.sdxl_runtime.device import Runtime

# MindSpore's CPU kernels differ by the call that reaches them (PyNative, 2-core AVX-512 machine, full-size UNet
# shapes): the MatMul / BatchMatMul primitives run at 150-290 GFLOP/s, ``ops.matmul`` on 3-D / 4-D inputs at
# 70-90 and ``ops.dense`` up to 7x slower than the primitive. A bias added with ``+`` broadcasts at about a tenth of
# BiasAdd's speed (a [128, 10240] output: 12 ms against 1 ms). The layers' products go through these.
_MATMUL = ops.MatMul()
_MATMUL_T = ops.MatMul(transpose_b=True)
_BATCH_MATMUL = ops.BatchMatMul()
_BATCH_MATMUL_T = ops.BatchMatMul(transpose_b=True)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` over the last axis of ``x`` (any leading shape), ``weight`` [out, in]."""
    lead = x.shape[:-1]
    out = _MATMUL_T(x.reshape(-1, x.shape[-1]), weight)
    if bias is not None:
        out = ops.bias_add(out, bias)
    return out.reshape(*lead, weight.shape[0])


def batch_matmul(a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
    """``a @ b`` (or ``a @ b^T``) over matching leading axes."""
    return (_BATCH_MATMUL_T if transpose_b else _BATCH_MATMUL)(a, b)


def lazy_parameter(shape: tuple[int, ...], rt: Runtime) -> Parameter:
    """A parameter of ``shape`` in the compute dtype whose zeros are not allocated until it is filled or used."""
    return Parameter(initializer("zeros", shape, rt.ms_dtype))


class Dense(nn.Cell):
    """A Linear layer (``weight`` [out, in], ``bias`` [out]: nn.Dense's names) computed by ``linear``.

    A plain cell rather than an ``nn.Dense``: building nn.Dense's primitives and signature checks cost 1.5 ms a
    layer, 1.4 s for the full-size UNet's 911 layers.
    """

    def __init__(self, in_features: int, out_features: int, rt: Runtime, bias: bool = True) -> None:
        super().__init__()
        self.weight = lazy_parameter((out_features, in_features), rt)
        self.bias = lazy_parameter((out_features,), rt) if bias else None

    def construct(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def dense(in_features: int, out_features: int, rt: Runtime, bias: bool = True) -> Dense:
    """A Linear layer (``weight`` [out, in], ``bias`` [out])."""
    return Dense(in_features, out_features, rt, bias)


IM2COL_CHUNK_BYTES = 256 * 1024 * 1024  # largest unfolded input built at once (a 1024px VAE decode needs GBs)


class Conv2d(nn.Cell):
    """A Conv2d with bias (``weight`` [O, C, k, k], ``bias`` [O]) and symmetric zero padding.

    MindSpore's CPU Conv2D kernel runs at about 0.5-1 GFLOP/s for 3x3 kernels (a full-size UNet evaluation would
    take hours), its MatMul at 100-200: on CPU the convolution is computed as im2col + MatMul, in bands of output
    rows so the unfolded input stays under ``IM2COL_CHUNK_BYTES``. The columns are built by numpy on the host
    (``im2col``: a strided copy on every core, 1.5-2x faster than MindSpore's ``unfold`` kernel, the same values).
    GPU / Ascend use the native kernel.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, rt: Runtime, stride: int = 1, padding: int = 0
    ) -> None:
        super().__init__()
        self.weight = lazy_parameter((out_channels, in_channels, kernel, kernel), rt)
        self.bias = lazy_parameter((out_channels,), rt)
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
        padded = im2col.zero_padded(x.asnumpy(), p)
        outs = []
        for r0 in range(0, ho, rows):
            r1 = min(ho, r0 + rows)
            cols = Tensor.from_numpy(im2col.columns(padded, k, s, (r0, r1), wo))  # [B, C*k*k, rows * Wo]
            outs.append(self._matmul(weight, cols).reshape(b, o, r1 - r0, wo))
        return outs[0] if len(outs) == 1 else ops.cat(outs, axis=2)

    def _matmul(self, weight: Tensor, cols: Tensor) -> Tensor:
        """[O, C*k*k] x [B, C*k*k, L] + bias -> [B, O, L], one 2-D MatMul per image: the batched form broadcasts
        the weight to every image first (a copy of up to 118 MB per call in the UNet) and runs 1.5-5x slower."""
        outs = [_MATMUL(weight, cols[i]) for i in range(cols.shape[0])]
        return ops.bias_add(outs[0].expand_dims(0) if len(outs) == 1 else ops.stack(outs), self.bias)


def conv2d(in_channels: int, out_channels: int, kernel: int, rt: Runtime, stride: int = 1, padding: int = 0) -> Conv2d:
    """A Conv2d with bias and symmetric zero padding (``padding`` 0 means none)."""
    return Conv2d(in_channels, out_channels, kernel, rt, stride, padding)


class GroupNorm(nn.Cell):
    """GroupNorm computed in float32 whatever the activation dtype (sgm's GroupNorm32); ``gamma``/``beta``
    (nn.GroupNorm's names)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, rt: Runtime) -> None:
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.gamma = lazy_parameter((num_channels,), rt)
        self.beta = lazy_parameter((num_channels,), rt)

    def construct(self, x: Tensor) -> Tensor:
        out = ops.group_norm(
            x.astype(ms.float32), self.num_groups, self.gamma.astype(ms.float32), self.beta.astype(ms.float32), self.eps
        )
        return out.astype(x.dtype)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis computed in float32; ``gamma``/``beta`` (nn.LayerNorm's names); eps given
    explicitly."""

    def __init__(self, dim: int, eps: float, rt: Runtime) -> None:
        super().__init__()
        self.gamma = lazy_parameter((dim,), rt)
        self.beta = lazy_parameter((dim,), rt)
        # nn.LayerNorm's primitive (ops.layer_norm has no CPU kernel)
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x: Tensor) -> Tensor:
        out, _, _ = self.layer_norm(x.astype(ms.float32), self.gamma.astype(ms.float32), self.beta.astype(ms.float32))
        return out.astype(x.dtype)


class Embedding(nn.Cell):
    """A lookup table whose parameter is named ``embedding_table`` (MindSpore's nn.Embedding name)."""

    def __init__(self, num: int, dim: int, rt: Runtime) -> None:
        super().__init__()
        self.embedding_table = lazy_parameter((num, dim), rt)

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
    scores = batch_matmul(qh, kh, transpose_b=True).astype(ms.float32) * scale  # k^T folded into the kernel
    if mask is not None:
        scores = scores + mask
    probs = ops.softmax(scores, axis=-1).astype(v.dtype)
    return merge_heads(batch_matmul(probs, vh))


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


def upsample_nearest2x(x: Tensor, native: bool = False) -> Tensor:
    """Nearest-neighbour 2x upsampling of [B, C, H, W] (F.interpolate(scale_factor=2, mode="nearest")), exact.

    On CPU ``mint``'s interpolate kernel (6x faster than materialising the broadcast view); ``native``: the
    broadcast view reshaped, which any backend runs.
    """
    if not native:
        return mint.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    b, c, h, w = x.shape
    x = ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2))
    return x.reshape(b, c, 2 * h, 2 * w)


class Upsample(nn.Cell):
    """Nearest 2x, then ``conv`` (3x3, padding 1): the same module (and parameter names) in UNet and VAE."""

    def __init__(self, channels: int, rt: Runtime) -> None:
        super().__init__()
        self.conv = conv2d(channels, channels, 3, rt, padding=1)
        self.native = rt.device != "CPU"

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(upsample_nearest2x(x, self.native))
