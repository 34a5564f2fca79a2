"""Dtype names of the three worlds (safetensors, numpy storage, MindSpore ckpt) and the only casts we allow.

numpy has no bfloat16, so BF16 tensors travel as their raw uint16 bit patterns; casts to and from BF16 are
done on the bits (round-to-nearest-even), which is what torch and MindSpore do. Half precision is widened on its
bits too (``halfwiden``): numpy 1.x's own float16 conversion is three times slower and gives the same bytes.
"""

from __future__ import annotations

import numpy as np

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.formats.halfwiden import widen_half

# safetensors dtype -> numpy dtype used to hold the bytes (BF16 held as raw uint16)
ST_TO_NUMPY: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
ITEMSIZE: dict[str, int] = {name: dt.itemsize for name, dt in ST_TO_NUMPY.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

# safetensors dtype <-> MindSpore ckpt ``tensor_type`` string (str(mindspore dtype))
ST_TO_MS: dict[str, str] = {
    "F64": "Float64",
    "F32": "Float32",
    "F16": "Float16",
    "BF16": "BFloat16",
    "I64": "Int64",
    "I32": "Int32",
    "I16": "Int16",
    "I8": "Int8",
    "U64": "UInt64",
    "U32": "UInt32",
    "U16": "UInt16",
    "U8": "UInt8",
    "BOOL": "Bool",
}
MS_TO_ST: dict[str, str] = {v: k for k, v in ST_TO_MS.items()}

# user-facing ``--dtype`` choices -> safetensors dtype (None = keep)
DTYPE_CHOICES: dict[str, str | None] = {"keep": None, "fp16": "F16", "fp32": "F32", "bf16": "BF16"}


def numpy_dtype(st_dtype: str) -> np.dtype:
    """The numpy dtype that holds a tensor of this safetensors dtype."""
    try:
        return ST_TO_NUMPY[st_dtype]
    except KeyError:
        raise InputError(f"unsupported tensor dtype {st_dtype!r}") from None


def st_dtype_of(array: np.ndarray) -> str:
    """The safetensors dtype of a numpy array (uint16 is taken as U16, never as BF16)."""
    for name, dt in ST_TO_NUMPY.items():
        if name != "BF16" and dt == array.dtype.newbyteorder("<"):
            return name
    raise InputError(f"unsupported numpy dtype {array.dtype}")


def target_dtype(src_dtype: str, requested: str | None) -> str:
    """The dtype a tensor is written as: casts (``requested``) apply to floating tensors only."""
    if requested is None or src_dtype not in FLOAT_DTYPES:
        return src_dtype
    return requested


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32, order="C")  # keeps 0-d scalars 0-d
    bits = values.view(np.uint32)
    nan = np.isnan(values)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # keep NaN a (quiet) NaN
    return out


# casts that can turn a finite value into Inf (the target's largest finite value is smaller)
NARROWING = {("F32", "F16"), ("F64", "F16"), ("F64", "F32"), ("BF16", "F16"), ("F32", "BF16"), ("F64", "BF16")}


def cast_array(array: np.ndarray, src_dtype: str, dst_dtype: str, key: str | None = None) -> np.ndarray:
    """Cast storage ``array`` (of safetensors dtype ``src_dtype``) to ``dst_dtype``; identity when equal.

    A narrowing cast maps values beyond the target's range to Inf, as torch does; numpy's overflow warning is
    silenced and, when ``key`` names the output tensor, the count is recorded (``nonfinite.note_overflow``) so
    the writer's NaN / Inf warning says the cast made them, not the source.
    """
    if src_dtype == dst_dtype:
        return array
    if src_dtype not in FLOAT_DTYPES or dst_dtype not in FLOAT_DTYPES:
        raise InputError(f"refusing to cast non-floating tensor {src_dtype} -> {dst_dtype}")
    if (src_dtype, dst_dtype) == ("F16", "F32"):
        return widen_half(array)
    values = _bf16_bits_to_f32(array) if src_dtype == "BF16" else array
    with np.errstate(over="ignore"):
        if dst_dtype == "BF16":
            out = _f32_to_bf16_bits(values.astype(np.float32, copy=False))
        else:
            out = values.astype(ST_TO_NUMPY[dst_dtype])
    if key is not None and (src_dtype, dst_dtype) in NARROWING:
        from sdxl_ckpt.formats.nonfinite import count_nonfinite, note_overflow

        made = count_nonfinite(out, dst_dtype).inf - count_nonfinite(array, src_dtype).inf
        if made > 0:
            note_overflow(key, made, dst_dtype)
    return out


def to_float32(array: np.ndarray, st_dtype: str) -> np.ndarray:
    """Values as float32 for numeric comparison (BF16 bits decoded)."""
    if st_dtype == "BF16":
        return _bf16_bits_to_f32(array)
    if st_dtype == "F16":
        return widen_half(array)
    return array.astype(np.float32, copy=False)
