"""Where and in which precision the runtime computes: ``--device CPU|GPU|Ascend``, ``--dtype fp32|fp16``.

PyNative mode everywhere (eager, debuggable, what the tests run). fp32 is the reference precision; fp16 keeps
weights and activations in half precision but normalisations, softmax and the sinusoidal embeddings in fp32
(as sgm's GroupNorm32 and diffusers do), and the VAE in fp32 when its config says ``force_upcast``.
Ascend-only speedups (fused flash attention) are switched on by ``Runtime.device == "Ascend"`` and never
needed on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np

from sdxl_ckpt.errors import InputError

DEVICES = ("CPU", "GPU", "Ascend")
DTYPES = {"fp32": (ms.float32, np.float32), "fp16": (ms.float16, np.float16)}


@dataclass(frozen=True)
class Runtime:
    """The device and compute dtype a network is built for (parameters are created in that dtype)."""

    device: str = "CPU"
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise InputError(f"unknown device {self.device!r} (expected one of {', '.join(DEVICES)})")
        if self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r} (expected one of {', '.join(DTYPES)})")

    @property
    def ms_dtype(self) -> ms.Type:
        return DTYPES[self.dtype][0]

    @property
    def np_dtype(self) -> type:
        return DTYPES[self.dtype][1]

    @property
    def flash_attention(self) -> bool:
        """Fused attention kernel: Ascend only, and only in half precision (the kernel's supported input)."""
        return self.device == "Ascend" and self.dtype == "fp16"

    def upcast(self) -> Runtime:
        """The fp32 runtime on the same device (the SDXL VAE with ``force_upcast``)."""
        return Runtime(self.device, "fp32")


_CONFIGURED: list[str] = []


def configure(device: str = "CPU") -> None:
    """Select the MindSpore device and PyNative mode once per process (MindSpore allows one device target).

    On CPU, kernels are also launched synchronously (process-wide).
    """
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r} (expected one of {', '.join(DEVICES)})")
    if _CONFIGURED:
        if _CONFIGURED[0] != device:
            raise InputError(f"this process already runs MindSpore on {_CONFIGURED[0]}; cannot switch to {device}")
        return
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        ms.set_device(device)
    except (RuntimeError, ValueError) as exc:  # e.g. a device target fixed earlier in this process
        if ms.get_context("device_target") != device:
            raise InputError(f"cannot run MindSpore on {device}: {exc}") from None
        _CONFIGURED.append(device)  # MindSpore already runs on this device (initialised by earlier work)
        return
    if device == "CPU":
        # PyNative's asynchronous launch queue costs milliseconds per kernel on a small shared CPU (tiny UNet
        # evaluation 7-17 s queued, 1.3-2.4 s blocking, 2 cores under load); results are identical
        ms.runtime.launch_blocking()
    _CONFIGURED.append(device)
