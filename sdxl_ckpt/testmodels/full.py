"""Full-size SDXL diffusers folders with random data, written streaming, for benchmarks.

No real SDXL weights can be downloaded here, but converters must be timed and memory-profiled on the real
7 GB. The real component classes are instantiated on the meta device (names and shapes, no memory), and every
tensor is written by ``write_safetensors`` from a lazy loader that generates its values only when the writer
asks for it, so the peak memory is one tensor. Values are random bit patterns with a bounded exponent
(|x| in [1/128, 1/32), norm gains in [1, 2)): no float math per element, so a 7 GB model is written at disk speed.
Deterministic: each tensor's values depend on (seed, tensor name) only.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.formats.diffusers_folder import with_text_model_level
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.formats.safetensors_io import write_safetensors
from sdxl_ckpt.sdxl.configs import full_configs
from sdxl_ckpt.sdxl.tokenizers import write_tokenizers
from sdxl_ckpt.sdxl.variants import structure_of
from sdxl_ckpt.testmodels.common import component_seed, text_config, write_model_index, write_scheduler

_WEIGHT_STEM = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
_NORM_GAIN = re.compile(r"(^|\.)[a-z_]*norm[a-z_0-9]*\.weight$")

# (unsigned dtype, keep-mask, set-bits) for small values and for norm gains, per float dtype
_BIT_RECIPES: dict[str, dict[str, tuple[type, int, int]]] = {
    # F16: sign + exponent lsb + mantissa random, exponent 8..9 -> |x| in [2^-7, 2^-5); gains: exponent 15 -> [1, 2)
    "F16": {"small": (np.uint16, 0x87FF, 0x2000), "gain": (np.uint16, 0x03FF, 0x3C00)},
    # F32: the same ranges (exponent 120..121; gains exponent 127)
    "F32": {"small": (np.uint32, 0x80FFFFFF, 0x3C000000), "gain": (np.uint32, 0x007FFFFF, 0x3F800000)},
}


def meta_model(component: str, config: Mapping[str, Any]) -> Any:
    """The real diffusers/transformers class of ``component`` built from ``config`` on the meta device."""
    import torch

    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(dict(config))
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(dict(config))
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
        return cls(text_config(dict(config)))


def saved_key_shapes(component: str, model: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the official weight file holds (CLIP-L under ``text_model.``)."""
    items = []
    for name, tensor in model.state_dict().items():
        items.append((with_text_model_level(name) if component == "text_encoder" else name, tuple(tensor.shape)))
    return items


def random_tensor_loader(name: str, shape: tuple[int, ...], dtype: str, seed: int) -> Callable[[], np.ndarray]:
    """A loader that generates ``name``'s values on demand from (seed, name): same inputs, same bytes."""
    kind = "gain" if len(shape) == 1 and _NORM_GAIN.search(name) else "small"
    try:
        udtype, keep, set_bits = _BIT_RECIPES[dtype][kind]
    except KeyError:
        raise InputError(f"random data is generated as F16 or F32 only, not {dtype}", key=name) from None
    from sdxl_ckpt.formats.dtypes import ST_TO_NUMPY

    def load() -> np.ndarray:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        bits = rng.integers(0, np.iinfo(udtype).max, size=shape, dtype=udtype, endpoint=True)
        np.bitwise_and(bits, udtype(keep), out=bits)
        np.bitwise_or(bits, udtype(set_bits), out=bits)
        return bits.view(ST_TO_NUMPY[dtype])

    return load


def component_entries(component: str, model: Any, seed: int, dtype: str) -> list[TensorEntry]:
    """Lazy random entries for every tensor of ``component`` (nothing generated yet)."""
    comp_seed = component_seed(seed, component)
    return [
        TensorEntry(name, dtype, shape, random_tensor_loader(name, shape, dtype, comp_seed), f"random:{name}")
        for name, shape in saved_key_shapes(component, model)
    ]


def _save_config(component: str, model: Any, folder: Path, dtype: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if component in ("unet", "vae"):
        model.save_config(folder)
    else:
        model.config.dtype = "float16" if dtype == "F16" else "float32"
        model.config.save_pretrained(folder)


def build_full_model(
    variant: str,
    out_dir: str | Path,
    seed: int = 0,
    variant_fp16: bool = True,
    quiet: bool = True,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a real-shape SDXL pipeline folder of random data at ``out_dir``, one tensor in memory at a time.

    ``variant_fp16``: fp16 weights named ``*.fp16.safetensors`` as in the official repos (else fp32, plain names).
    ``configs`` replaces the real component configs (tests run this same code path on the tiny configs).
    LCM has no full-size second UNet: ``lcm`` writes the base structure (the LCM UNet IS that structure).
    """
    structure = structure_of(variant)
    comps = {k: dict(v) for k, v in (configs or full_configs(structure)).items()}
    dtype = "F16" if variant_fp16 else "F32"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for component, config in comps.items():
        model = meta_model(component, config)
        folder = out / component
        _save_config(component, model, folder, dtype)
        name = _WEIGHT_STEM[component] + (".fp16" if variant_fp16 else "") + ".safetensors"
        write_safetensors(
            folder / name,
            component_entries(component, model, seed, dtype),
            {"format": "pt"},
            overwrite=True,
            quiet=quiet,
            desc=component,
        )
    write_tokenizers(out, structure)
    write_scheduler(out)
    write_model_index(out, structure)
    return out


def meta_sd_shapes(structure: str, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Ordered SD key -> (shape, dtype class) of the real classes built from ``configs`` on the meta device, their
    keys mapped by the rule tables: what ``keymaps.expected`` must compute without torch."""
    from sdxl_ckpt.keymaps.diffusers_sd import SD_PREFIXES, map_component_keys
    from sdxl_ckpt.keymaps.expected import GENERATED_SHAPE, SD_ORDER
    from sdxl_ckpt.keymaps.transforms import TRANSFORMS

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for component in SD_ORDER:
        if component not in SD_PREFIXES[structure]:
            continue
        config = configs[component]
        shapes = dict(saved_key_shapes(component, meta_model(component, config)))
        shapes = {
            k
            if not component.startswith("text_encoder") or k.startswith(("text_model.", "text_projection"))
            else "text_model." + k: v
            for k, v in shapes.items()
        }
        mapped = map_component_keys(component, shapes, config, SD_PREFIXES[structure][component])
        if mapped.unknown:
            raise RuntimeError(f"{component}: diffusers keys no rule maps: {mapped.unknown[:5]}")
        for target in mapped.targets:
            out[target.name] = (TRANSFORMS[target.transform].shape([shapes[s] for s in target.sources]), "float")
        for name, generator in mapped.generated:
            out[name] = GENERATED_SHAPE[generator](config)
    return out
