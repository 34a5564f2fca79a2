"""The runtime's public face: numpy in, numpy out, one object per loaded model.

    rt = SDXLRuntime.from_checkpoint("sdxl_ms.ckpt", config)      # or SDXLRuntime(config) + rt.load(path)
    l_hidden, g_hidden, pooled = rt.encode_text(ids_l, ids_g)     # token ids [B, 77]
    context, y = rt.conditioning(l_hidden, g_hidden, pooled, original_size=(1024, 1024),
                                 crop_coords_top_left=(0, 0), target_size=(1024, 1024))
    eps = rt.unet(x, t, context, y)                               # one UNet evaluation
    image = rt.decode(latent / rt.config.vae.scaling_factor)      # [-1, 1]
    mean = rt.encode(image)                                       # posterior mean; times scaling_factor for sampling

All outputs are float32 numpy arrays whatever the compute dtype. The sampling math (discretization, denoiser,
guidance, samplers) lives in ``sdxl_runtime.sampling`` and calls ``unet``.

``from_checkpoint(..., phased=True)`` checks the whole file at once but fills components only when first used,
one phase at a time (``PHASES``): the text encoders, the UNet, the VAE. Entering a phase releases the
components of the others, so a full-size fp32 base never holds its 3.3 GB of text encoders next to its 10.3 GB
UNet, nor the VAE's weights and its decoder's activations (about 1 GB at 256x256) next to the UNet. A released
component is filled again if it is used again (the img2img kinds encode with the VAE before sampling and decode
after it: the 0.3 GB VAE is filled twice).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace

import mindspore as ms
import numpy as np
from mindspore import Tensor

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.sdxl.variants import COND_PROJ_KEY
from sdxl_ckpt.sdxl_runtime.config import METADATA_PREFIX, SDXLConfig, from_metadata, from_weights, with_cond_proj
from sdxl_ckpt.sdxl_runtime.device import Runtime, configure
from sdxl_ckpt.sdxl_runtime.loader import (
    LoadReport,
    check_entries,
    fill,
    load_entries,
    read_entries,
    return_freed_memory,
)
from sdxl_ckpt.sdxl_runtime.model import ALL_COMPONENTS, SDXLNet
from sdxl_ckpt.sdxl_runtime.unet import guidance_scale_embedding

LOGIT_SCALE_SUFFIX = "model.logit_scale"
# phased loading: the text encoders are done before the UNet runs, the UNet before the VAE decodes
PHASES = {"conditioner": 0, "unet": 1, "vae": 2}


def fit_optional_parts(config: SDXLConfig, entries: Sequence[TensorEntry]) -> tuple[SDXLConfig, list[str]]:
    """Adjust the parts a checkpoint may or may not have and no config can predict; returns notes.

    * OpenCLIP ``logit_scale``: in the official file, not in mindone's LCM list; never used for conditioning.
    * LCM guidance embedding ``time_cond_proj``: adopted (with its width) when the file has it and the config
      does not (lcm-sdxl presets cannot know). A config that expects it keeps expecting it: its absence is an error.
    """
    notes: list[str] = []
    names = {e.name: e for e in entries}
    has_logit = any(n.startswith("conditioner.embedders.") and n.endswith(LOGIT_SCALE_SUFFIX) for n in names)
    if has_logit != config.openclip.has_logit_scale:
        config = replace(config, openclip=replace(config.openclip, has_logit_scale=has_logit))
        notes.append(f"OpenCLIP logit_scale {'present' if has_logit else 'absent'} in the file")
    cond = names.get(COND_PROJ_KEY)
    if cond is not None and config.unet.time_cond_proj_dim is None and len(cond.shape) == 2:
        config = with_cond_proj(config, int(cond.shape[1]))
        notes.append(f"UNet has the LCM guidance embedding time_cond_proj ({cond.shape[1]} wide)")
    return config, notes


def _batch(value: object, batch: int, width: int, name: str) -> np.ndarray:
    """A size input given once (e.g. (1024, 1024)) or per row ([B, width]) -> float32 [B, width]."""
    arr = np.asarray(value, dtype=np.float32)
    if arr.size == width:
        return np.broadcast_to(arr.reshape(1, width), (batch, width)).copy()
    if arr.shape == (batch, width):
        return arr
    raise InputError(f"{name} must have {width} value(s) or shape [{batch}, {width}], got shape {list(arr.shape)}")


class SDXLRuntime:
    """An SDXL network on one device and dtype, with numpy entry points for the stages verify compares."""

    def __init__(
        self, config: SDXLConfig, device: str = "CPU", dtype: str = "fp32", components: Iterable[str] = ALL_COMPONENTS
    ) -> None:
        configure(device)
        self.config = config
        self.rt = Runtime(device, dtype)
        self.net = SDXLNet(config, self.rt, components)
        self.load_report: LoadReport | None = None
        self.notes: list[str] = []
        self.load_seconds = 0.0  # building, checking and filling, whenever it happens
        self.phase_log: list[str] = []  # "fill <component>" / "release <component>", in order (phased loading)
        self._checked: list[TensorEntry] = []  # the checked entries phased loading fills from
        self._unfilled: set[str] = set()
        self._quiet = True

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        config: SDXLConfig | None = None,
        device: str = "CPU",
        dtype: str = "fp32",
        components: Iterable[str] = ALL_COMPONENTS,
        quiet: bool = True,
        phased: bool = False,
    ) -> SDXLRuntime:
        """Build the network for ``path`` and fill it strictly (KeyMismatchError naming keys otherwise).

        ``config`` None: read from the file's ``sdxl_ckpt.config.*`` metadata (SD/MS-named safetensors), else
        inferred from the tensor names and shapes (a .ckpt has no metadata; head counts by SDXL's convention).
        ``phased``: every key is checked now, but each component is filled on first use, one phase at a time.
        """
        start = time.perf_counter()
        entries, metadata = read_entries(path)
        notes: list[str] = []
        if config is None:
            if any(k.startswith(METADATA_PREFIX) for k in metadata):
                config = from_metadata(metadata)
            else:
                config = from_weights({e.name: e.shape for e in entries}, metadata)
                notes.append("config inferred from the tensor shapes (no sdxl_ckpt.config.* metadata)")
        config, fitted = fit_optional_parts(config, entries)
        runtime = cls(config, device, dtype, components)
        runtime.notes = notes + fitted
        runtime._quiet = quiet
        if phased:
            checked = time.perf_counter()
            runtime._checked, skipped = check_entries(runtime.net, entries, path)
            runtime.load_report = LoadReport(
                str(path), runtime.net.components, skipped=skipped, seconds=time.perf_counter() - checked
            )
            runtime._unfilled = set(runtime.net.components)
        else:
            runtime.load_report = load_entries(runtime.net, entries, path, quiet)
        runtime.load_seconds = time.perf_counter() - start
        return runtime

    def load(self, path: str | os.PathLike, quiet: bool = True) -> LoadReport:
        entries, _ = read_entries(path)
        self.load_report = load_entries(self.net, entries, path, quiet)
        return self.load_report

    def _need(self, component: str) -> None:
        if component not in self.net.components:
            raise InputError(f"this runtime was built without the {component}")
        if component in self._unfilled:
            self._enter_phase(PHASES[component])

    def _enter_phase(self, phase: int) -> None:
        """Release the filled components of other phases, then fill (building again if released) this phase's."""
        start = time.perf_counter()
        released = False
        for component in self.net.components:
            if PHASES[component] != phase and component not in self._unfilled:
                self.net.release(component)
                self._unfilled.add(component)
                self.phase_log.append(f"release {component}")
                released = True
        if released:
            return_freed_memory()
        for component in self.net.components:
            if PHASES[component] == phase and component in self._unfilled:
                if not self.net.is_built(component):
                    self.net.build(component)
                fill(self.net, self._checked, self.load_report, (component,), self._quiet)
                self._unfilled.discard(component)
                self.phase_log.append(f"fill {component}")
        return_freed_memory()  # the fills' short-lived conversion buffers leave free heap pages behind
        self.load_seconds += time.perf_counter() - start

    # --- conditioning ---------------------------------------------------------------------------------------

    def encode_text(
        self, ids_l: np.ndarray | None, ids_g: np.ndarray
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Token ids [B, N] -> (CLIP-L hidden of layer L-1 [B, N, 768] or None (refiner),
        OpenCLIP penultimate hidden [B, N, 1280], OpenCLIP pooled [B, 1280]); float32."""
        self._need("conditioner")
        clip_l, hidden, pooled = self.net.conditioner.encode_text(ids_l, ids_g)
        as_np = _to_numpy
        return (as_np(clip_l) if clip_l is not None else None), as_np(hidden), as_np(pooled)

    def conditioning(
        self,
        clip_l_hidden: np.ndarray | None,
        openclip_hidden: np.ndarray,
        pooled: np.ndarray,
        original_size: Sequence[float] | np.ndarray = (1024, 1024),
        crop_coords_top_left: Sequence[float] | np.ndarray = (0, 0),
        target_size: Sequence[float] | np.ndarray = (1024, 1024),
        aesthetic_score: float | np.ndarray = 6.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """-> (context [B, N, 2048 | 1280], y [B, 2816 | 2560]). Sizes are (height, width); crop is (top, left).

        base: y = [pooled | orig | crop | target]; refiner: y = [pooled | orig | crop | aesthetic_score]
        (``target_size`` is then ignored, ``aesthetic_score`` is ignored by the base).
        """
        b = np.asarray(pooled).shape[0]
        hiddens = [openclip_hidden] if clip_l_hidden is None else [clip_l_hidden, openclip_hidden]
        if (clip_l_hidden is None) != self.config.is_refiner:
            raise InputError("the base model needs both hidden states; the refiner only OpenCLIP's")
        context = np.concatenate([np.asarray(h, dtype=np.float32) for h in hiddens], axis=-1)
        last = (
            _batch(aesthetic_score, b, 1, "aesthetic_score")
            if self.config.is_refiner
            else _batch(target_size, b, 2, "target_size")
        )
        sizes = [
            _batch(original_size, b, 2, "original_size"),
            _batch(crop_coords_top_left, b, 2, "crop_coords_top_left"),
            last,
        ]
        if "conditioner" in self.net.components and "conditioner" not in self._unfilled:
            y = _to_numpy(self.net.conditioner.vector(Tensor(np.asarray(pooled, np.float32)), sizes))
        else:  # the size embedders have no parameters: build them on their own (no text encoder is filled)
            from sdxl_ckpt.sdxl_runtime.conditioner import GeneralConditioner

            cond = GeneralConditioner(self.config, self.rt, with_text=False)
            y = _to_numpy(cond.vector(Tensor(np.asarray(pooled, np.float32)), sizes))
        return context, y

    # --- UNet -----------------------------------------------------------------------------------------------

    def unet(
        self, x: np.ndarray, t: float | np.ndarray, context: np.ndarray, y: np.ndarray, w_cond: np.ndarray | None = None
    ) -> np.ndarray:
        """One UNet evaluation: x [B, 4, h, w], t scalar or [B] timesteps, context [B, N, C], y [B, adm],
        w_cond [B, time_cond_proj_dim] (LCM with time_cond_proj only; see ``guidance_embedding``) -> eps."""
        self._need("unet")
        x = np.asarray(x, dtype=np.float32)
        t = np.broadcast_to(np.asarray(t, dtype=np.float32).reshape(-1), (x.shape[0],))
        out = self.net.model.diffusion_model(
            Tensor(x),
            Tensor(np.ascontiguousarray(t)),
            Tensor(np.asarray(context, np.float32)),
            Tensor(np.asarray(y, np.float32)),
            None if w_cond is None else Tensor(np.asarray(w_cond, np.float32)),
        )
        return _to_numpy(out)

    def guidance_embedding(self, guidance_scale: float | np.ndarray, batch: int) -> np.ndarray:
        """w_cond for an LCM UNet with time_cond_proj: embedding of ``w = guidance_scale - 1`` (diffusers' rule)."""
        dim = self.config.unet.time_cond_proj_dim
        if dim is None:
            raise InputError("this UNet has no time_cond_proj (guidance embedding)")
        w = np.broadcast_to(np.asarray(guidance_scale, np.float32).reshape(-1) - np.float32(1.0), (batch,))
        return guidance_scale_embedding(w, dim)

    # --- VAE ------------------------------------------------------------------------------------------------

    def decode(self, z: np.ndarray) -> np.ndarray:
        """VAE latent [B, 4, h, w] (sampler latent / scaling_factor) -> image [B, 3, 8h, 8w], about [-1, 1]."""
        self._need("vae")
        return _to_numpy(self.net.first_stage_model.decode(Tensor(np.asarray(z, np.float32))))

    def encode(self, image: np.ndarray) -> np.ndarray:
        """Image [B, 3, H, W] in [-1, 1] -> posterior mean [B, 4, H/8, W/8] (unscaled)."""
        self._need("vae")
        return _to_numpy(self.net.first_stage_model.encode(Tensor(np.asarray(image, np.float32))))


def _to_numpy(tensor: Tensor) -> np.ndarray:
    return tensor.astype(ms.float32).asnumpy()
