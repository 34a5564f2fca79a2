"""The reference's UNet built empty (torch's meta device) and filled only once the text encoders are done.

diffusers' own loading holds the whole fp16 state dict next to the fp32 model it fills, and the pipeline holds
all its components at once: a full-size SDXL base peaks near 17 GB on the CPU. Here the pipeline is assembled
with an empty UNet, its ``encode_prompt`` runs as usual, and right after it the text encoders' weights are
dropped (moved to the meta device; their configs stay, the pipeline reads only those later) and the UNet is
filled tensor by tensor from the safetensors file(s): a file is kept open for at most ``REOPEN_BYTES`` of
tensors, so the mapped pages of the source never pile up in the process.

The values are diffusers' own: each fp16 (or fp32) tensor is cast to float32 exactly as ``from_pretrained``
casts it, and an SD single file is read under the names diffusers' own single-file converter gives each key
(the converter runs on meta tensors; only renamings are accepted, a computed tensor falls back to diffusers'
whole-model loading). The pipeline call itself is untouched.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.sdxl.variants import COND_PROJ_KEY

REOPEN_BYTES = 256 * 1024 * 1024  # tensor bytes read through one open safetensors handle (one memory map)
SD_UNET_PREFIX = "model.diffusion_model."
COND_PROJ_PARAMETER = "time_embedding.cond_proj.weight"  # diffusers' name of the LCM guidance embedding


class NotRenaming(Exception):
    """diffusers' single-file UNet conversion computes a tensor (not a plain rename): no tensor-by-tensor fill."""


@dataclass
class DeferredUNet:
    """An empty UNet and where each of its parameters lies: (file, stored key, parameter name), in file order."""

    unet: Any
    sources: list[tuple[Path, str, str]]

    def fill(self) -> None:
        """Give every parameter its float32 value, one tensor at a time; InputError for a missing or stray key."""
        import torch
        from safetensors import safe_open

        params = dict(self.unet.named_parameters())
        stray = [name for _, _, name in self.sources if name not in params]
        missing = sorted(set(params) - {name for _, _, name in self.sources})
        if stray or missing:
            raise InputError(
                "UNet weights do not fit the UNet config: "
                + "; ".join(
                    part
                    for part in (
                        f"missing {', '.join(missing[:8])}" if missing else "",
                        f"unexpected {', '.join(sorted(stray)[:8])}" if stray else "",
                    )
                    if part
                ),
                path=self.sources[0][0] if self.sources else None,
                key=(missing or sorted(stray))[0],
            )
        for path, batch in _batches(self.sources):
            with safe_open(str(path), "pt") as handle:
                for key, name in batch:
                    value = handle.get_tensor(key)
                    param = params[name]
                    if tuple(value.shape) != tuple(param.shape):
                        raise InputError(
                            f"shape {list(value.shape)} does not fit the UNet's {name} {list(param.shape)}",
                            path=path,
                            key=key,
                        )
                    owner_name, _, leaf = name.rpartition(".")
                    owner = self.unet.get_submodule(owner_name) if owner_name else self.unet
                    # a copy even when the file is fp32: the tensor safetensors returns is a view of its file map
                    owner._parameters[leaf] = torch.nn.Parameter(
                        value.to(torch.float32, copy=True), requires_grad=param.requires_grad
                    )
                    del value
        left = [n for n, t in [*self.unet.named_parameters(), *self.unet.named_buffers()] if t.is_meta]
        if left:
            raise InputError(f"the UNet still has empty tensors after filling: {', '.join(left[:8])}")
        _return_freed_memory()


def _batches(sources: list[tuple[Path, str, str]]) -> Iterator[tuple[Path, list[tuple[str, str]]]]:
    """Consecutive sources of one file, cut every ``REOPEN_BYTES`` of tensor bytes (sizes from the header)."""
    sizes: dict[Path, dict[str, int]] = {}
    batch: list[tuple[str, str]] = []
    current: Path | None = None
    used = 0
    for path, key, name in sources:
        if path not in sizes:
            sizes[path] = _tensor_bytes(path)
        if batch and (path != current or used >= REOPEN_BYTES):
            yield current, batch
            batch, used = [], 0
        current = path
        batch.append((key, name))
        used += sizes[path].get(key, 0)
    if batch:
        yield current, batch


def _tensor_bytes(path: Path) -> dict[str, int]:
    """Key -> stored bytes, from the safetensors header alone."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def empty_unet(config: dict[str, Any]) -> Any:
    """diffusers' UNet2DConditionModel for ``config`` with every tensor on the meta device (no memory)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return unet.eval()


def folder_unet(unet_dir: Path, variant: str | None) -> DeferredUNet:
    """The UNet of a diffusers folder (one file or shards of the chosen weights variant)."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from sdxl_ckpt.formats.diffusers_folder import find_weight_files

    if not (unet_dir / "config.json").is_file():
        raise InputError("not a diffusers UNet folder (no config.json)", path=unet_dir)
    unet = empty_unet(UNet2DConditionModel.load_config(unet_dir))
    sources = []
    for path in find_weight_files(unet_dir, variant).files:
        with safe_open(str(path), "pt") as handle:
            sources += [(path, key, key) for key in handle.keys()]
    return DeferredUNet(unet, sources)


def single_file_unet(src: Path, config: dict[str, Any], cond_dim: int | None) -> DeferredUNet:
    """The UNet of an SD single file, under the parameter names diffusers' own single-file converter gives.

    ``cond_dim``: the LCM guidance embedding's width (the converter knows no SD name for it: ``COND_PROJ_KEY``).
    Raises NotRenaming when the converter computes a tensor instead of renaming one.
    """
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors import safe_open

    config = dict(config, time_cond_proj_dim=cond_dim) if cond_dim is not None else dict(config)
    with safe_open(str(src), "pt") as handle:
        keys = [k for k in handle.keys() if k.startswith(SD_UNET_PREFIX) and k != COND_PROJ_KEY]
        meta = {k: torch.empty(handle.get_slice(k).get_shape(), device="meta") for k in keys}
    converted = convert_ldm_unet_checkpoint(meta, config)
    key_of = {id(value): key for key, value in meta.items()}
    sources = []
    for name, value in converted.items():
        key = key_of.get(id(value))
        if key is None:
            raise NotRenaming(name)
        sources.append((src, key, name))
    if cond_dim is not None:
        sources.append((src, COND_PROJ_KEY, COND_PROJ_PARAMETER))
    order = {k: i for i, k in enumerate(keys)}
    sources.sort(key=lambda s: order.get(s[1], len(order)))  # file order: the reads run front to back
    return DeferredUNet(empty_unet(config), sources)


def release_text_encoders(pipe: Any) -> None:
    """Drop the text encoders' weights (meta device: the modules and configs stay) and return the memory."""

    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to("meta")
    _return_freed_memory()


def _return_freed_memory() -> None:
    """Collect now and hand freed heap pages back to the OS (glibc keeps them in the process otherwise)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(None).malloc_trim(0)


@contextlib.contextmanager
def fill_after_encoding(pipe: Any, deferred: DeferredUNet | None) -> Iterator[None]:
    """While active, the pipeline's ``encode_prompt`` releases the text encoders and fills the UNet on return."""
    if deferred is None:
        yield
        return
    encode = pipe.encode_prompt

    def encode_then_fill(*args: Any, **kwargs: Any) -> Any:
        out = encode(*args, **kwargs)
        if any(p.is_meta for p in deferred.unet.parameters()):  # the first call: SDXL encodes every branch in it
            release_text_encoders(pipe)
            deferred.fill()
        return out

    pipe.encode_prompt = encode_then_fill
    try:
        yield
    finally:
        del pipe.encode_prompt
